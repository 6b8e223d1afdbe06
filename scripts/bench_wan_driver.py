"""The client side of ``scripts/bench_wan.py``, run inside the client's network namespace.

``scripts/bench_wan.py`` starts it as ``ip netns exec <client-ns> python
scripts/bench_wan_driver.py serve --config FILE`` and talks to it with JSON lines: one
command per line on stdin, one answer per line on stdout (everything else, the SDK's
logs included, goes to stderr). It uses the SDK the way an application does
(:func:`secureinfer.deploy`, :class:`secureinfer.Client`) and builds the models with the
builders of ``scripts/bench.py`` (:data:`bench.CASES`).

Commands (``op``):

* ``ready`` ``{timeout}``: wait until every party answers ServerReady (client identity);
* ``deploy`` ``{case, name}``: build the case's model and deploy it under ``name`` (owner);
* ``measure`` ``{case, name, warmup, n, settle_s, timeout_s[, relay_socket]}``: ``warmup`` requests back to
  back, then ``n`` requests each preceded by a wait until the dealer's pool is full again:
  the dealer's ``Stats`` counters (``sets_generated``, ``parts_prefetched``, as
  ``bench.DealerStats`` reads them) must stay unchanged for ``settle_s`` seconds. The
  caller makes ``settle_s`` long enough for a prefetched part to cross the emulated link
  (a part is counted when the dealer hands it out, before it travels). Answers every
  request's :class:`~secureinfer.client.sdk.InferenceCost` plus the argmax agreement and
  max error against the plaintext model, the change of the dealer's counters over the
  measured requests (``binds_prefetched`` vs ``binds_fallback``: did the requests find
  prefetched material?) and, given the tun backend's ``relay_socket``, the wire bytes that
  crossed each device pair during each request (read just before and after it). It waits once more at the end, so the pool refill
  after the last request does not cross the links while the next setting is measured;
* ``quit``.

``ping --to IP [--count N]`` (a second mode) sends ICMP echo requests from a raw socket
(the image has no ``ping``) and prints ``{"rtt_ms": [...]}``: run it in a party's
namespace to measure the party-to-party RTT.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import struct
import sys
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from secureinfer.dealer.core import STATS_GAUGES as _GAUGES  # noqa: E402  (after the sys.path setup)


# ----------------------------------------------------------------------------- ping


def _icmp_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    s = sum(struct.unpack(f"!{len(data) // 2}H", data))
    s = (s >> 16) + (s & 0xFFFF)
    s += s >> 16
    return ~s & 0xFFFF


def ping(dst: str, *, count: int = 10, interval: float = 0.05, timeout: float = 2.0, size: int = 56) -> list[float]:
    """Round-trip times (ms) of ``count`` ICMP echoes to ``dst``; lost ones are left out."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = os.getpid() & 0xFFFF
    payload = bytes(range(256))[:size] if size <= 256 else b"x" * size
    rtts: list[float] = []
    try:
        for seq in range(1, count + 1):
            hdr = struct.pack("!BBHHH", 8, 0, 0, ident, seq)
            pkt = struct.pack("!BBHHH", 8, 0, _icmp_checksum(hdr + payload), ident, seq) + payload
            t0 = time.perf_counter()
            sock.sendto(pkt, (dst, 0))
            deadline = t0 + timeout
            while True:
                left = deadline - time.perf_counter()
                if left <= 0:
                    break
                sock.settimeout(left)
                try:
                    data, addr = sock.recvfrom(65535)
                except socket.timeout:
                    break
                ihl = (data[0] & 0x0F) * 4
                typ, _code, _ck, rid, rseq = struct.unpack_from("!BBHHH", data, ihl)
                if typ == 0 and rid == ident and rseq == seq and addr[0] == dst:
                    rtts.append((time.perf_counter() - t0) * 1e3)
                    break
            time.sleep(interval)
    finally:
        sock.close()
    return rtts


# ----------------------------------------------------------------------------- serve


class Driver:
    def __init__(self, config: Path) -> None:
        import torch

        from secureinfer.client.sdk import Client
        from secureinfer.config import load_topology

        torch.set_num_threads(1)  # the parties share the cores; keep the client light
        self.config = config
        self.topology = load_topology(config)
        self.client = Client(config)
        self.models: dict[str, tuple[Any, Any]] = {}
        self._stats: Any = None

    @property
    def stats(self) -> Any:
        if self._stats is None:
            from bench import DealerStats  # the same counters bench.py waits on

            self._stats = DealerStats(SimpleNamespace(topology=self.topology))  # type: ignore[arg-type]
        return self._stats

    def close(self) -> None:
        if self._stats is not None:
            self._stats.close()
        self.client.close()

    # ------------------------------------------------------------------ commands
    def ready(self, timeout: float = 60.0) -> dict[str, Any]:
        import grpc

        from secureinfer.transport import tls
        from secureinfer.v1 import common_pb2, party_pb2_grpc

        ident = self.topology.identity("client")
        deadline = time.monotonic() + timeout
        t0 = time.monotonic()
        for p in self.topology.parties:
            with tls.open_channel(p.address, settings=self.topology.cluster, cert=ident.cert, key=ident.key) as ch:
                stub = party_pb2_grpc.InferenceStub(ch)
                while True:
                    try:
                        if stub.ServerReady(common_pb2.ServerReadyRequest(), timeout=2.0).ready:
                            break
                    except grpc.RpcError:
                        pass
                    if time.monotonic() > deadline:
                        return {"ok": False, "error": f"party {p.id} ({p.address}) not ready after {timeout:.0f}s"}
                    time.sleep(0.2)
        return {"ok": True, "seconds": round(time.monotonic() - t0, 3)}

    def deploy(self, case: str, name: str) -> dict[str, Any]:
        from bench import CASES, deploy_options

        from secureinfer.client.sdk import deploy

        c = CASES[case]
        model, inputs = c.build(c.batch)
        t0 = time.perf_counter()
        deploy(model, inputs(0), name=name, config=self.config, **deploy_options(c, inputs))  # as bench.py deploys
        self.models[name] = (model, inputs)
        return {"ok": True, "seconds": round(time.perf_counter() - t0, 3)}

    def wait_settled(self, settle_s: float, timeout: float) -> float:
        """Wait until the dealer's generation/prefetch counters have not moved for ``settle_s``."""
        t0 = time.monotonic()
        last, since = None, time.monotonic()
        while time.monotonic() - t0 < timeout:
            level = self.stats.activity()
            if not self.stats.available:
                time.sleep(max(settle_s, self.stats.fallback_s))
                break
            if level != last:
                last, since = level, time.monotonic()
            if time.monotonic() - since >= settle_s:
                break
            time.sleep(0.02)
        else:
            print(f"[driver] dealer/party pools still busy after {timeout:.0f}s", file=sys.stderr, flush=True)
        return time.monotonic() - t0

    def measure(self, case: str, name: str, warmup: int, n: int, settle_s: float, timeout_s: float = 120.0,
                relay_socket: str | None = None) -> dict[str, Any]:
        import numpy as np
        import torch

        model, inputs = self.models[name]
        for i in range(warmup):
            self.client.infer(name, inputs(10_000 + i).numpy())
        costs, outs, waits, wire = [], [], [], []
        relay = _RelayProbe(relay_socket) if relay_socket else None
        dealer0 = self.stats.counters()
        for i in range(n):
            waits.append(self.wait_settled(settle_s, timeout_s))
            before = relay.pairs() if relay else None
            outs.append(np.asarray(self.client.infer(name, inputs(i).numpy())))
            if relay is not None and before is not None:
                after = relay.pairs()
                wire.append({k: after[k][1] - before.get(k, [0, 0])[1] for k in after
                             if after[k][1] != before.get(k, [0, 0])[1]})
            c = self.client.last_cost
            costs.append({
                "latency_ms": c.latency_ms, "rounds": c.rounds, "bytes_online": c.bytes_online,
                "bytes_offline": c.bytes_offline, "bytes_client_up": c.bytes_client_up,
                "bytes_client_down": c.bytes_client_down, "party_latency_ms": list(c.party_latency_ms),
            })
        dealer1 = self.stats.counters()
        if relay is not None:
            relay.close()
        self.wait_settled(settle_s, timeout_s)  # leave the pools full and the links quiet for the next setting
        with torch.no_grad():
            plain = np.concatenate([model(inputs(i)).double().numpy() for i in range(n)])
        secure = np.concatenate(outs)
        return {
            "ok": True, "costs": costs, "wait_s_median": round(statistics.median(waits), 3),
            "wire_bytes": wire,  # per request: wire bytes per "src>dst" device pair (tun backend)
            # monotonic counters as the change over this setting; gauges as their value at the end
            "dealer_counters": {k: v if k in _GAUGES else v - dealer0.get(k, 0) for k, v in dealer1.items()
                                if k in _GAUGES or v != dealer0.get(k, 0)},
            "argmax_agreement": float((secure.argmax(1) == plain.argmax(1)).mean()),
            "max_abs_error": float(np.abs(secure - plain).max()),
        }


class _RelayProbe:
    """The tun backend's relay (scripts/wan_relay.py) over its Unix control socket."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(path)
        self.file = self.sock.makefile("rb")

    def pairs(self) -> dict[str, list[int]]:
        self.sock.sendall(b'{"stats": true}\n')
        return json.loads(self.file.readline())["stats"]["pairs"]

    def close(self) -> None:
        self.file.close()
        self.sock.close()


def serve(config: Path) -> int:
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)
    sys.stdout = sys.stderr  # only answers go to the real stdout
    driver: Driver | None = None

    def answer(obj: dict[str, Any]) -> None:
        out.write(json.dumps(obj) + "\n")
        out.flush()

    try:
        driver = Driver(config)
        answer({"ok": True, "hello": True, "pid": os.getpid()})
        for line in sys.stdin:
            if not line.strip():
                continue
            try:
                cmd = json.loads(line)
                op = cmd.pop("op")
                if op == "quit":
                    answer({"ok": True})
                    break
                if op not in ("ready", "deploy", "measure"):
                    raise ValueError(f"unknown op {op!r}")
                answer(getattr(driver, op)(**cmd))
            except Exception as exc:  # reported to the caller, which decides
                answer({"ok": False, "error": repr(exc), "traceback": traceback.format_exc()[-3000:]})
    finally:
        if driver is not None:
            driver.close()
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="mode", required=True)
    s = sub.add_parser("serve", help="answer JSON-line commands (client namespace)")
    s.add_argument("--config", type=Path, required=True)
    p = sub.add_parser("ping", help="ICMP RTTs to an address, JSON on stdout")
    p.add_argument("--to", required=True)
    p.add_argument("--count", type=int, default=10)
    p.add_argument("--interval", type=float, default=0.05)
    args = ap.parse_args(argv)
    if args.mode == "ping":
        print(json.dumps({"rtt_ms": [round(r, 4) for r in ping(args.to, count=args.count, interval=args.interval)]}))
        return 0
    return serve(args.config)


if __name__ == "__main__":
    sys.exit(main())
