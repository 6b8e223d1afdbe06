"""Per-round overhead of the party-to-party data paths, between two processes, with mTLS.

Party 0 runs in this process and party 1 in a child process (spawned, its own GIL), each
with the transport a party server uses (:class:`~secureinfer.transport.stream.StreamTransport`
or :class:`~secureinfer.transport.grpc.GrpcTransport` mounted on a gRPC server), built
from one loopback topology with throw-away certificates. Both call ``exchange`` for the
same session and step, ``--rounds`` times per payload size, as a protocol round does:
each sends its payload to the other and waits for the other's. Printed per transport and
payload size, one JSON line::

    {"transport", "payload_bytes", "rounds", "round_ms_median", "round_ms_p90", "mbit_s"}

``round_ms_median`` on loopback is the framework's per-round overhead (the network's is
~0.02 ms here); ``mbit_s`` is payload bits per second one way at that size.

    .venv/bin/python scripts/bench_transport.py [--transports stream,grpc] [--rounds 300]
        [--sizes 8,1024,65536,1048576]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _endpoint(topology_path: str, party_id: int, kind: str) -> tuple[Any, Any]:
    """(transport, grpc server or None) of ``party_id``, listening."""
    import grpc

    from secureinfer.config import load_topology
    from secureinfer.transport import tls
    from secureinfer.transport.grpc import GrpcTransport
    from secureinfer.transport.stream import StreamTransport

    topo = load_topology(topology_path, environ={})
    if kind == "stream":
        tr = StreamTransport.from_topology(topo, party_id)
        tr.start()
        return tr, None
    tr = GrpcTransport.from_topology(topo, party_id)
    srv = grpc.server(ThreadPoolExecutor(max_workers=8), options=tls.server_options(topo.cluster))
    tr.add_to_server(srv)
    p = topo.party(party_id)
    tls.bind_server(srv, p.address, settings=topo.cluster, cert=p.cert, key=p.key)
    srv.start()
    return tr, srv


def _rounds(tr: Any, peer: int, size: int, rounds: int, tag: str) -> list[float]:
    payload = bytes(size)
    times = []
    for r in range(rounds):
        sid = f"{tag}-{size}"
        t0 = time.perf_counter()
        tr.exchange(sid, r, {peer: payload}, timeout=30)
        times.append((time.perf_counter() - t0) * 1e3)
    tr.close_session(f"{tag}-{size}")
    return times


def _child(topology_path: str, kind: str, sizes: list[int], rounds: int, ready: Any, done: Any) -> None:
    tr, srv = _endpoint(topology_path, 1, kind)
    ready.set()
    try:
        for size in sizes:
            _rounds(tr, 0, size, rounds + 10, kind)
        done.wait(30)
    finally:
        tr.close()
        if srv is not None:
            srv.stop(0)


def measure(kind: str, sizes: list[int], rounds: int) -> list[dict[str, Any]]:
    from secureinfer.certs import create_certificates
    from secureinfer.config import load_topology, write_local_topology

    out = []
    with tempfile.TemporaryDirectory(prefix="si-bench-transport-") as tmp:
        path = write_local_topology(Path(tmp) / "t.toml", base_dir=Path(tmp), n_parties=2, data_transport=kind)
        create_certificates(load_topology(path, environ={}))
        ctx = mp.get_context("spawn")
        ready, done = ctx.Event(), ctx.Event()
        child = ctx.Process(target=_child, args=(str(path), kind, sizes, rounds, ready, done), daemon=True)
        child.start()
        tr, srv = _endpoint(str(path), 0, kind)
        try:
            if not ready.wait(60):
                raise RuntimeError("the peer process did not start")
            for size in sizes:
                times = _rounds(tr, 1, size, rounds + 10, kind)[10:]  # 10 warm-up rounds
                med = statistics.median(times)
                p90 = sorted(times)[int(0.9 * (len(times) - 1))]
                out.append({"transport": kind, "payload_bytes": size, "rounds": rounds,
                            "round_ms_median": round(med, 4), "round_ms_p90": round(p90, 4),
                            "mbit_s": round(size * 8 / (med * 1e-3) / 1e6, 1)})
        finally:
            done.set()
            child.join(30)
            tr.close()
            if srv is not None:
                srv.stop(0)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--transports", default="stream,grpc")
    ap.add_argument("--rounds", type=int, default=300)
    ap.add_argument("--sizes", default="8,1024,65536,1048576")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    for kind in args.transports.split(","):
        for row in measure(kind, sizes, args.rounds):
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
