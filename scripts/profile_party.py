"""Latency profile of one MPC inference: where do the milliseconds go?

Three measurements, each printed as one JSON line on stdout (logs on stderr):

1. ``inprocess``: the two parties as threads of this process on the in-process transport,
   driven exactly like the party server drives them (``compile_plan`` ->
   ``generate_request_material`` -> ``bundle_to_bytes`` / ``bundle_from_bytes`` ->
   ``run_plan``). Library functions are wrapped with timers (in this process only; no
   library file is changed) and *exclusive* milliseconds per component and party are
   reported, e.g. seed expansion (HKDF, AES-CTR), ring matmul, DCF key parsing and
   evaluation, the exchange rounds, and the client's encode/share/serialize.
2. ``grpc_round``: one protocol round over two :class:`GrpcTransport` endpoints with mTLS
   on loopback (this process), for the payload sizes of the model's rounds, and an empty
   unary RPC — the floor of every round and of the client's ``Infer`` call.
3. ``cluster``: real dealer + party processes (``LocalCluster``); per request the client
   latency, each party's own latency and its dealer-fetch time (``cost.offline_ms``),
   with the dealer's pool hit counters.

    .venv/bin/python scripts/profile_party.py [--case mlp1] [--iters 30] [--skip-cluster]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench import CASES, calibration_batch, deploy_options  # noqa: E402

from secureinfer import fss, prg, ring  # noqa: E402
from secureinfer.dealer import material, wire  # noqa: E402
from secureinfer.dealer.material import BundleBuilder  # noqa: E402
from secureinfer.graph.ranges import calibrate_ranges  # noqa: E402
from secureinfer.engine import plan as plan_mod  # noqa: E402
from secureinfer.engine import runner  # noqa: E402
from secureinfer.graph.torch_import import from_torch  # noqa: E402
from secureinfer.protocols import session as session_mod  # noqa: E402
from secureinfer.sharing import reconstruct, share  # noqa: E402
from secureinfer.transport import InProcessNetwork  # noqa: E402
from secureinfer.transport.codec import share_from_proto, tensor_to_proto  # noqa: E402
from secureinfer.v1 import common_pb2, party_pb2  # noqa: E402


def log(msg: str) -> None:
    print(f"[profile] {msg}", file=sys.stderr, flush=True)


class Timers:
    """Exclusive/inclusive wall time per (thread role, label), nested calls subtracted."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.excl: dict[tuple[str, str], float] = defaultdict(float)
        self.count: dict[tuple[str, str], int] = defaultdict(int)
        self._lock = threading.Lock()
        self._undo: list[Callable[[], None]] = []

    def role(self) -> str:
        return getattr(self.local, "role", threading.current_thread().name)

    def wrap(self, obj: Any, attr: str, label: str) -> None:
        """Time ``obj.attr`` under ``label``; an absent attribute is skipped (the code moves)."""
        fn = getattr(obj, attr, None)
        if fn is None:
            log(f"not instrumented (absent): {getattr(obj, '__name__', obj)}.{attr}")
            return
        is_static = isinstance(obj, type) and isinstance(obj.__dict__.get(attr), (classmethod, staticmethod))
        raw = obj.__dict__.get(attr) if isinstance(obj, type) else None

        def timed(*a: Any, **k: Any) -> Any:
            stack = self.local.__dict__.setdefault("stack", [])
            stack.append(0.0)
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                dt = time.perf_counter() - t0
                child = stack.pop()
                key = (self.role(), label)
                with self._lock:
                    self.excl[key] += dt - child
                    self.count[key] += 1
                if stack:
                    stack[-1] += dt

        setattr(obj, attr, staticmethod(timed) if is_static else timed)
        self._undo.append(lambda: setattr(obj, attr, raw if raw is not None else fn))

    def section(self, label: str) -> "_Section":
        return _Section(self, label)

    def restore(self) -> None:
        for u in reversed(self._undo):
            u()
        self._undo.clear()

    def reset(self) -> None:
        self.excl.clear()
        self.count.clear()


class _Section:
    def __init__(self, timers: Timers, label: str) -> None:
        self.t, self.label = timers, label

    def __enter__(self) -> None:
        self.t.local.__dict__.setdefault("stack", []).append(0.0)
        self.t0 = time.perf_counter()

    def __exit__(self, *exc: object) -> None:
        dt = time.perf_counter() - self.t0
        stack = self.t.local.stack
        child = stack.pop()
        key = (self.t.role(), self.label)
        self.t.excl[key] += dt - child
        self.t.count[key] += 1
        if stack:
            stack[-1] += dt


def instrument(t: Timers) -> None:
    """Wrap the library functions one request runs through (this process only).

    Names are looked up where the callers import them (the engine moves); absent ones are
    skipped, so the profile keeps working while the engine changes.
    """
    t.wrap(material, "derive_seed", "seed expand: HKDF")
    t.wrap(prg.Prg, "ring", "seed expand: AES-CTR")
    t.wrap(ring, "matmul", "ring matmul")
    t.wrap(fss, "dcf_eval", "DCF eval")
    t.wrap(fss, "dcf_gen", "DCF gen")
    t.wrap(fss.DcfKey, "from_bytes", "DCF key parse")
    t.wrap(fss.DcfKey, "to_bytes", "DCF key serialize")
    t.wrap(session_mod.Session, "exchange", "exchange (send + wait)")
    t.wrap(session_mod, "pack_ring", "pack/unpack ring")
    t.wrap(session_mod, "unpack_ring", "pack/unpack ring")
    t.wrap(wire, "bundle_to_bytes", "bundle serialize")
    t.wrap(wire, "bundle_from_bytes", "bundle parse")
    callers = [runner, plan_mod]
    try:
        from secureinfer.engine import ops as ops_mod

        callers.append(ops_mod)
    except ImportError:
        pass
    for mod in callers:
        for attr, label in (
            ("linear_fixed", "linear: other torch ops"), ("truncate", "trunc: other torch ops"),
            ("gate", "gate: other torch ops"), ("argmax_onehot", "argmax: other torch ops"),
            ("linear_material", "dealer: linear material (other)"),
            ("gate_material", "dealer: gate material (other)"),
            ("trunc_material", "dealer: trunc material (other)"),
        ):
            if hasattr(mod, attr):
                t.wrap(mod, attr, label)


def install_process_timers(outdir: str) -> None:
    """Instrument a dealer/party *process* (called from a generated ``sitecustomize``).

    Times are keyed by thread kind (``refill`` = the dealer's pool thread, ``rpc`` = the
    rest); SIGUSR1 resets them (after warm-up); at exit they go to ``outdir/<pid>.json``.
    """
    import atexit
    import os
    import signal

    from secureinfer.dealer import core as dealer_core
    from secureinfer.party import server as party_server
    from secureinfer.party import material as party_material
    from secureinfer.party import services as party_services
    from secureinfer.transport.grpc import GrpcTransport
    from secureinfer.transport.stream import StreamTransport

    t = Timers()
    t.role = lambda: "refill" if threading.current_thread().name.startswith("dealer-pool") else "rpc"  # type: ignore[method-assign]
    instrument(t)
    t.wrap(party_services.InferenceService, "Infer", "party: Infer handler (auth, deadline)")
    t.wrap(party_server.PartyServer, "infer", "party: infer (checks, Session, response)")
    t.wrap(party_server.PartyServer, "material", "party: material (Bind RPC, cache or Fetch)")
    t.wrap(party_server.MaterialCache, "take", "party: material cache take")
    t.wrap(party_server, "bundle_from_bytes", "bundle parse")
    t.wrap(party_material, "bundle_from_bytes", "bundle parse")
    t.wrap(party_server, "run_plan", "party: run_plan (loop)")
    t.wrap(party_server, "share_from_proto", "party: input share_from_proto")
    t.wrap(party_server, "tensor_to_proto", "party: output tensor_to_proto")
    t.wrap(GrpcTransport, "exchange", "transport: exchange (other)")
    t.wrap(GrpcTransport, "send", "transport: send RPC (blocking)")
    t.wrap(GrpcTransport, "recv", "transport: recv (wait for peer)")
    t.wrap(StreamTransport, "exchange", "transport: exchange (other)")
    t.wrap(StreamTransport, "send", "transport: send (socket write)")
    t.wrap(StreamTransport, "recv", "transport: recv (wait for peer)")
    t.wrap(dealer_core.DealerCore, "fetch", "dealer: fetch (lock, pool pop)")
    t.wrap(dealer_core.DealerCore, "_generate", "dealer: generate set (other)")
    t.wrap(dealer_core, "bundle_to_bytes", "bundle serialize")
    t.wrap(plan_mod, "generate_request_material", "dealer: generate_request_material (other)")
    signal.signal(signal.SIGUSR1, lambda *_: t.reset())

    def dump() -> None:
        data = {"pid": os.getpid(), "argv": sys.argv,
                "excl_ms": {f"{r}|{lab}": round(v * 1e3, 3) for (r, lab), v in sorted(t.excl.items())},
                "count": {f"{r}|{lab}": c for (r, lab), c in sorted(t.count.items())}}
        Path(outdir, f"{os.getpid()}.json").write_text(json.dumps(data))

    atexit.register(dump)


#: deploy with calibrated ReLU ranges, as bench.py does (``--no-calibrate`` turns it off)
CALIBRATE = True

_SITECUSTOMIZE = """
import os, sys
sys.path.insert(0, {scripts!r})
import profile_party
profile_party.install_process_timers({outdir!r})
"""


def _setup(case_name: str) -> tuple[Any, Any, Any, list[Any], int]:
    """Owner + deployment in-process: graph, masks, opened diffs, per-party PartyModel."""
    case = CASES[case_name]
    model, inputs = case.build(case.batch)
    graph = from_torch(model.eval(), inputs(0), frac_bits=16)
    if CALIBRATE:  # as bench.py deploys: calibrated ReLU ranges (graph.ranges)
        graph = calibrate_ranges(graph, calibration_batch(inputs, case.batch).numpy())
    n = 2
    enc = runner.encode_params(graph)
    p = prg.Prg.from_os()
    shares_by_party: list[dict[str, torch.Tensor]] = [{} for _ in range(n)]
    for k, v in enc.items():
        for i, s in enumerate(share(v, n, prg=p)):
            shares_by_party[i][k] = s
    seeds = [prg.fresh_seed() for _ in range(n)]
    mb = BundleBuilder(n, seeds=seeds)
    shapes_fn = getattr(plan_mod, "fixed_operand_shapes", None) or getattr(plan_mod, "model_mask_shapes")
    masks = {k: mb.random(f"{k}/B", shp) for k, shp in shapes_fn(graph).items()}
    net = InProcessNetwork(n)
    sid = "deploy"
    out: list[Any] = [None] * n

    def dep(i: int) -> None:
        s = session_mod.Session(party_id=i, n_parties=n, session_id=sid, transport=net.transport(i))
        m, d = runner.open_masks(s, graph, shares_by_party[i], mb.party_bundle(i))
        out[i] = runner.PartyModel(graph, party_id=i, shares=shares_by_party[i], masks=m, diffs=d)

    ths = [threading.Thread(target=dep, args=(i,)) for i in range(n)]
    [th.start() for th in ths]
    [th.join() for th in ths]
    return graph, masks, inputs, out, case.batch


def profile_inprocess(case_name: str, iters: int) -> dict[str, Any]:
    graph, masks, inputs, pmodels, batch = _setup(case_name)
    n = 2
    plan = plan_mod.compile_plan(graph, batch=batch, n_parties=n)
    net = InProcessNetwork(n)
    t = Timers()
    instrument(t)
    client_prg = prg.Prg.from_os()
    totals: dict[str, list[float]] = defaultdict(list)
    ref_model, _ = CASES[case_name].build(batch)
    try:
        for it in range(iters + 2):
            if it == 2:
                t.reset()
                totals.clear()
            x = inputs(it)
            # ---- dealer (runs ahead of the request in production)
            t.local.role = "dealer"
            t0 = time.perf_counter()
            with t.section("dealer: compile_plan + builder"):
                b = BundleBuilder(n)
                p = plan_mod.compile_plan(graph, batch=batch, n_parties=n)
            with t.section("dealer: generate_request_material"):
                plan_mod.generate_request_material(p, b, masks)
            blobs = [wire.bundle_to_bytes(b.party_bundle(i)) for i in range(n)]
            totals["dealer_total_ms"].append((time.perf_counter() - t0) * 1e3)
            # ---- client encode / share / serialize
            t.local.role = "client"
            t0 = time.perf_counter()
            with t.section("client: encode + share"):
                enc = ring.encode(x.to(torch.float64), frac_bits=graph.frac_bits)
                xs = share(enc, n, prg=client_prg)
            with t.section("client: tensor_to_proto + serialize"):
                reqs = [party_pb2.InferRequest(model_name="m", request_id="r", input=tensor_to_proto(
                    s, encoding=common_pb2.ENCODING_ADDITIVE_SHARE, frac_bits=graph.frac_bits)).SerializeToString()
                    for s in xs]
            totals["client_pre_ms"].append((time.perf_counter() - t0) * 1e3)
            outs: list[Any] = [None] * n
            party_ms = [0.0] * n
            sid = uuid.uuid4().hex

            def party(i: int) -> None:
                t.local.role = f"party{i}"
                t0p = time.perf_counter()
                with t.section("party: parse InferRequest"):
                    req = party_pb2.InferRequest()
                    req.ParseFromString(reqs[i])
                    xi = share_from_proto(req.input, expect_frac_bits=graph.frac_bits)
                bundle = wire.bundle_from_bytes(blobs[i], party_id=i)
                s = session_mod.Session(party_id=i, n_parties=n, session_id=sid, transport=net.transport(i))
                res = runner.run_plan(s, plan, pmodels[i], bundle, xi)
                with t.section("party: output tensor_to_proto"):
                    outs[i] = tensor_to_proto(res["logits"], encoding=common_pb2.ENCODING_ADDITIVE_SHARE,
                                              frac_bits=plan.output_scale).SerializeToString()
                party_ms[i] = (time.perf_counter() - t0p) * 1e3

            t0 = time.perf_counter()
            ths = [threading.Thread(target=party, args=(i,), name=f"party{i}") for i in range(n)]
            [th.start() for th in ths]
            [th.join() for th in ths]
            totals["parties_wall_ms"].append((time.perf_counter() - t0) * 1e3)
            for i in range(n):
                totals[f"party{i}_ms"].append(party_ms[i])
            t.local.role = "client"
            t0 = time.perf_counter()
            with t.section("client: parse + reconstruct + decode"):
                parts = []
                for o in outs:
                    m = common_pb2.Tensor()
                    m.ParseFromString(o)
                    parts.append(share_from_proto(m))
                y = ring.decode(reconstruct(parts), frac_bits=plan.output_scale)
            totals["client_post_ms"].append((time.perf_counter() - t0) * 1e3)
            with torch.no_grad():
                err = float((y - ref_model(x).double()).abs().max())
            totals["max_abs_error"].append(err)
    finally:
        t.restore()
    per_iter = {f"{role}|{label}": round(v * 1e3 / iters, 3) for (role, label), v in sorted(t.excl.items())}
    calls = {f"{role}|{label}": t.count[(role, label)] // iters for (role, label) in sorted(t.count)}
    return {
        "profile": "inprocess", "case": case_name, "batch": batch, "iters": iters,
        "torch_threads": torch.get_num_threads(),
        "max_abs_error": max(totals.pop("max_abs_error")),
        "medians_ms": {k: round(statistics.median(v), 3) for k, v in totals.items()},
        "exclusive_ms_per_request": per_iter, "calls_per_request": calls,
    }


def profile_grpc(payload_sizes: list[int], iters: int) -> dict[str, Any]:
    import grpc

    from secureinfer.certs import create_certificates
    from secureinfer.config import load_topology, write_local_topology
    from secureinfer.transport import tls
    from secureinfer.transport.grpc import GrpcTransport
    from secureinfer.v1 import common_pb2 as cpb
    from secureinfer.v1 import party_pb2_grpc

    out: dict[str, Any] = {"profile": "grpc_round", "iters": iters}
    with tempfile.TemporaryDirectory(prefix="si-prof-grpc-") as tmp:
        path = write_local_topology(Path(tmp) / "t.toml", base_dir=Path(tmp), n_parties=2)
        topo = load_topology(path, environ={})
        create_certificates(topo)
        ts, servers = [], []
        for p in topo.parties:
            tr = GrpcTransport.from_topology(topo, p.id)
            srv = grpc.server(ThreadPoolExecutor(max_workers=8), options=tls.server_options(topo.cluster))
            tr.add_to_server(srv)

            class Live(party_pb2_grpc.InferenceServicer):
                def ServerLive(self, request: Any, ctx: Any) -> Any:
                    return cpb.ServerLiveResponse(live=True)

            party_pb2_grpc.add_InferenceServicer_to_server(Live(), srv)
            tls.bind_server(srv, p.address, settings=topo.cluster, cert=p.cert, key=p.key)
            srv.start()
            ts.append(tr)
            servers.append(srv)
        try:
            pool = ThreadPoolExecutor(max_workers=2)
            for size in payload_sizes:
                payload = bytes(size)
                lat = []
                for it in range(iters + 3):
                    sid = f"s{size}-{it}"
                    t0 = time.perf_counter()
                    f1 = pool.submit(ts[1].exchange, sid, 1, {0: payload}, timeout=10)
                    ts[0].exchange(sid, 1, {1: payload}, timeout=10)
                    f1.result()
                    lat.append((time.perf_counter() - t0) * 1e3)
                    ts[0].close_session(sid)
                    ts[1].close_session(sid)
                out[f"exchange_{size}B_ms_median"] = round(statistics.median(lat[3:]), 3)
            ident = topo.identity("client")
            with tls.open_channel(topo.parties[0].address, settings=topo.cluster, cert=ident.cert,
                                  key=ident.key) as ch:
                stub = party_pb2_grpc.InferenceStub(ch)
                lat = []
                for it in range(iters + 3):
                    t0 = time.perf_counter()
                    stub.ServerLive(cpb.ServerLiveRequest(), timeout=5)
                    lat.append((time.perf_counter() - t0) * 1e3)
                out["unary_empty_rpc_ms_median"] = round(statistics.median(lat[3:]), 3)
            pool.shutdown()
        finally:
            for tr in ts:
                tr.close()
            for s in servers:
                s.stop(0)
    return out


def profile_cluster(
    case_name: str, iters: int, *, env: dict[str, str] | None = None, timers: bool = True, dealer_nice: int = 0,
) -> dict[str, Any]:
    """Real processes: client latency vs party latency vs dealer fetch, per request."""
    from secureinfer.client.sdk import Client, deploy
    from secureinfer.localcluster import LocalCluster

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench import DealerStats, renice_process

    import os
    import signal

    case = CASES[case_name]
    model, inputs = case.build(case.batch)
    rows: dict[str, list[float]] = defaultdict(list)
    procs: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="si-prof-cluster-") as tmp:
        env = dict(env or {})
        if timers:
            site = Path(tmp, "site")
            site.mkdir()
            (site / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(
                scripts=str(Path(__file__).resolve().parent), outdir=str(site)))
            env["PYTHONPATH"] = os.pathsep.join([str(site), str(Path(__file__).resolve().parents[1])])
        cluster = LocalCluster(Path(tmp, "c"), n_parties=2, pool_size=4, env=env)
        stats = None
        try:
            cluster.start()
            if dealer_nice:
                renice_process(cluster.procs["dealer"].pid, dealer_nice)
            stats = DealerStats(cluster)
            deploy(model, inputs(0), name="m", config=cluster.config_path,
                   **deploy_options(case, inputs, calibrate=CALIBRATE))
            keys = 1 if case.batch == 1 else 2
            with Client(cluster.config_path) as client:
                orig = client._c.call_all
                captured: list[Any] = []

                def call_all(fn: Any) -> list[Any]:
                    res = orig(fn)
                    captured[:] = res
                    return res

                client._c.call_all = call_all  # type: ignore[method-assign]
                for it in range(iters + 3):
                    stats.wait_full(4 * keys if it else 4)  # the batch-B pool exists after one request
                    if it == 3 and timers:
                        for p in cluster.procs.values():
                            os.kill(p.pid, signal.SIGUSR1)
                        time.sleep(0.2)
                        stats.wait_full(4 * keys)
                    client.infer("m", inputs(it).numpy())
                    if it < 3:
                        continue
                    c = client.last_cost
                    rows["client_ms"].append(c.latency_ms)
                    rows["party_max_ms"].append(max(r.cost.latency_ms for r in captured))
                    for r in captured:
                        rows[f"party{r.party_id}_ms"].append(r.cost.latency_ms)
                        rows[f"party{r.party_id}_fetch_ms"].append(r.cost.offline_ms)
                        rows[f"party{r.party_id}_online_ms"].append(r.cost.latency_ms - r.cost.offline_ms)
                    rows["client_minus_party_ms"].append(c.latency_ms - max(r.cost.latency_ms for r in captured))
            counters = stats.counters()
        finally:
            if stats is not None:
                stats.close()
            cluster.stop()
        if timers:
            for f in Path(tmp, "site").glob("*.json"):
                d = json.loads(f.read_text())
                argv = d["argv"]
                role = "dealer" if "dealer" in argv else (
                    f"party{argv[argv.index('--id') + 1]}" if "--id" in argv else str(d["pid"]))
                procs[role] = {k: round(v / iters, 3) for k, v in d["excl_ms"].items()}
    return {
        "profile": "cluster", "case": case_name, "iters": iters, "dealer_nice": dealer_nice,
        "env": {k: v for k, v in (env or {}).items() if k != "PYTHONPATH"},
        "medians_ms": {k: round(statistics.median(v), 3) for k, v in rows.items()},
        "dealer_counters": counters, "process_exclusive_ms_per_request": procs,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="mlp1", choices=sorted(CASES))
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--threads", type=int, default=0, help="torch threads in this process (0: torch default)")
    ap.add_argument("--skip-inprocess", action="store_true")
    ap.add_argument("--skip-grpc", action="store_true")
    ap.add_argument("--skip-cluster", action="store_true")
    ap.add_argument("--dealer-nice", type=int, default=0, help="renice the dealer process")
    ap.add_argument("--cluster-env", action="append", default=[], help="KEY=VALUE for the party processes")
    ap.add_argument("--no-calibrate", action="store_true", help="default ReLU ranges (bench.py --no-calibrate)")
    args = ap.parse_args(argv)
    global CALIBRATE
    CALIBRATE = not args.no_calibrate
    if args.threads:
        torch.set_num_threads(args.threads)
    batch = CASES[args.case].batch
    if not args.skip_inprocess:
        log("in-process profile")
        print(json.dumps(profile_inprocess(args.case, args.iters)), flush=True)
    if not args.skip_grpc:
        log("gRPC round latency")
        sizes = sorted({8, 8 * 784 * batch, 8 * 128 * batch, 8 * 10 * batch, 1 << 20})
        print(json.dumps(profile_grpc(sizes, args.iters)), flush=True)
    if not args.skip_cluster:
        log("cluster profile")
        env = dict(kv.split("=", 1) for kv in args.cluster_env) or None
        print(json.dumps(profile_cluster(args.case, args.iters, env=env, dealer_nice=args.dealer_nice)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
