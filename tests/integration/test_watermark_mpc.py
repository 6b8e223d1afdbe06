"""Watermark verification of a deployed secret-shared model through real parties gives the
same verdict as plaintext verification, and reveals only the verdict."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from secureinfer.client.audit import verify_deployed
from secureinfer.client.sdk import deploy
from secureinfer.localcluster import LocalCluster
from secureinfer.watermark.certificate import save_certificate
from secureinfer.watermark.digits import fit_digits, load_digits_data
from secureinfer.watermark.keys import save_watermark_key
from secureinfer.watermark.owner import watermark_model
from secureinfer.watermark.verify import count_bit_errors

pytestmark = pytest.mark.timeout(600)


def test_mpc_audit_matches_plaintext(tmp_path) -> None:
    data = load_digits_data()
    marked = fit_digits(data, seed=0, epochs=6)
    wm = watermark_model(marked, owner_key=Ed25519PrivateKey.generate(), x=data.x_train, y=data.y_train,
                         layer="fc1.weight")
    other = fit_digits(data, seed=1, epochs=6)  # independently trained: no watermark
    cert, key = wm.certificate, wm.key
    plain_marked = count_bit_errors(marked.state_dict(), cert, key, frac_bits=16)
    plain_other = count_bit_errors(other.state_dict(), cert, key, frac_bits=16)
    assert plain_marked <= cert.threshold < plain_other
    with LocalCluster(tmp_path / "c") as c:
        x = data.x_test[:1]
        deploy(marked.eval(), x, name="marked", config=c.config_path)
        deploy(other.eval(), x, name="other", config=c.config_path)
        v1 = verify_deployed(c.config_path, "marked", cert=cert, key=key, reveal_distance=True)
        v2 = verify_deployed(c.config_path, "other", cert=cert, key=key, reveal_distance=True)
        assert v1.passed and v1.bit_errors == plain_marked
        assert not v2.passed and v2.bit_errors is None  # a failing audit reveals only the verdict
        # the CLI as an auditor runs it: exit 0 / 1
        save_certificate(cert, tmp_path / "cert.json")
        save_watermark_key(key, tmp_path / "wm.key")
        cmd = [sys.executable, "-m", "secureinfer", "audit", "verify", "--cert", str(tmp_path / "cert.json"),
               "--key", str(tmp_path / "wm.key"), "--config", str(c.config_path), "--json"]
        ok = subprocess.run([*cmd, "--deployed", "marked"], capture_output=True, text=True, timeout=180)
        bad = subprocess.run([*cmd, "--deployed", "other"], capture_output=True, text=True, timeout=180)
        assert ok.returncode == 0, ok.stderr[-2000:]
        assert bad.returncode == 1 and json.loads(bad.stdout)["passed"] is False
        for p in (0, 1):  # every party logs the audit, and never a share
            assert '"event": "audit"' in c.log_text(f"party{p}")
