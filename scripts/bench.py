"""End-to-end MPC benchmark on a loopback cluster (dealer + parties as real processes).

For every selected case the script deploys the case's model on a fresh
:class:`~secureinfer.localcluster.LocalCluster` (mTLS gRPC on loopback, started in a
temporary directory and always shut down), warms up, and measures:

* **spaced** requests: before each one the script waits until the dealer's pool of
  pre-generated material is full again (polled through the dealer's ``Stats`` counters),
  which is the product's *online* latency;
* **back-to-back** requests: no pause, so once the pool is drained the dealer generates
  material on demand inside the request.

It prints ONE JSON line per case to stdout (logs go to stderr)::

    {"case", "batch", "n_parties", "requests", "latency_ms_median", "latency_ms_p90",
     "latency_ms_back_to_back_median", "latency_ms_back_to_back_p90", "party_ms_median",
     "rounds", "bytes_online", "bytes_offline", "bytes_client_up", "bytes_client_down",
     "pool_hit_rate_spaced", "pool_hit_rate_back_to_back", "argmax_agreement",
     "max_abs_error", "samples", "plaintext_ms", "reference_crypten": {...},
     "latency_over_ref", "bytes_online_over_ref", "bytes_total_over_ref", "rounds_over_ref",
     "party_threads", "dealer_nice"}

Latencies are measured at the client (encode, share, both Infer calls, reconstruct);
``party_ms_median`` is the slowest party's own time (dealer fetch included); bytes are per
request, summed over parties (``bytes_online``: party to party; ``bytes_offline``: dealer
to parties). The CrypTen figures are published reference numbers (same MLP), not measured
here; ``rounds`` of the batch-100 reference is not given (null).

Extending: add an entry to :data:`CASES` (name -> :class:`Case` with a builder returning
``(model, input_generator)``), e.g. the CNN / ResNet / HE cases.

    .venv/bin/python scripts/bench.py [--cases mlp1,mlp100] [--repeat N] [--out FILE]
        [--pool-size 4] [--party-threads N] [--dealer-nice N] [--workdir DIR]
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# Make ``secureinfer`` importable when run as ``python scripts/bench.py`` from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from secureinfer.client.sdk import Client, deploy  # noqa: E402
from secureinfer.localcluster import LocalCluster  # noqa: E402

InputFn = Callable[[int], torch.Tensor]  # request index -> input batch


@dataclass(frozen=True)
class Case:
    """One benchmark case: how to build the model and its inputs, and how often to run it."""

    batch: int
    build: Callable[[int], tuple[nn.Module, InputFn]]  # batch -> (model, inputs)
    measured: int = 20  # spaced requests measured by default
    warmup: int = 3
    reference_crypten: dict[str, float | None] = field(default_factory=dict)
    description: str = ""


def _uniform_inputs(shape: tuple[int, ...], *, seed: int) -> InputFn:
    """Inputs uniform in [0, 1); torch's generator is fine here: benchmark data, not a secret."""

    def make(i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        return torch.rand(shape, generator=g)

    return make


def build_mlp(batch: int) -> tuple[nn.Module, InputFn]:
    """MLP 784-128-128-10 with ReLUs; weights from torch's default init under a fixed seed."""
    torch.manual_seed(0)  # not secret: reproducible benchmark weights
    model = nn.Sequential(nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 10)).eval()
    return model, _uniform_inputs((batch, 784), seed=batch)


def build_lenet(batch: int) -> tuple[nn.Module, InputFn]:
    """LeNet-style CNN on 28x28 (see secureinfer.zoo.lenet)."""
    from secureinfer.zoo import lenet

    return lenet(), _uniform_inputs((batch, 1, 28, 28), seed=batch)


def build_resnet(batch: int) -> tuple[nn.Module, InputFn]:
    """Small ResNet on 3x32x32 with BatchNorm and residual adds (secureinfer.zoo.small_resnet)."""
    from secureinfer.zoo import small_resnet

    return small_resnet(), _uniform_inputs((batch, 3, 32, 32), seed=batch)


#: Case registry: name -> Case.
CASES: dict[str, Case] = {
    "mlp1": Case(
        batch=1, build=build_mlp, measured=20, warmup=3,
        reference_crypten={"latency_ms": 90.0, "bytes": 2.0e6, "rounds": 22},
        description="MLP 784-128-128-10, batch 1",
    ),
    "mlp100": Case(
        batch=100, build=build_mlp, measured=10, warmup=2,
        reference_crypten={"latency_ms": 200.0, "bytes": 15.0e6, "rounds": None},
        description="MLP 784-128-128-10, batch 100",
    ),
    "lenet1": Case(
        batch=1, build=build_lenet, measured=10, warmup=2,
        reference_crypten={"latency_ms": 600.0, "bytes": 20.0e6, "rounds": 124},
        description="LeNet-style CNN 28x28, batch 1",
    ),
    "lenet32": Case(
        batch=32, build=build_lenet, measured=4, warmup=1,
        reference_crypten={"latency_ms": 6800.0, "bytes": 641.0e6, "rounds": 124},
        description="LeNet-style CNN 28x28, batch 32",
    ),
    "resnet1": Case(
        batch=1, build=build_resnet, measured=4, warmup=1, reference_crypten={},
        description="small ResNet (CIFAR shape, BatchNorm, residual adds), batch 1",
    ),
}


def renice_process(pid: int, niceness: int) -> None:
    """Lower the CPU priority of every thread of ``pid`` (Linux; threads created later inherit it)."""
    import os

    task_dir = Path(f"/proc/{pid}/task")
    tids = [int(t) for t in os.listdir(task_dir)] if task_dir.exists() else [pid]
    for tid in tids:
        try:
            os.setpriority(os.PRIO_PROCESS, tid, niceness)
        except OSError as exc:
            log(f"cannot renice thread {tid}: {exc}")


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def _pct(values: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(values, dtype=np.float64), q))


def plaintext_ms(model: nn.Module, x: torch.Tensor, *, budget_s: float = 1.0, max_runs: int = 500) -> float:
    """Median latency of the float32 torch forward pass (bounded to ``budget_s`` of CPU)."""
    xf = x.to(torch.float32)
    times: list[float] = []
    with torch.no_grad():
        for _ in range(5):
            model(xf)
        end = time.perf_counter() + budget_s
        while len(times) < max_runs and (len(times) < 20 or time.perf_counter() < end):
            t0 = time.perf_counter()
            model(xf)
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


class DealerStats:
    """Reads the dealer's counters (``Stats`` RPC) to tell when its pool is full again."""

    def __init__(self, cluster: LocalCluster) -> None:
        from secureinfer.transport import tls
        from secureinfer.v1 import dealer_pb2, dealer_pb2_grpc

        topo = cluster.topology
        ident = topo.identity("owner")
        self._channel = tls.open_channel(topo.dealer.address, settings=topo.cluster, cert=ident.cert, key=ident.key)
        self._stub = dealer_pb2_grpc.DealerStub(self._channel)
        self._req = dealer_pb2.StatsRequest()
        self.n_parties = topo.n_parties
        self.available = True
        self.fallback_s = 2.0

    def counters(self) -> dict[str, int]:
        """The dealer's counters; empty if the dealer refuses (then waits fall back to sleeps)."""
        import grpc

        if self.available:
            try:
                return dict(self._stub.Stats(self._req, timeout=5.0).counters)
            except grpc.RpcError as err:
                log(f"dealer Stats unavailable ({err.code().name}); spacing falls back to {self.fallback_s}s sleeps")
                self.available = False
        return {}

    def activity(self) -> tuple[int, ...]:
        """Counters that move while the dealer generates or parties prefetch."""
        c = self.counters()
        return (c.get("sets_generated", 0), c.get("parts_prefetched", 0))

    def wait_full(self, target: float, *, timeout: float = 30.0) -> float:
        """Wait until generation and prefetching have been idle for a moment (pools full)."""
        t0 = time.monotonic()
        last, stable_since = None, time.monotonic()
        while time.monotonic() - t0 < timeout:
            level = self.activity()
            if not self.available:
                time.sleep(self.fallback_s)
                break
            if level != last:
                last, stable_since = level, time.monotonic()
            if time.monotonic() - stable_since > 0.3:
                break
            time.sleep(0.02)
        else:
            log(f"dealer/party pools still busy after {timeout:.0f}s")
        return time.monotonic() - t0

    def close(self) -> None:
        self._channel.close()


def _requests(
    client: Client, name: str, inputs: InputFn, indices: range, *, stats: DealerStats, pool_target: float | None,
) -> tuple[list[Any], list[np.ndarray], int]:
    """Run one request per index; if ``pool_target`` is set, wait for a full pool before each."""
    costs, outs = [], []
    hits0 = stats.counters().get("binds_prefetched", 0)
    for i in indices:
        if pool_target is not None:
            stats.wait_full(pool_target)
        outs.append(np.asarray(client.infer(name, inputs(i).numpy())))
        costs.append(client.last_cost)
    hits = stats.counters().get("binds_prefetched", 0) - hits0 if stats.available else -1
    return costs, outs, hits


def run_case(name: str, case: Case, cluster: LocalCluster, *, repeat: int | None, pool_size: int,
             stats: DealerStats, pool_keys: list[int]) -> dict[str, Any]:
    model, inputs = case.build(case.batch)
    n = repeat or case.measured
    log(f"{name}: {case.description}; deploying")
    deploy(model, inputs(0), name=name, config=cluster.config_path)
    pool_keys[0] += 1  # a new deployment pools batch 1 by default
    if case.batch != 1:
        pool_keys[0] += 1  # ... and, once requested, its own batch size
    with Client(cluster.config_path) as client:
        log(f"{name}: {case.warmup} warm-up request(s)")
        _requests(client, name, inputs, range(10_000, 10_000 + case.warmup), stats=stats, pool_target=None)
        target = pool_size * pool_keys[0]
        log(f"{name}: {n} spaced requests (pool refilled to {target} sets before each)")
        spaced, outs, hits_sp = _requests(client, name, inputs, range(n), stats=stats, pool_target=target)
        log(f"{name}: {n} back-to-back requests")
        stats.wait_full(target)
        b2b, _, hits_bb = _requests(client, name, inputs, range(20_000, 20_000 + n), stats=stats, pool_target=None)
        stats.wait_full(target)  # leave the dealer idle for the next case

    with torch.no_grad():
        plain = np.concatenate([model(inputs(i)).double().numpy() for i in range(n)])
    secure = np.concatenate(outs)
    lat = [c.latency_ms for c in spaced]
    lat_bb = [c.latency_ms for c in b2b]
    c0 = spaced[0]
    ref = case.reference_crypten
    ref_lat, ref_bytes, ref_rounds = ref.get("latency_ms"), ref.get("bytes"), ref.get("rounds")
    med = statistics.median(lat)

    def ratio(a: float, b: float | None) -> float | None:
        return round(a / b, 4) if b else None

    return {
        "case": name,
        "batch": case.batch,
        "n_parties": cluster.topology.n_parties,
        "requests": n,
        "latency_ms_median": round(med, 2),
        "latency_ms_p90": round(_pct(lat, 90), 2),
        "latency_ms_back_to_back_median": round(statistics.median(lat_bb), 2),
        "latency_ms_back_to_back_p90": round(_pct(lat_bb, 90), 2),
        "party_ms_median": round(statistics.median(max(c.party_latency_ms) for c in spaced), 2),
        "rounds": c0.rounds,
        "bytes_online": c0.bytes_online,
        "bytes_offline": c0.bytes_offline,
        "bytes_client_up": c0.bytes_client_up,
        "bytes_client_down": c0.bytes_client_down,
        "pool_hit_rate_spaced": round(hits_sp / n, 3) if hits_sp >= 0 else None,
        "pool_hit_rate_back_to_back": round(hits_bb / n, 3) if hits_bb >= 0 else None,
        "argmax_agreement": float((secure.argmax(1) == plain.argmax(1)).mean()),
        "max_abs_error": float(np.abs(secure - plain).max()),
        "samples": int(secure.shape[0]),
        "plaintext_ms": round(plaintext_ms(model, inputs(0)), 4),
        "reference_crypten": ref,
        "latency_over_ref": ratio(med, ref_lat),
        "bytes_online_over_ref": ratio(c0.bytes_online, ref_bytes),
        "bytes_total_over_ref": ratio(c0.bytes_online + c0.bytes_offline, ref_bytes),
        "rounds_over_ref": ratio(c0.rounds, ref_rounds),
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="mlp1,mlp100,lenet1,lenet32,resnet1", help=f"comma-separated, from {sorted(CASES)}")
    ap.add_argument("--he", default="", metavar="BATCHES",
                    help="also run the CKKS case (scripts/bench_he.py) at these batch sizes, e.g. 1,64,4096")
    ap.add_argument("--repeat", type=int, default=None, help="measured requests per mode (default: per case)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON lines to this file")
    ap.add_argument("--pool-size", type=int, default=4, help="dealer pool size (sets generated ahead)")
    ap.add_argument("--workdir", type=Path, default=None, help="cluster directory (default: a temp dir)")
    ap.add_argument("--dealer-nice", type=int, default=0,
                    help="renice the dealer process (its pool refill then yields the shared cores to the parties)")
    ap.add_argument("--party-threads", type=int, default=None,
                    help="OMP/MKL threads of the dealer and party processes (default: torch's default)")
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown or not names:
        ap.error(f"unknown case(s) {unknown}; known: {sorted(CASES)}")
    if args.repeat is not None and args.repeat < 1:
        ap.error("--repeat must be >= 1")
    torch.set_num_threads(1)  # the parties run on the same cores; keep the client light

    # SIGTERM/SIGINT -> exception, so the finally below always stops the cluster
    def _raise(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, _raise)
    tmp = tempfile.TemporaryDirectory(prefix="secureinfer-bench-") if args.workdir is None else None
    workdir = Path(tmp.name) if tmp else args.workdir
    results: list[dict[str, Any]] = []
    if args.out:
        args.out.write_text("")
    env = None
    if args.party_threads is not None:
        env = {"OMP_NUM_THREADS": str(args.party_threads), "MKL_NUM_THREADS": str(args.party_threads)}
    cluster = LocalCluster(workdir, n_parties=2, pool_size=args.pool_size, env=env)
    stats: DealerStats | None = None
    rc = 0
    try:
        log(f"starting dealer + 2 parties under {workdir}")
        cluster.start()
        if args.dealer_nice:
            renice_process(cluster.procs["dealer"].pid, args.dealer_nice)
        stats = DealerStats(cluster)
        pool_keys = [0]
        for name in names:
            res = run_case(name, CASES[name], cluster, repeat=args.repeat, pool_size=args.pool_size,
                           stats=stats, pool_keys=pool_keys)
            res["party_threads"] = args.party_threads
            res["dealer_nice"] = args.dealer_nice
            line = json.dumps(res)
            print(line, flush=True)
            results.append(res)
            if args.out:
                with args.out.open("a") as fh:
                    fh.write(line + "\n")
        log(f"dealer counters: {stats.counters()}")
        if args.he:
            from bench_he import run_he_bench

            for res in run_he_bench([int(b) for b in args.he.split(",") if b]):
                line = json.dumps({"case": f"he{res.get('batch', '')}", **res})
                print(line, flush=True)
                if args.out:
                    with args.out.open("a") as fh:
                        fh.write(line + "\n")
    except Exception as exc:
        rc = 1
        log(f"FAILED: {exc!r}")
        for pname in cluster.procs:
            log(f"--- tail of {pname}.log ---\n{cluster.log_text(pname)[-1500:]}")
    finally:
        if stats is not None:
            stats.close()
        cluster.stop()
        if tmp is not None:
            tmp.cleanup()
        log("cluster stopped")
    return rc


if __name__ == "__main__":
    sys.exit(main())
