"""Benchmark the DCF of secureinfer.fss: gen / eval time and key size.

Prints one JSON object per configuration (N, n_bits, k) to stdout:
``{"bench": "dcf", "N", "n_bits", "k", "gen_ms", "gen_cpu_ms", "eval_ms",
"eval_ms_median", "eval_cpu_ms", "key_bytes", "key_bytes_per_instance",
"key_bytes_formula", "ok"}``, where times are the best (and median) wall-clock and
best process-CPU milliseconds of ``--repeat`` runs on one core, ``key_bytes`` is one party's
serialized key, and ``ok`` says both parties' shares summed to beta * 1{x < alpha}.

    .venv/bin/python scripts/bench_fss.py [--repeat 7] [--config N,n_bits,k ...]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import numpy as np

from secureinfer.fss import dcf_eval, dcf_gen
from secureinfer.prg import Prg

DEFAULT_CONFIGS = [(256, 28, 3), (25600, 28, 3), (25600, 62, 3), (256, 28, 1)]


def _times(fn: Callable[[], object], repeat: int) -> tuple[list[float], list[float]]:
    """Wall-clock and process-CPU milliseconds of ``repeat`` calls (CPU time is the
    steadier number on a shared machine; the code is single-threaded)."""
    wall, cpu = [], []
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return wall, cpu


def bench(n_inst: int, n_bits: int, k: int, *, repeat: int) -> dict[str, object]:
    """Time dcf_gen and party 0's dcf_eval for one configuration."""
    prg = Prg.from_os()
    mask = np.uint64((1 << n_bits) - 1)
    alpha = prg.uint64(n_inst)
    beta = prg.uint64((n_inst, k))
    x = prg.uint64(n_inst)
    keys = dcf_gen(alpha, beta, n_bits=n_bits, prg=prg)
    gen_ms, gen_cpu = _times(lambda: dcf_gen(alpha, beta, n_bits=n_bits, prg=prg), max(1, repeat // 2))
    dcf_eval(keys[0], x)  # warm-up
    eval_ms, eval_cpu = _times(lambda: dcf_eval(keys[0], x), repeat)
    total = dcf_eval(keys[0], x) + dcf_eval(keys[1], x)
    expect = np.where(((x & mask) < (alpha & mask))[:, None], beta, np.uint64(0))
    key_bytes = keys[0].nbytes
    return {
        "bench": "dcf",
        "N": n_inst,
        "n_bits": n_bits,
        "k": k,
        "gen_ms": round(min(gen_ms), 3),
        "gen_cpu_ms": round(min(gen_cpu), 3),
        "eval_ms": round(min(eval_ms), 3),
        "eval_ms_median": round(statistics.median(eval_ms), 3),
        "eval_cpu_ms": round(min(eval_cpu), 3),
        "key_bytes": key_bytes,
        "key_bytes_per_instance": round(key_bytes / n_inst, 3),
        "key_bytes_formula": 16 + n_bits * (16 + 8 * k + 2 / 8) + 8 * k,
        "ok": bool(np.array_equal(total, expect)),
    }


def _config(text: str) -> tuple[int, int, int]:
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError("expected N,n_bits,k")
    return parts[0], parts[1], parts[2]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=7, help="timed runs per measurement (best is reported)")
    ap.add_argument("--config", type=_config, action="append", help="N,n_bits,k (repeatable)")
    args = ap.parse_args(argv)
    for n_inst, n_bits, k in args.config or DEFAULT_CONFIGS:
        print(json.dumps(bench(n_inst, n_bits, k, repeat=args.repeat)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
