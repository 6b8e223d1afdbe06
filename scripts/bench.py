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
     "max_abs_error", "samples", "plaintext_ms", "relu_range", "latency_ms_first_after_deploy",
     "first_over_median", "client_connect_ms", "party_threads", "dealer_nice", "pooled_sets",
     "deploy_ms", "back_to_back_requests"}

Spaced requests each start once the dealer is idle and its pools are back to their level
after the warm-up (``pooled_sets``, none of them handed to a party and not yet claimed: a
party that took one still transfers, parses or prepares it); back-to-back requests start
from there and do not wait.

Models are deployed with 64 calibration inputs (batches no measured request uses), so
every ReLU compares on its calibrated range (``secureinfer.graph.ranges``: 8x the largest
value seen); ``--no-calibrate`` deploys with the default 2^15 range instead.

Latencies are measured at the client (encode, share, both Infer calls, reconstruct);
``party_ms_median`` is the slowest party's own time (dealer fetch included); bytes are per
request, summed over parties (``bytes_online``: party to party; ``bytes_offline``: dealer
to parties).

``--compare-crypten`` also runs CrypTen 0.4.1 (2 parties, its default TFP tuple provider)
on the SAME model and the SAME input batches in the same run, right after each case
(cluster idle): the case's ``state_dict``, a layer description, the exact input batches
of the spaced requests and their plaintext outputs are saved with ``torch.save`` to
``<workdir>/crypten/<case>.pt`` and ``scripts/crypten_ref.py`` loads them with
``torch.load(weights_only=True)`` under the CrypTen venv (``--anchor-venv``, default
``$ANCHOR_VENV`` or ``/tmp/anchor-venv``; built with ``--anchor-setup``, default
``../shared/anchors/crypten_setup.sh``, if it is missing). The CrypTen parties get the same
``--party-threads`` as ours. Each case's line then also has::

    "crypten": {"latency_ms_median", "latency_ms_p90", "latency_ms_min", "latency_ms_all",
                "rounds", "bytes", "bytes_per_party_logged", "argmax_agreement",
                "max_abs_error", "samples", "repeats", "warmup", "provider", "torch_threads",
                "crypten_version", "torch_version", "world_size", "inputs_identical_max_diff"},
    "latency_over_crypten", "latency_p90_over_crypten", "latency_back_to_back_over_crypten",
    "bytes_online_over_crypten", "bytes_total_over_crypten", "rounds_over_crypten"

(ours / CrypTen; CrypTen's ``bytes`` are all parties' sent bytes per inference, like
``bytes_online``; ``bytes_total`` adds our dealer traffic, which CrypTen's TFP provider
does not have; ``latency_ms_*`` of CrypTen: encrypt the input, forward, reveal, slower
party, per inference). A case CrypTen's runner cannot express (the ResNet: BatchNorm and
residual adds are not an ``nn.Sequential`` of supported layers) gets
``"crypten": {"skipped": reason}`` and null ratios; a failed CrypTen run gets
``{"error": ...}`` and the script exits 1. Without ``--compare-crypten`` there are no
CrypTen fields: no CrypTen figure is hard-coded.

Extending: add an entry to :data:`CASES` (name -> :class:`Case` with a builder returning
``(model, input_generator)``), e.g. the CNN / ResNet / HE cases.

    .venv/bin/python scripts/bench.py [--cases mlp1,mlp100] [--repeat N] [--out FILE]
        [--pool-size 4] [--party-threads N] [--dealer-nice N] [--workdir DIR]
        [--compare-crypten [--crypten-repeat N] [--anchor-venv DIR] [--anchor-setup SH]]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

# Make ``secureinfer`` importable when run as ``python scripts/bench.py`` from a checkout.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from secureinfer.client.admin import remove_model  # noqa: E402
from secureinfer.client.sdk import Client, deploy, deploy_graph  # noqa: E402
from secureinfer.localcluster import LocalCluster  # noqa: E402

InputFn = Callable[[int], torch.Tensor]  # request index -> input batch


@dataclass(frozen=True)
class Case:
    """One benchmark case: how to build the model and its inputs, and how often to run it."""

    batch: int
    build: Callable[[int], tuple[nn.Module, InputFn]]  # batch -> (model, inputs)
    measured: int = 20  # spaced requests measured by default
    warmup: int = 3
    description: str = ""
    onnx: bool = False  # deployed through its ONNX export (models the PyTorch importer does not map)


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


def build_bert(seq: int) -> Callable[[int], tuple[nn.Module, InputFn]]:
    """BERT-tiny-style classifier (2 layers, hidden 128, 2 heads, ``seq`` tokens; input:
    the embedded sequence), secureinfer.zoo_transformers.TinyBert."""
    def build(batch: int) -> tuple[nn.Module, InputFn]:
        from secureinfer.zoo_transformers import TinyBert

        return TinyBert(layers=2, hidden=128, heads=2, seq=seq, classes=2), _normal_inputs((batch, seq, 128), seed=seq)

    return build


def build_gpt(batch: int) -> tuple[nn.Module, InputFn]:
    """GPT-2-tiny-style decoder (2 layers, hidden 128, 2 heads, 16 tokens, causal mask,
    next-token logits over 256), secureinfer.zoo_transformers.TinyGpt."""
    from secureinfer.zoo_transformers import TinyGpt

    return TinyGpt(layers=2, hidden=128, heads=2, seq=16, vocab=256), _normal_inputs((batch, 16, 128), seed=16)


def _normal_inputs(shape: tuple[int, ...], *, seed: int) -> InputFn:
    """Standard normal inputs (embedded tokens); benchmark data, not a secret."""

    def make(i: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed * 1_000_003 + i)
        return torch.randn(shape, generator=g)

    return make


#: Case registry: name -> Case.
CASES: dict[str, Case] = {
    "mlp1": Case(
        batch=1, build=build_mlp, measured=20, warmup=3,
        description="MLP 784-128-128-10, batch 1",
    ),
    "mlp100": Case(
        batch=100, build=build_mlp, measured=10, warmup=2,
        description="MLP 784-128-128-10, batch 100",
    ),
    "lenet1": Case(
        batch=1, build=build_lenet, measured=10, warmup=2,
        description="LeNet-style CNN 28x28, batch 1",
    ),
    "lenet32": Case(
        batch=32, build=build_lenet, measured=10, warmup=1,
        description="LeNet-style CNN 28x28, batch 32",
    ),
    "resnet1": Case(
        batch=1, build=build_resnet, measured=4, warmup=1,
        description="small ResNet (CIFAR shape, BatchNorm, residual adds), batch 1",
    ),
    "bert-tiny32": Case(
        batch=1, build=build_bert(32), measured=5, warmup=1, onnx=True,
        description="BERT-tiny-style classifier, 2 layers, hidden 128, 2 heads, sequence 32",
    ),
    "bert-tiny128": Case(
        batch=1, build=build_bert(128), measured=3, warmup=1, onnx=True,
        description="BERT-tiny-style classifier, 2 layers, hidden 128, 2 heads, sequence 128",
    ),
    "gpt2-tiny": Case(
        batch=1, build=build_gpt, measured=5, warmup=1, onnx=True,
        description="GPT-2-tiny-style decoder, 2 layers, hidden 128, 16 tokens, next-token logits",
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
        """Counters that move while the dealer generates, parties prefetch, and the binder
        claims sets every party has prepared (parsed, precomputed, confirmed), and the
        ``generating`` gauge (a set in progress moves no counter until it completes)."""
        c = self.counters()
        return (c.get("sets_generated", 0), c.get("parts_prefetched", 0), c.get("sets_claimed", 0),
                c.get("generating", 0))

    def stock(self) -> tuple[int, int]:
        """(pooled sets, pooled sets a party was handed a part of): the second is a set a
        party is still transferring, parsing or preparing; once it has it prepared and
        confirmed, the binder claims it and the dealer generates its replacement."""
        c = self.counters()
        return c.get("pooled_sets", 0), c.get("pooled_delivered", 0)

    def wait_full(self, target: float, *, stock: tuple[int, int] | None = None, settle_s: float = 0.3,
                  timeout: float = 30.0) -> float:
        """Wait until generation and prefetching have been idle for a moment (pools full)
        and, with ``stock`` (:meth:`stock` at rest), until the pools hold that many sets
        again with no more of them in a party's hands: a party parses and precomputes a
        prefetched set after the dealer's counters stop moving (a LeNet batch-32 part,
        200 MB, takes longer than the idle moment). ``settle_s``: how long nothing must
        move, the stock included."""
        t0 = time.monotonic()
        last, stable_since = None, time.monotonic()
        while time.monotonic() - t0 < timeout:
            act = self.activity()
            level = (*act, *self.stock()) if settle_s > 0.3 else act
            if not self.available:
                time.sleep(self.fallback_s)
                break
            if level != last:
                last, stable_since = level, time.monotonic()
            idle = act[-1] == 0  # the generating gauge
            if idle and time.monotonic() - stable_since > settle_s and (stock is None or self._restocked(stock)):
                break
            time.sleep(0.02)
        else:
            log(f"dealer/party pools still busy after {timeout:.0f}s")
        return time.monotonic() - t0

    def _restocked(self, stock: tuple[int, int]) -> bool:
        pooled, delivered = self.stock()
        return pooled >= stock[0] and delivered <= stock[1]

    def close(self) -> None:
        self._channel.close()


def _requests(
    client: Client, name: str, inputs: InputFn, indices: range, *, stats: DealerStats, pool_target: float | None,
    stock: tuple[int, int] | None = None,
) -> tuple[list[Any], list[np.ndarray], int]:
    """Run one request per index; if ``pool_target`` is set, wait for a full pool before each.

    Returns (costs, outputs, hits): ``hits`` is the number of requests bound to a set the
    binder had claimed ahead (no dealer RPC on the request path), i.e. the requests minus
    the dealer's ``Bind`` calls (pooled or freshly generated); -1 without dealer counters.
    """

    def binds() -> int:
        c = stats.counters()
        return c.get("binds_prefetched", 0) + c.get("binds_fallback", 0)

    costs, outs = [], []
    binds0 = binds()
    for i in indices:
        if pool_target is not None:
            stats.wait_full(pool_target, stock=stock)
        outs.append(np.asarray(client.infer(name, inputs(i).numpy())))
        costs.append(client.last_cost)
    hits = len(indices) - (binds() - binds0) if stats.available else -1
    return costs, outs, hits


#: calibration batches for --calibrate: drawn like the measured inputs, never measured
_CALIBRATION_INDEX = 30_000
_CALIBRATION_SAMPLES = 64


def calibration_batch(inputs: InputFn, batch: int) -> torch.Tensor:
    """``_CALIBRATION_SAMPLES`` inputs from batches no measured request uses."""
    k = -(-_CALIBRATION_SAMPLES // batch)
    return torch.cat([inputs(_CALIBRATION_INDEX + i) for i in range(k)])[:_CALIBRATION_SAMPLES]


def deploy_options(case: Case, inputs: InputFn, *, calibrate: bool = True) -> dict[str, Any]:
    """The keyword arguments every benchmark deploys a case with: its batch size pre-warmed
    (batch 1 is pooled from deploy time on anyway) and calibrated ReLU ranges."""
    return {"parameters": {"pool.batches": str(case.batch)} if case.batch != 1 else None,
            "calibration": calibration_batch(inputs, case.batch).numpy() if calibrate else None}


def run_case(name: str, case: Case, cluster: LocalCluster, *, repeat: int | None, pool_size: int,
             stats: DealerStats, pool_keys: list[int], crypten: CryptenRunner | None = None,
             calibrate: bool = True) -> dict[str, Any]:
    model, inputs = case.build(case.batch)
    n = repeat or case.measured
    log(f"{name}: {case.description}; deploying")
    with Client(cluster.config_path) as client:
        # connected before the deploy: "first after deploy" measures the model's cold
        # start (material, caches), not this client's TCP + TLS handshakes (reported apart)
        t0 = time.perf_counter()
        client.connect()
        connect_ms = (time.perf_counter() - t0) * 1e3
        graph = None
        if case.onnx:  # exported and imported before the deploy clock starts
            from secureinfer.graph.onnx_import import from_onnx
            from secureinfer.zoo_transformers import to_onnx

            graph = from_onnx(to_onnx(model, inputs(0)))
        t0 = time.perf_counter()  # until every party holds material and the dealer's pools are full
        if graph is not None:
            deploy_graph(graph, name=name, config=cluster.config_path, **deploy_options(case, inputs, calibrate=calibrate))
        else:
            deploy(model, inputs(0), name=name, config=cluster.config_path,
                   **deploy_options(case, inputs, calibrate=calibrate))
        deploy_ms = (time.perf_counter() - t0) * 1e3
        pool_keys[0] += 1 if case.batch == 1 else 2
        log(f"{name}: {case.warmup} warm-up request(s)")
        warm, _, _ = _requests(client, name, inputs, range(10_000, 10_000 + case.warmup), stats=stats,
                               pool_target=None)
        target = pool_size * pool_keys[0]
        log(f"{name}: {n} spaced requests (pool refilled to {target} sets before each)")
        stats.wait_full(target, settle_s=2.0)  # every kind's stock complete, the burst stock included
        stock = stats.stock()  # the pools once everything settled
        spaced, outs, hits_sp = _requests(client, name, inputs, range(n), stats=stats, pool_target=target,
                                          stock=stock)
        log(f"{name}: {n} back-to-back requests")
        stats.wait_full(target, stock=stock)
        b2b, _, hits_bb = _requests(client, name, inputs, range(20_000, 20_000 + n), stats=stats, pool_target=None)
    # each case on its own: a finished case's pools and cached parts would otherwise hold
    # memory (and the dealer's byte budget) for the next until they expire
    remove_model(cluster.config_path, name)
    stats.wait_full(target)  # leave the dealer idle for the next case

    with torch.no_grad():
        plain = np.concatenate([model(inputs(i)).double().numpy() for i in range(n)])
    secure = np.concatenate(outs)
    lat = [c.latency_ms for c in spaced]
    lat_bb = [c.latency_ms for c in b2b]
    c0 = spaced[0]
    med = statistics.median(lat)
    res: dict[str, Any] = {
        "case": name,
        "batch": case.batch,
        "n_parties": cluster.topology.n_parties,
        "requests": n,
        "pooled_sets": stock[0],
        "latency_ms_median": round(med, 2),
        "latency_ms_p90": round(_pct(lat, 90), 2),
        "latency_ms_back_to_back_median": round(statistics.median(lat_bb), 2),
        "latency_ms_back_to_back_p90": round(_pct(lat_bb, 90), 2),
        # the first request after deploy (warm-up #0): cold caches, material for a new model
        "latency_ms_first_after_deploy": round(warm[0].latency_ms, 2) if warm else None,
        "first_over_median": round(warm[0].latency_ms / med, 2) if warm else None,
        "client_connect_ms": round(connect_ms, 2),
        "deploy_ms": round(deploy_ms, 1),
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
        "relu_range": "calibrated" if calibrate else "default",
    }
    if crypten is not None:
        ref = crypten.run(name, case, model, [inputs(i) for i in range(n)])
        res["crypten"] = ref
        res.update(crypten_ratios(res, ref))
    return res


# --------------------------------------------------------------------------- CrypTen side by side

#: what ``scripts/crypten_ref.py`` reads (keep in step with its ``FORMAT``)
CRYPTEN_FORMAT = "secureinfer-crypten-ref/1"
ROOT = Path(__file__).resolve().parents[1]


class UnsupportedForCrypten(ValueError):
    """The model is not an nn.Sequential of layers the CrypTen runner can rebuild."""


def _ints(v: Any) -> list[int] | int:
    return [int(x) for x in v] if isinstance(v, (tuple, list)) else int(v)


def layer_spec(model: nn.Module) -> list[dict[str, Any]]:
    """The architecture of ``model`` as plain data the CrypTen runner rebuilds layer by layer."""
    if not isinstance(model, nn.Sequential):
        raise UnsupportedForCrypten(f"{type(model).__name__} is not an nn.Sequential")
    spec: list[dict[str, Any]] = []
    for i, m in enumerate(model):
        if isinstance(m, nn.Linear):
            spec.append({"type": "linear", "in": m.in_features, "out": m.out_features, "bias": m.bias is not None})
        elif isinstance(m, nn.Conv2d):
            if m.groups != 1 or _ints(m.dilation) not in (1, [1, 1]) or m.padding_mode != "zeros" \
                    or isinstance(m.padding, str):
                raise UnsupportedForCrypten(f"layer {i}: Conv2d with groups/dilation/padding mode/string padding")
            spec.append({"type": "conv2d", "in": m.in_channels, "out": m.out_channels, "kernel": _ints(m.kernel_size),
                         "stride": _ints(m.stride), "padding": _ints(m.padding), "bias": m.bias is not None})
        elif isinstance(m, nn.ReLU):
            spec.append({"type": "relu"})
        elif isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)):
            if isinstance(m, nn.MaxPool2d) and (_ints(m.dilation) not in (1, [1, 1]) or m.return_indices):
                raise UnsupportedForCrypten(f"layer {i}: MaxPool2d with dilation or indices")
            if m.ceil_mode or (isinstance(m, nn.AvgPool2d) and (not m.count_include_pad or m.divisor_override)):
                raise UnsupportedForCrypten(f"layer {i}: {type(m).__name__} options CrypTen does not mirror")
            spec.append({"type": "maxpool2d" if isinstance(m, nn.MaxPool2d) else "avgpool2d",
                         "kernel": _ints(m.kernel_size), "stride": _ints(m.stride), "padding": _ints(m.padding)})
        elif isinstance(m, nn.Flatten):
            if (m.start_dim, m.end_dim) != (1, -1):
                raise UnsupportedForCrypten(f"layer {i}: Flatten({m.start_dim}, {m.end_dim})")
            spec.append({"type": "flatten"})
        else:
            raise UnsupportedForCrypten(f"layer {i}: {type(m).__name__} is not supported by the CrypTen runner")
    return spec


def save_case(path: Path, name: str, batch: int, model: nn.Module, inputs: list[torch.Tensor], *,
              repeats: int, warmup: int, threads: int | None) -> None:
    """Write what the CrypTen runner needs: plain containers and tensors only (weights_only loads)."""
    spec = layer_spec(model)
    xs = [x.detach().to(torch.float32).contiguous().clone() for x in inputs]
    with torch.no_grad():
        plain = [model(x).detach().clone() for x in xs]
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    torch.save({"format": CRYPTEN_FORMAT, "case": name, "batch": batch, "layers": spec, "state_dict": state,
                "inputs": xs, "plain_logits": plain, "repeats": int(repeats), "warmup": int(warmup),
                "threads": threads}, path)


def crypten_ratios(ours: dict[str, Any], ref: dict[str, Any]) -> dict[str, float | None]:
    """ours / CrypTen for the figures both have; None where CrypTen has no figure."""

    def ratio(a: float | None, b: float | None) -> float | None:
        return round(a / b, 4) if a is not None and b else None

    return {
        "latency_over_crypten": ratio(ours["latency_ms_median"], ref.get("latency_ms_median")),
        "latency_p90_over_crypten": ratio(ours["latency_ms_p90"], ref.get("latency_ms_p90")),
        "latency_back_to_back_over_crypten": ratio(ours["latency_ms_back_to_back_median"],
                                                   ref.get("latency_ms_median")),
        "bytes_online_over_crypten": ratio(ours["bytes_online"], ref.get("bytes")),
        "bytes_total_over_crypten": ratio(ours["bytes_online"] + ours["bytes_offline"], ref.get("bytes")),
        "rounds_over_crypten": ratio(ours["rounds"], ref.get("rounds")),
    }


def _anchor_ok(python: Path) -> bool:
    cmd = [str(python), str(ROOT / "scripts" / "crypten_ref.py"), "--check"]
    return python.exists() and subprocess.run(cmd, capture_output=True).returncode == 0


class CryptenRunner:
    """Runs ``scripts/crypten_ref.py`` under the CrypTen venv for one case at a time."""

    def __init__(self, venv: Path, setup: Path, workdir: Path, *, repeat: int | None, threads: int | None,
                 timeout_s: float = 900.0) -> None:
        self.python = venv / "bin" / "python"
        self.venv, self.setup = venv, setup
        self.dir = workdir / "crypten"
        self.repeat, self.threads, self.timeout_s = repeat, threads, timeout_s
        self.failed = False

    def ensure_venv(self) -> None:
        """Build the CrypTen venv with the anchor's setup script if it is missing or broken."""
        if _anchor_ok(self.python):
            return
        if not self.setup.is_file():
            raise SystemExit(
                f"--compare-crypten: no working CrypTen venv at {self.venv} and no setup script at {self.setup}.\n"
                f"Build it with:  ANCHOR_VENV={self.venv} bash /path/to/shared/anchors/crypten_setup.sh\n"
                f"or pass --anchor-venv DIR / --anchor-setup FILE.")
        log(f"building the CrypTen venv at {self.venv} with {self.setup} (takes a few minutes)")
        r = subprocess.run(["bash", str(self.setup)], env={**os.environ, "ANCHOR_VENV": str(self.venv)},
                           stdout=sys.stderr)
        if r.returncode != 0 or not _anchor_ok(self.python):
            raise SystemExit(f"--compare-crypten: {self.setup} failed (rc {r.returncode}); "
                             f"CrypTen venv at {self.venv} still unusable")

    def run(self, name: str, case: Case, model: nn.Module, inputs: list[torch.Tensor]) -> dict[str, Any]:
        """CrypTen's figures for this case, ``{"skipped": why}`` or ``{"error": what}``."""
        self.dir.mkdir(parents=True, exist_ok=True)
        path, out = self.dir / f"{name}.pt", self.dir / f"{name}.json"
        reps = self.repeat or len(inputs)
        try:
            save_case(path, name, case.batch, model, inputs, repeats=reps, warmup=1, threads=self.threads)
        except UnsupportedForCrypten as exc:
            log(f"{name}: CrypTen skipped: {exc}")
            return {"skipped": str(exc)}
        log(f"{name}: CrypTen 0.4.1, {reps} inference(s) on the same weights and inputs")
        cmd = [str(self.python), str(ROOT / "scripts" / "crypten_ref.py"), str(path), "--out", str(out)]
        try:
            r = subprocess.run(cmd, stdout=subprocess.DEVNULL, stderr=sys.stderr, timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            self.failed = True
            return {"error": f"timed out after {self.timeout_s:.0f}s"}
        if r.returncode != 0 or not out.exists():
            self.failed = True
            return {"error": f"crypten_ref.py exited {r.returncode}"}
        return json.loads(out.read_text())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", default="mlp1,mlp100,lenet1,lenet32,resnet1", help=f"comma-separated, from {sorted(CASES)}")
    ap.add_argument("--he", default="", metavar="BATCHES",
                    help="also run the CKKS case (scripts/bench_he.py) at these batch sizes, e.g. 1,64,4096")
    ap.add_argument("--repeat", type=int, default=None, help="measured requests per mode (default: per case)")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON lines to this file")
    ap.add_argument("--pool-size", type=int, default=4, help="dealer pool size (sets generated ahead)")
    ap.add_argument("--workdir", type=Path, default=None, help="cluster directory (default: a temp dir)")
    ap.add_argument("--no-calibrate", action="store_true",
                    help="deploy without calibration data: every ReLU compares on the default 2^15 range")
    ap.add_argument("--dealer-nice", type=int, default=0,
                    help="renice the dealer process (its pool refill then yields the shared cores to the parties)")
    ap.add_argument("--party-threads", type=int, default=None,
                    help="OMP/MKL threads of the dealer and party processes (default: torch's default)")
    ap.add_argument("--compare-crypten", action="store_true",
                    help="also run CrypTen 0.4.1 on the same weights and inputs (scripts/crypten_ref.py)")
    ap.add_argument("--crypten-repeat", type=int, default=None,
                    help="CrypTen inferences per case (default: as many as our spaced requests)")
    ap.add_argument("--anchor-venv", type=Path, default=Path(os.environ.get("ANCHOR_VENV", "/tmp/anchor-venv")),
                    help="CrypTen venv (default: $ANCHOR_VENV or /tmp/anchor-venv)")
    ap.add_argument("--anchor-setup", type=Path, default=ROOT.parent / "shared" / "anchors" / "crypten_setup.sh",
                    help="script that builds the CrypTen venv when it is missing")
    args = ap.parse_args(argv)
    names = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in names if c not in CASES]
    if unknown or not names:
        ap.error(f"unknown case(s) {unknown}; known: {sorted(CASES)}")
    if args.repeat is not None and args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if args.crypten_repeat is not None and args.crypten_repeat < 1:
        ap.error("--crypten-repeat must be >= 1")
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
    crypten: CryptenRunner | None = None
    if args.compare_crypten:
        crypten = CryptenRunner(args.anchor_venv.absolute(), args.anchor_setup.absolute(), workdir.absolute(),
                                repeat=args.crypten_repeat, threads=args.party_threads)
        try:
            crypten.ensure_venv()
        except SystemExit:
            if tmp is not None:
                tmp.cleanup()
            raise
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
                           stats=stats, pool_keys=pool_keys, crypten=crypten, calibrate=not args.no_calibrate)
            res["party_threads"] = args.party_threads
            res["dealer_nice"] = args.dealer_nice
            line = json.dumps(res)
            print(line, flush=True)
            results.append(res)
            if args.out:
                with args.out.open("a") as fh:
                    fh.write(line + "\n")
        log(f"dealer counters: {stats.counters()}")
        if crypten is not None and crypten.failed:
            rc = 1
            log("FAILED: a CrypTen reference run failed (its case line has crypten.error)")
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
