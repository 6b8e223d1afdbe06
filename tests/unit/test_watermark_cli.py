"""CLI: keygen, embed, audit verify with exit codes 0 (pass) and 1 (fail)."""

from __future__ import annotations

import argparse
import json
import os
import stat
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from secureinfer.watermark.cli import main, register_cli
from secureinfer.watermark.digits import fit_digits, load_digits_data
from secureinfer.watermark.modelio import save_state_dict

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: extra threads only add contention
    d = tmp_path_factory.mktemp("wmcli")
    save_state_dict(fit_digits(load_digits_data(), seed=0, epochs=12).state_dict(), d / "base.pt")
    assert main(["watermark", "keygen", "--out", str(d / "owner.pem")]) == 0
    assert main(["watermark", "keygen", "--out", str(d / "other.pem")]) == 0
    rc = main(
        ["watermark", "embed", str(d / "base.pt"), "--owner-key", str(d / "owner.pem"), "--out", str(d / "wm.pt"),
         "--cert", str(d / "cert.json")]
    )
    assert rc == 0
    yield d
    torch.set_num_threads(threads)


def _verify(d: Path, model: str = "wm.pt", cert: str = "cert.json", key: str = "cert.wmkey.json", *extra: str) -> int:
    return main(["audit", "verify", str(d / model), "--cert", str(d / cert), "--key", str(d / key), *extra])


def test_embed_writes_model_cert_and_private_key(workdir: Path) -> None:
    assert stat.S_IMODE(os.stat(workdir / "cert.wmkey.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(workdir / "owner.pem").st_mode) == 0o600
    cert = json.loads((workdir / "cert.json").read_text())
    assert cert["layer"] == "fc1.weight" and cert["bits"] == 256 and cert["threshold"] == 80
    key = json.loads((workdir / "cert.wmkey.json").read_text())
    assert key["nonce"] not in (workdir / "cert.json").read_text()


def test_verify_pass_prints_verdict(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _verify(workdir) == 0
    out = capsys.readouterr().out
    assert "verdict: PASS" in out and "bit errors: 0 / 256" in out and "p-value:" in out


def test_verify_unwatermarked_model_fails(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _verify(workdir, model="base.pt") == 1
    out = capsys.readouterr().out
    assert "verdict: FAIL" in out and "too many bit errors" in out


def test_verify_altered_certificate_fails(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cert = json.loads((workdir / "cert.json").read_text())
    cert["threshold"] = 200
    (workdir / "altered.json").write_text(json.dumps(cert))
    assert _verify(workdir, cert="altered.json") == 1
    assert "signature is invalid" in capsys.readouterr().out


def test_verify_with_another_key_fails(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        ["watermark", "embed", str(workdir / "base.pt"), "--owner-key", str(workdir / "owner.pem"),
         "--out", str(workdir / "wm2.pt"), "--cert", str(workdir / "cert2.json"), "--key-out", str(workdir / "k2.json")]
    )
    assert rc == 0
    capsys.readouterr()
    assert _verify(workdir, key="k2.json") == 1
    assert "does not match the certificate's commitment" in capsys.readouterr().out


def test_verify_expected_owner_and_registration_time(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _verify(workdir, "wm.pt", "cert.json", "cert.wmkey.json", "--expect-owner", str(workdir / "owner.pem.pub")) == 0
    assert _verify(workdir, "wm.pt", "cert.json", "cert.wmkey.json", "--expect-owner", str(workdir / "other.pem.pub")) == 1
    assert _verify(workdir, "wm.pt", "cert.json", "cert.wmkey.json", "--registered-at", "2000-01-01T00:00:00Z") == 1
    assert "late certificate" in capsys.readouterr().out
    assert _verify(workdir, "wm.pt", "cert.json", "cert.wmkey.json", "--registered-at", "2999-01-01") == 0


def test_verify_json_output_and_missing_model(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _verify(workdir, "wm.pt", "cert.json", "cert.wmkey.json", "--json") == 0
    verdict = json.loads(capsys.readouterr().out)
    assert verdict["passed"] is True and verdict["bit_errors"] == 0
    assert _verify(workdir, model="missing.pt") == 1
    assert "model rejected" in capsys.readouterr().out


def test_embed_refuses_to_overwrite(workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc = main(
        ["watermark", "embed", str(workdir / "base.pt"), "--owner-key", str(workdir / "owner.pem"),
         "--out", str(workdir / "wm.pt"), "--cert", str(workdir / "cert.json")]
    )
    assert rc == 1 and "refusing to overwrite" in capsys.readouterr().err


def test_register_cli_returns_extensible_parsers() -> None:
    parser = argparse.ArgumentParser()
    made = register_cli(parser.add_subparsers(dest="command"))
    assert set(made) == {"watermark keygen", "watermark train-digits", "watermark embed", "audit verify"}
    args = parser.parse_args(["audit", "verify", "m.pt", "--cert", "c", "--key", "k"])
    assert callable(args.func)


def test_process_exit_code(workdir: Path) -> None:
    """One real process (exit status through ``sys.exit``); the pass path is covered in-process."""
    env = dict(os.environ, PYTHONPATH=str(REPO))
    base = [sys.executable, "-m", "secureinfer.watermark.cli", "audit", "verify"]
    args = ["--cert", str(workdir / "cert.json"), "--key", str(workdir / "cert.wmkey.json")]
    bad = subprocess.run([*base, str(workdir / "base.pt"), *args], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 1 and "verdict: FAIL" in bad.stdout
