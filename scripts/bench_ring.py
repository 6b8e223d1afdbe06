"""Benchmark exact ring matmul/conv2d (secureinfer.ring) against one float64 op of the same shape.

Prints one JSON line per case: absolute times in microseconds (best of interleaved
repeats, each timing a batch of calls) of the float64 op, the ring op with a prepared right
operand / weight, the ring op without, and ``prepare`` alone, plus the ratios
ring / float64. The product target is a ratio <= ~15; tiny shapes are bound by per-call
overhead, so read their absolute times too.

    .venv/bin/python scripts/bench_ring.py [--threads N] [--device cpu|cuda] [--seconds S]
    .venv/bin/python scripts/bench_ring.py --models lenet,resnet --batch 64 [--device cuda]

``--models`` times, instead of the fixed shapes, every Conv2d and Linear layer of the zoo
models at ``--batch`` (the linear-layer compute of one secure inference: each party runs
one ring product per layer with the opened ``E``, the same shapes) and prints one JSON
line per model with the per-layer figures and their sums.

Inputs are uniform ring elements from torch's non-secret default generator (benchmark
data, not secrets).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from secureinfer import ring

MATMUL_CASES = [
    ((1, 784), (784, 128)),
    ((100, 784), (784, 128)),
    ((128, 128), (128, 128)),
    ((256, 1024), (1024, 1024)),
]
CONV_CASES = [((1, 1, 28, 28), (16, 1, 5, 5)), ((32, 16, 12, 12), (16, 16, 5, 5))]


def timeit(fns: dict[str, Callable[[], Any]], *, seconds: float, device: torch.device) -> dict[str, float]:
    """Microseconds per call of each function: best of interleaved repeats.

    The functions take turns inside every repeat so that load from other processes hits
    all of them alike; the best repeat is the one least disturbed by that load.
    """

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    inner: dict[str, int] = {}
    total = 0.0
    for name, fn in fns.items():
        fn()
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        once = max(time.perf_counter() - t0, 1e-6)
        inner[name] = max(1, int(0.01 / once))  # calls per repeat: about 10 ms
        total += once * inner[name]
    reps = max(5, min(100, int(seconds / total)))
    best = {name: math.inf for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(inner[name]):
                fn()
            sync()
            best[name] = min(best[name], (time.perf_counter() - t0) / inner[name])
    return {name: v * 1e6 for name, v in best.items()}


def ring_data(shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Non-secret benchmark data: torch's generator is fine here.
    return torch.randint(-(2**63), 2**63 - 1, shape, dtype=torch.int64).to(device)


def bench_case(
    kind: str, sa: tuple[int, ...], sb: tuple[int, ...], *, seconds: float, device: torch.device,
    opts: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Times of one exact ring product (``opts``: conv2d stride/padding/groups) vs float64."""
    opts = opts or {}
    a, b = ring_data(sa, device), ring_data(sb, device)
    af, bf = a.to(torch.float64), b.to(torch.float64)
    if kind == "matmul":
        pb = ring.prepare(b)
        f64, prep = (lambda: af @ bf), (lambda: ring.prepare(b))
        fast, slow = (lambda: ring.matmul(a, pb)), (lambda: ring.matmul(a, b))
        assert torch.equal(ring.matmul(a, pb), (a.cpu() @ b.cpu()).to(device))
    else:
        groups = opts.get("groups", 1)
        pb = ring.prepare_conv2d(b, groups=groups)
        f64, prep = (lambda: F.conv2d(af, bf, **opts)), (lambda: ring.prepare_conv2d(b, groups=groups))
        fast, slow = (lambda: ring.conv2d(a, pb, **opts)), (lambda: ring.conv2d(a, b, **opts))
    fns = {"float64": f64, "prepared": fast, "unprepared": slow, "prepare": prep}
    t = timeit(fns, seconds=seconds, device=device)
    return {
        "case": kind,
        "a": list(sa),
        "b": list(sb),
        "device": str(device),
        "threads": torch.get_num_threads(),
        "float64_us": round(t["float64"], 1),
        "ring_prepared_us": round(t["prepared"], 1),
        "ring_unprepared_us": round(t["unprepared"], 1),
        "prepare_us": round(t["prepare"], 1),
        "ratio_prepared": round(t["prepared"] / t["float64"], 2),
        "ratio_unprepared": round(t["unprepared"] / t["float64"], 2),
    }


def model_layers(name: str, batch: int) -> list[tuple[str, tuple[int, ...], tuple[int, ...], dict[str, Any]]]:
    """(kind, input shape, weight shape, conv options) of every Conv2d / Linear of a zoo model."""
    import torch.nn as nn

    from secureinfer import zoo

    model, shape = {"lenet": (zoo.lenet, (1, 28, 28)), "resnet": (zoo.small_resnet, (3, 32, 32))}[name]
    net = model().eval()
    found: list[tuple[str, tuple[int, ...], tuple[int, ...], dict[str, Any]]] = []

    def hook(mod: nn.Module, args: tuple[torch.Tensor, ...], _out: Any) -> None:
        x = args[0]
        if isinstance(mod, nn.Conv2d):
            opts = {"stride": mod.stride, "padding": mod.padding, "groups": mod.groups}
            found.append(("conv2d", tuple(x.shape), tuple(mod.weight.shape), opts))
        else:
            found.append(("matmul", tuple(x.shape), (mod.in_features, mod.out_features), {}))

    hs = [m.register_forward_hook(hook) for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        net(torch.zeros((batch, *shape)))
    for h in hs:
        h.remove()
    return found


def bench_model(name: str, batch: int, *, seconds: float, device: torch.device) -> dict[str, Any]:
    """Ring product of every linear layer of ``name`` at ``batch`` vs the float64 op, summed."""
    rows = [bench_case(kind, sa, sb, seconds=seconds / 4, device=device, opts=opts)
            for kind, sa, sb, opts in model_layers(name, batch)]
    f64, rg = sum(r["float64_us"] for r in rows), sum(r["ring_prepared_us"] for r in rows)
    return {"model": name, "batch": batch, "device": str(device), "threads": torch.get_num_threads(),
            "layers": len(rows), "float64_us_total": round(f64, 1), "ring_us_total": round(rg, 1),
            "ratio": round(rg / f64, 2), "per_layer": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--seconds", type=float, default=2.0, help="time budget per case")
    ap.add_argument("--models", default="", help="comma-separated zoo models (lenet, resnet): time their layers")
    ap.add_argument("--batch", type=int, default=64, help="batch for --models")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.models:
        for name in args.models.split(","):
            print(json.dumps(bench_model(name, args.batch, seconds=args.seconds, device=device)), flush=True)
        return
    for sa, sb in MATMUL_CASES:
        print(json.dumps(bench_case("matmul", sa, sb, seconds=args.seconds, device=device)), flush=True)
    for sa, sb in CONV_CASES:
        print(json.dumps(bench_case("conv2d", sa, sb, seconds=args.seconds, device=device)), flush=True)


if __name__ == "__main__":
    main()
