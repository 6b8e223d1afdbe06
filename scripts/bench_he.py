#!/usr/bin/env python3
"""Benchmark of the CKKS (HE) path: the CNN of issue 4 on 28x28 inputs, one JSON line per case.

Model: conv 7x7 stride 3, 4 channels -> x^2 -> FC 256->64 -> x^2 -> FC 64->10 (depth 5,
N = 8192, 128-bit security). Inputs: scikit-learn's bundled 8x8 digits upsampled 3x and
padded to 28x28 (no download); the CNN is trained on them for ``--epochs`` epochs (0 =
random weights). A real HE server runs in this process on a loopback port with mTLS and
the SDK talks to it over gRPC, so bytes up/down are what crosses the wire.

For each batch size (default: 1, 64, and 4096 = the slot count of one ciphertext, i.e.
every slot one image) it prints seconds per image for encrypt / evaluate (server) /
decrypt, the total, bytes up and down (ciphertexts; the session's keys separately), the
max |logit error| vs the float64 plaintext model and the argmax agreement. Batches up to
64 run twice and report the second (warm) run, the first one's total as ``first_total_s``.

A last line reports what replacing ReLU by a degree-2 polynomial costs: the same CNN with
ReLU, converted with each ReLU's observed input range, accuracy before and after.

Usage::

    python scripts/bench_he.py                  # batches 1, 64, 4096
    python scripts/bench_he.py --batches 1 64   # skip the big one (~1-2 minutes)
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from secureinfer.he.model import HEModel, calibrate, forward  # noqa: E402

__all__ = ["cnn28_model", "digits28", "relu_conversion", "run_he_bench"]


def digits28(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Digits 8x8 -> 24x24 (3x nearest) -> 28x28 (zero border), in [0, 1], shape (N, 1, 28, 28)."""
    from secureinfer.he.convert import digits_split

    out = []
    for part in digits_split(seed)[:2]:
        up = np.kron(part, np.ones((1, 1, 3, 3)))
        out.append(np.pad(up, ((0, 0), (0, 0), (2, 2), (2, 2))))
    x_tr, x_te = out
    _, _, y_tr, y_te = digits_split(seed)
    return x_tr, x_te, y_tr, y_te


def cnn28_model(*, epochs: int = 3, seed: int = 0) -> tuple[HEModel, np.ndarray, np.ndarray]:
    """The issue's CNN, trained on upsampled digits; returns (model, x_test, y_test)."""
    import torch
    from torch import nn

    from secureinfer.he.convert import Square, from_torch

    x_tr, x_te, y_tr, y_te = digits28(seed)
    torch.manual_seed(seed)  # initialisation / shuffling only (not secret)
    net = nn.Sequential(nn.Conv2d(1, 4, 7, stride=3), Square(), nn.Flatten(), nn.Linear(256, 64), Square(),
                        nn.Linear(64, 10)).double()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr).long()
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    model = from_torch(net.eval(), (1, 28, 28), name="cnn28")
    calibrate(model, x_tr)
    return model, x_te, y_te


def relu_conversion(*, epochs: int = 3, seed: int = 0) -> dict[str, object]:
    """Train the same CNN with ReLU, replace each ReLU by its degree-2 fit on the observed
    input range, and report what that costs in accuracy (plaintext, test split)."""
    import torch
    from torch import nn

    from secureinfer.he.convert import conversion_report, from_torch

    x_tr, x_te, y_tr, y_te = digits28(seed)
    torch.manual_seed(seed)  # initialisation / shuffling only (not secret)
    net = nn.Sequential(nn.Conv2d(1, 4, 7, stride=3), nn.ReLU(), nn.Flatten(), nn.Linear(256, 64), nn.ReLU(),
                        nn.Linear(64, 10)).double()
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    xt, yt = torch.from_numpy(x_tr), torch.from_numpy(y_tr).long()
    g = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=g)
        for i in range(0, len(xt), 32):
            idx = perm[i:i + 32]
            opt.zero_grad()
            nn.functional.cross_entropy(net(xt[idx]), yt[idx]).backward()
            opt.step()
    model = from_torch(net.eval(), (1, 28, 28), name="cnn28-relu", relu_bound="auto", calibration=x_tr)
    rep = conversion_report(net, model, x_te, y_te)
    res: dict[str, object] = {"case": "relu_to_poly_conversion",
                              "ranges": [ly["replaces"] for ly in model.layers if "replaces" in ly], **rep}
    print(json.dumps(res), flush=True)
    return res


def run_he_bench(batches: list[int], *, epochs: int = 3, timeout_s: float = 900.0) -> list[dict[str, object]]:
    """Run the HE cases and return one result dict per batch size (also printed as JSON lines)."""
    from secureinfer.certs import create_certificates
    from secureinfer.config import load_topology, write_local_topology
    from secureinfer.he.client import HEClient
    from secureinfer.he.server import serve
    from secureinfer.he.service import ServiceLimits

    model, x_te, y_te = cnn28_model(epochs=epochs)
    results = []
    with tempfile.TemporaryDirectory(prefix="secureinfer-bench-he-") as tmp:
        d = Path(tmp)
        cfg = write_local_topology(d / "topology.toml", base_dir=d, max_message_bytes=64 * 1024 * 1024)
        topo = load_topology(cfg)
        create_certificates(topo)
        srv = serve(topo, models=[model], limits=ServiceLimits(max_input_ciphertexts=4096), block=False)
        try:
            with HEClient(cfg, timeout_s=timeout_s) as client:
                for b in batches:
                    reps = np.resize(np.arange(len(x_te)), b)  # cycle through the test split
                    x = x_te[reps]
                    ref = forward(model, x)
                    first_total, session_bytes = None, 0
                    for _ in range(2 if b <= 64 else 1):
                        t0 = time.perf_counter()
                        y = client.infer("cnn28", x)
                        total = time.perf_counter() - t0
                        if first_total is None:
                            first_total, session_bytes = total, client.last_cost.session_bytes
                    c = client.last_cost
                    res: dict[str, object] = {
                        "case": "he_cnn28", "batch": b, "batch_pack": c.batch_pack,
                        "poly_modulus_degree": c.poly_modulus_degree, "depth": 5,
                        "encrypt_s_per_image": c.encrypt_s / b, "evaluate_s_per_image": c.evaluate_s / b,
                        "decrypt_s_per_image": c.decrypt_s / b, "total_s_per_image": total / b,
                        "first_total_s": first_total, "bytes_up": c.bytes_up - c.session_bytes,
                        "bytes_down": c.bytes_down, "session_key_bytes": session_bytes,
                        "rotations": c.rotations,
                        "max_abs_error": float(np.abs(y - ref).max()),
                        "argmax_agreement": float((y.argmax(1) == ref.argmax(1)).mean()),
                        "accuracy_he": float((y.argmax(1) == y_te[reps]).mean()),
                    }
                    print(json.dumps(res), flush=True)
                    results.append(res)
        finally:
            srv.stop()
    return results


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 64, 4096])
    p.add_argument("--epochs", type=int, default=3, help="training epochs of the CNN (0 = random weights)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--no-relu", action="store_true", help="skip the ReLU -> polynomial conversion report")
    args = p.parse_args(argv)
    run_he_bench(args.batches, epochs=args.epochs, timeout_s=args.timeout)
    if not args.no_relu:
        relu_conversion(epochs=args.epochs)
    return 0


if __name__ == "__main__":
    sys.exit(main())
