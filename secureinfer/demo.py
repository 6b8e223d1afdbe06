"""``secureinfer demo``: a whole secure-inference deployment on this machine.

1. throw-away certificates and a loopback topology under ``workdir``;
2. a dealer and two compute parties as separate processes (mTLS gRPC);
3. an MLP trained on scikit-learn's bundled digits data (no download);
4. the owner deploys it (weights exist only as secret shares on the parties);
5. the client runs secure inference on the test split; the demo prints plaintext vs
   secure accuracy, argmax agreement, max |logit error| and per-request costs;
6. everything is shut down.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from secureinfer.zoo import fit_classifier

__all__ = ["train_digits_mlp", "run_demo"]


def load_digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits, scaled to [0, 1], 70/30 split (deterministic)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).astype(np.float32)
    return tuple(train_test_split(x, d.target, test_size=0.3, random_state=seed, stratify=d.target))  # type: ignore[return-value]


def train_digits_mlp(x_train: np.ndarray, y_train: np.ndarray, *, hidden: int = 64, epochs: int = 60,
                     seed: int = 0) -> nn.Sequential:
    """A small MLP 64-hidden-hidden-10 on the flattened 8x8 digits."""
    torch.manual_seed(seed)  # initial weights of the demo model (not secret)
    model = nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))
    x, y = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    return fit_classifier(model, x, y, epochs=epochs, lr=1e-2, seed=seed)


def train_digits_cnn(x_train: np.ndarray, y_train: np.ndarray, *, epochs: int = 15, seed: int = 0) -> nn.Module:
    """The digits CNN of :func:`secureinfer.zoo.digits_cnn` trained on 8x8 images."""
    from secureinfer.zoo import digits_cnn

    x = torch.from_numpy(x_train).reshape(-1, 1, 8, 8)
    return fit_classifier(digits_cnn(seed=seed), x, torch.from_numpy(y_train).long(), epochs=epochs, lr=5e-3,
                          seed=seed)


def _secure_eval(client, name: str, x: np.ndarray, batch: int, desc: str) -> tuple[np.ndarray, list]:
    from tqdm import tqdm

    out, costs = [], []
    for i in tqdm(range(0, len(x), batch), desc=desc, unit="batch"):
        out.append(client.infer(name, x[i : i + batch]))
        costs.append(client.last_cost)
    return np.concatenate(out), costs


def run_demo(*, workdir: Path, samples: int = 0, batch: int = 32, dp: bool = False) -> int:
    from secureinfer.client.sdk import Client, deploy
    from secureinfer.localcluster import LocalCluster

    if workdir.exists():
        if any(workdir.iterdir()) and not (workdir / "cluster.toml").exists():
            from secureinfer.errors import ConfigError

            raise ConfigError(f"{workdir} is not empty and is not a demo directory; choose another --workdir")
        shutil.rmtree(workdir)  # a previous demo run: throw-away certificates and shares
    print(f"[1/5] certificates and topology in {workdir}", flush=True)
    cluster = LocalCluster(workdir)
    print("[2/5] starting dealer + 2 parties (mTLS gRPC on loopback)", flush=True)
    cluster.start()
    ok = True
    try:
        x_tr, x_te, y_tr, y_te = load_digits_split()
        if samples:
            x_te, y_te = x_te[:samples], y_te[:samples]
        print(f"[3/5] training an MLP and a CNN on sklearn digits ({len(x_tr)} train / {len(x_te)} test)", flush=True)
        models = {
            "digits-mlp": (train_digits_mlp(x_tr, y_tr), x_te),
            "digits-cnn": (train_digits_cnn(x_tr, y_tr), x_te.reshape(-1, 1, 8, 8)),
        }
        print("[4/5] deploying: weights are secret-shared, each party gets only its share", flush=True)
        for name, (model, x) in models.items():
            deploy(model, torch.from_numpy(x[:1]), name=name, config=cluster.config_path)
        if dp:
            dp_params = {"dp.epsilon": "4", "dp.delta": "1e-6", "dp.clip": "8", "dp.budget_epsilon": "100000",
                         "dp.budget_delta": "1e-3"}
            deploy(models["digits-mlp"][0], torch.from_numpy(x_te[:1]), name="digits-mlp-dp",
                   config=cluster.config_path, parameters=dp_params)
        print("[5/5] secure inference on the test split", flush=True)
        results = []
        with Client(cluster.config_path) as client:
            for name, (model, x) in models.items():
                with torch.no_grad():
                    plain = model(torch.from_numpy(x)).double().numpy()
                client.infer(name, x[:1])
                single = client.last_cost
                secure, costs = _secure_eval(client, name, x, batch, name)
                agree = float((secure.argmax(1) == plain.argmax(1)).mean())
                err = float(np.abs(secure - plain).max())
                ok = ok and agree == 1.0 and err <= 1e-2
                results.append({
                    "model": name, "test_samples": len(x),
                    "plaintext_accuracy": round(float((plain.argmax(1) == y_te).mean()), 4),
                    "secure_accuracy": round(float((secure.argmax(1) == y_te).mean()), 4),
                    "argmax_agreement": agree, "max_abs_logit_error": err,
                    "batch1": single.as_dict() if single else None,
                    f"batch{batch}_mean_latency_ms": round(float(np.mean([c.latency_ms for c in costs])), 2),
                    f"batch{batch}_rounds": costs[0].rounds, f"batch{batch}_bytes_online": costs[0].bytes_online,
                })
            if dp:
                model, x = models["digits-mlp"]
                with torch.no_grad():
                    plain = model(torch.from_numpy(x)).double().numpy()
                noisy, _ = _secure_eval(client, "digits-mlp-dp", x, batch, "digits-mlp-dp")
                results.append({
                    "model": "digits-mlp-dp", "mechanism": "Skellam noise shares added inside the MPC",
                    "epsilon_per_query": 4.0, "delta_per_query": 1e-6, "logit_clip": 8.0,
                    "epsilon_spent_total": float(client.last_info.get("dp.epsilon_spent", "nan")),
                    "plaintext_accuracy": round(float((plain.argmax(1) == y_te).mean()), 4),
                    "dp_accuracy": round(float((noisy.argmax(1) == y_te).mean()), 4),
                })
        for r in results:
            print(json.dumps(r))
        print("demo " + ("passed" if ok else "FAILED: secure and plaintext outputs disagree"))
        return 0 if ok else 1
    finally:
        t = time.perf_counter()
        cluster.stop()
        print(f"cluster stopped ({time.perf_counter() - t:.1f}s)", flush=True)
