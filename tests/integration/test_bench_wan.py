"""scripts/bench_wan.py end to end: namespaces, an emulated WAN link, real processes.

The tiny version (one case, one shaped setting besides the baseline, 2 requests each,
about 20 s) needs root and ``ip`` (iproute2): network namespaces cannot be made
otherwise, and the test is skipped with the reason. The topology/certificate part is
checked without root.
"""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "bench_wan.py"


def _load():
    if "bench_wan" in sys.modules:
        return sys.modules["bench_wan"]
    spec = importlib.util.spec_from_file_location("bench_wan", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["bench_wan"] = mod  # dataclasses look their module up there
    spec.loader.exec_module(mod)
    return mod


def test_wan_topology_puts_every_process_on_its_own_address(tmp_path: Path) -> None:
    from cryptography import x509

    from secureinfer.certs import create_certificates
    from secureinfer.config import load_topology, split_address

    bw = _load()
    ips = ["10.214.0.30", "10.214.0.31", "10.214.0.32"]
    path = bw.write_wan_topology(tmp_path / "wan.toml", base_dir=tmp_path, dealer_ip="10.214.0.10", party_ips=ips,
                                 pool_size=2, request_timeout_s=30.0, rpc_timeout_s=10.0)
    topo = load_topology(path)
    create_certificates(topo)
    assert split_address(topo.dealer.address)[0] == "10.214.0.10"
    for p, ip in zip(topo.parties, ips):
        host, port = split_address(p.address)
        assert host == ip
        data = getattr(p, "data_address", "")
        if data:  # the party's data path: same host, port + 1
            assert split_address(data) == (ip, port + 1)
        cert = x509.load_pem_x509_certificate(Path(p.cert).read_bytes())
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert ipaddress.ip_address(ip) in sans.get_values_for_type(x509.IPAddress)
        assert all(ipaddress.ip_address(o) not in sans.get_values_for_type(x509.IPAddress) for o in ips if o != ip)


@pytest.mark.timeout(600)  # ~20 s on the 2-core VM: not marked slow
def test_tiny_wan_run_and_teardown(tmp_path: Path) -> None:
    bw = _load()
    ok, why = bw.namespaces_available()
    if not ok:
        pytest.skip(f"cannot create network namespaces: {why}")
    if not bw.tun_available() and not bw.netem_available("siwant"):
        pytest.skip("neither sch_netem (tc netem) nor /dev/net/tun is available to emulate the link")
    prefix = "siwant"
    out = tmp_path / "wan.jsonl"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--cases", "mlp1", "--rtts", "10", "--bandwidths", "100", "--repeat", "2",
         "--warmup", "1", "--prefix", prefix, "--subnet", "10.214.0.0/24", "--out", str(out)],
        capture_output=True, text=True, timeout=540,
    )
    if proc.returncode == 2 and "another bench_wan run holds prefix" in proc.stderr:
        pytest.skip(f"another bench_wan run uses the prefix {prefix!r} right now")
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert bw.leftovers(prefix) == [], proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(r["rtt_ms"], r["bandwidth_mbit"]) for r in rows] == [(0.0, None), (10.0, 100.0)]
    base, wan = rows
    for r in rows:
        assert r["case"] == "mlp1" and r["requests"] == 2 and r["n_parties"] == 2
        assert r["argmax_agreement"] == 1.0 and r["max_abs_error"] <= 1e-2
        assert r["rounds"] > 0 and r["bytes_online"] > 0
        assert r["bytes_per_party"] == pytest.approx(r["bytes_online"] / 2, abs=0.1)
    # the emulated link really delays (a physical floor, not a speed assertion)
    assert wan["rtt_measured_ms"] >= 8.0
    assert wan["lower_bound_ms"] == pytest.approx(wan["rounds"] * 10 + wan["bytes_per_party"] * 8 / 100e6 * 1e3, abs=1e-2)
    assert wan["lower_bound_plus_compute_ms"] == pytest.approx(wan["lower_bound_ms"] + base["latency_ms_median"], abs=0.02)
    assert "lower bound" in proc.stderr and "LB ms" in proc.stderr  # the table on stderr
