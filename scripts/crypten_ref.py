"""CrypTen 0.4.1 reference run for ``scripts/bench.py --compare-crypten`` (one case per call).

Runs under the CrypTen anchor venv (``${ANCHOR_VENV:-/tmp/anchor-venv}``, built by
``/work/shared/anchors/crypten_setup.sh``), NOT under the project's venv::

    $ANCHOR_VENV/bin/python scripts/crypten_ref.py CASE.pt [--out RESULT.json]

``CASE.pt`` is written by ``bench.py`` (see :func:`save_case` there) with ``torch.save``
of plain containers and tensors only, and is read back with ``torch.load(...,
weights_only=True)``::

    {"format": "secureinfer-crypten-ref/1", "case": str, "batch": int,
     "layers": [{"type": "linear"|"conv2d"|"relu"|"maxpool2d"|"avgpool2d"|"flatten", ...}],
     "state_dict": {name: tensor},      # the case model's own state_dict
     "inputs": [tensor, ...],           # the exact input batches bench.py measured
     "plain_logits": [tensor, ...],     # bench.py's float32 torch outputs for those inputs
     "repeats": int, "warmup": int, "threads": int | None}

The script rebuilds the torch model from ``layers`` (same module indices, so the
``state_dict`` loads with ``strict=True``), checks that its plaintext outputs equal
``plain_logits`` (same weights, same inputs: it exits 3 otherwise), converts it layer by
layer to ``crypten.nn``, and runs CrypTen with 2 parties (``run_multiprocess``; the
default tuple provider, TFP). The model is encrypted once by party 0 (like a deploy);
each timed inference encrypts a batch at party 1, runs the forward pass and reveals the
output (``get_plain_text``), cycling through ``inputs``. It prints ONE JSON line::

    {"case", "batch", "crypten_version", "torch_version", "provider", "world_size",
     "torch_threads", "repeats", "warmup", "latency_ms_median", "latency_ms_p90",
     "latency_ms_min", "latency_ms_all", "rounds", "bytes", "bytes_per_party_logged",
     "argmax_agreement", "max_abs_error", "samples", "inputs_identical_max_diff"}

``latency_ms_*`` per inference: each party times each inference, the slower party's time
counts. ``rounds``: CrypTen's communication rounds per inference (the larger of the two
parties' counters). ``bytes``: bytes sent by all parties together per inference, the
same convention as bench.py's ``bytes_online``; CrypTen logs, per party, what the party
sent plus what it received, so this is (party 0 + party 1) / 2, and
``bytes_per_party_logged`` gives the raw per-party counters. Accuracy figures compare
every timed output with plaintext torch on the same batch.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

FORMAT = "secureinfer-crypten-ref/1"


def _stub_removed_onnx_module() -> None:
    # CrypTen 0.4.1 imports a module that torch >= 2.5 removed; stub it (as the anchor does).
    reg = types.ModuleType("registration")
    reg.registry = None
    sys.modules.setdefault("torch.onnx._internal.registration", reg)


def torch_model(layers: list[dict[str, Any]]):
    """The plaintext torch model described by ``layers`` (nn.Sequential, same indices)."""
    import torch.nn as nn

    mods = []
    for spec in layers:
        t = spec["type"]
        if t == "linear":
            mods.append(nn.Linear(spec["in"], spec["out"], bias=spec["bias"]))
        elif t == "conv2d":
            mods.append(nn.Conv2d(spec["in"], spec["out"], spec["kernel"], stride=spec["stride"],
                                  padding=spec["padding"], bias=spec["bias"]))
        elif t == "relu":
            mods.append(nn.ReLU())
        elif t == "maxpool2d":
            mods.append(nn.MaxPool2d(spec["kernel"], stride=spec["stride"], padding=spec["padding"]))
        elif t == "avgpool2d":
            mods.append(nn.AvgPool2d(spec["kernel"], stride=spec["stride"], padding=spec["padding"]))
        elif t == "flatten":
            mods.append(nn.Flatten())
        else:
            raise ValueError(f"layer type {t!r} not supported by the CrypTen reference runner")
    return nn.Sequential(*mods).eval()


def crypten_model(model):
    """The same network in ``crypten.nn``, weights copied from the torch model."""
    import crypten.nn as cnn
    import torch.nn as nn

    out = []
    for m in model:
        if isinstance(m, nn.Linear):
            c = cnn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
        elif isinstance(m, nn.Conv2d):
            c = cnn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, stride=m.stride,
                           padding=m.padding, bias=m.bias is not None)
        elif isinstance(m, nn.ReLU):
            out.append(cnn.ReLU())
            continue
        elif isinstance(m, nn.MaxPool2d):
            out.append(cnn.MaxPool2d(m.kernel_size, stride=m.stride, padding=m.padding))
            continue
        elif isinstance(m, nn.AvgPool2d):
            out.append(cnn.AvgPool2d(m.kernel_size, stride=m.stride, padding=m.padding))
            continue
        elif isinstance(m, nn.Flatten):
            out.append(cnn.Flatten())
            continue
        else:
            raise ValueError(f"module {type(m).__name__} not supported by the CrypTen reference runner")
        c.weight.data = m.weight.data.clone()
        if m.bias is not None:
            c.bias.data = m.bias.data.clone()
        out.append(c)
    return cnn.Sequential(*out)


def load_case(path: Path) -> dict[str, Any]:
    import torch

    data = torch.load(path, weights_only=True)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path}: not a {FORMAT} file")
    return data


def _pct(values: list[float], q: float) -> float:
    """Linear-interpolation percentile (numpy's default), without numpy."""
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def _party(data: dict[str, Any]) -> dict[str, Any]:
    """One CrypTen party (rank 0 or 1) running the whole measurement."""
    import crypten
    import crypten.communicator as comm
    import torch
    from crypten.config import cfg

    if data.get("threads"):
        torch.set_num_threads(int(data["threads"]))
    cfg.communicator.verbose = True  # count rounds and bytes
    rank = comm.get().get_rank()
    model = torch_model(data["layers"])
    model.load_state_dict(data["state_dict"], strict=True)
    cm = crypten_model(model).encrypt(src=0)
    cm.eval()
    inputs = data["inputs"]

    def infer(x: torch.Tensor) -> torch.Tensor:
        xe = crypten.cryptensor(x, src=1)
        return cm(xe).get_plain_text()

    for i in range(data["warmup"]):
        infer(inputs[i % len(inputs)])
    comm.get().barrier()
    comm.get().reset_communication_stats()
    times, outs = [], []
    for i in range(data["repeats"]):
        x = inputs[i % len(inputs)]
        t0 = time.perf_counter()
        y = infer(x)
        times.append((time.perf_counter() - t0) * 1e3)
        outs.append(y)
    st = comm.get().get_communication_stats()
    reps = data["repeats"]
    # The result goes to a file, not through run_multiprocess's queue: it joins the parties
    # before reading the queue, so a result larger than a pipe buffer (64 KiB: e.g. batch
    # 100 x 10 logits x 10 repeats) blocks the exiting party forever.
    res = {"rank": rank, "times_ms": times, "outs": [y.tolist() for y in outs] if rank == 0 else None,
           "rounds": st["rounds"] / reps, "bytes": st["bytes"] / reps,
           "provider": str(cfg.mpc.provider), "threads": torch.get_num_threads()}
    Path(data["result_dir"], f"rank{rank}.json").write_text(json.dumps(res))
    return None


def run(data: dict[str, Any]) -> dict[str, Any]:
    _stub_removed_onnx_module()
    import crypten
    import torch

    # No torch compute in this process before the parties are forked: a forked child
    # whose parent already started torch's OpenMP thread pool deadlocks in its first
    # parallel op (seen with more than one thread per party).
    world = 2
    launch = crypten.mpc.run_multiprocess(world_size=world)(_party)
    with tempfile.TemporaryDirectory(prefix="crypten-ref-") as tmp:
        if launch({**data, "result_dir": tmp}) is None:
            raise RuntimeError("a CrypTen party failed (see its log above)")
        files = [Path(tmp, f"rank{r}.json") for r in range(world)]
        if not all(f.exists() for f in files):
            raise RuntimeError("a CrypTen party wrote no result (see its log above)")
        res = [json.loads(f.read_text()) for f in files]

    model = torch_model(data["layers"])
    model.load_state_dict(data["state_dict"], strict=True)
    inputs, ours = data["inputs"], data["plain_logits"]
    with torch.no_grad():
        plain = [model(x) for x in inputs]
    same = max(float((p - q).abs().max()) for p, q in zip(plain, ours, strict=True))
    if same > 1e-5:
        raise SystemExit(3)  # reported by main(); weights or inputs differ from bench.py's
    res = sorted(res, key=lambda r: r["rank"])
    per_rep = [max(r["times_ms"][i] for r in res) for i in range(data["repeats"])]
    outs = [torch.tensor(y, dtype=torch.float64) for y in res[0]["outs"]]
    refs = [plain[i % len(plain)] for i in range(len(outs))]
    got, ref = torch.cat(outs).double(), torch.cat(refs).double()
    return {
        "case": data["case"],
        "batch": data["batch"],
        "crypten_version": getattr(crypten, "__version__", "unknown"),
        "torch_version": torch.__version__,
        "provider": res[0]["provider"],
        "world_size": world,
        "torch_threads": res[0]["threads"],
        "repeats": data["repeats"],
        "warmup": data["warmup"],
        "latency_ms_median": round(_pct(per_rep, 50), 2),
        "latency_ms_p90": round(_pct(per_rep, 90), 2),
        "latency_ms_min": round(min(per_rep), 2),
        "latency_ms_all": [round(t, 2) for t in per_rep],
        "rounds": max(r["rounds"] for r in res),
        "bytes": sum(r["bytes"] for r in res) / 2,
        "bytes_per_party_logged": [r["bytes"] for r in res],
        "argmax_agreement": float((got.argmax(1) == ref.argmax(1)).double().mean()),
        "max_abs_error": float((got - ref).abs().max()),
        "samples": int(got.shape[0]),
        "inputs_identical_max_diff": same,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("case_file", type=Path, nargs="?")
    ap.add_argument("--out", type=Path, default=None, help="also write the JSON line here")
    ap.add_argument("--check", action="store_true", help="only check that CrypTen imports (exit 0)")
    args = ap.parse_args(argv)
    if args.check:
        _stub_removed_onnx_module()
        import crypten  # noqa: F401

        return 0
    if args.case_file is None:
        ap.error("a case file is required (or --check)")
    data = load_case(args.case_file)
    try:
        res = run(data)
    except SystemExit as exc:
        if exc.code == 3:
            print(f"[crypten_ref] {data['case']}: plaintext outputs differ from bench.py's: "
                  "weights or inputs are not identical", file=sys.stderr)
        raise
    line = json.dumps(res)
    print(line, flush=True)
    if args.out:
        args.out.write_text(line + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
