"""PyTorch <-> HE model description, HE-friendly training blocks, and the digits demo model.

* :class:`Square` / :class:`Poly` — activations to train HE-friendly networks with;
* :func:`from_torch` — an ``nn.Sequential`` of Conv2d / AvgPool2d / Flatten / Linear /
  Square / Poly (and ReLU or GELU, replaced by a degree-2 least-squares polynomial on a
  stated range when ``relu_bound`` / ``gelu_bound`` is given) to an
  :class:`~secureinfer.he.model.HEModel`; layers it cannot convert are kept by name so
  that :func:`~secureinfer.he.model.validate` lists all of them;
* :func:`conversion_report` — what replacing ReLU by a polynomial costs in accuracy;
* :func:`train_digits_he` — an x^2 network on scikit-learn's bundled 8x8 digits (no
  download), used by the tests, the bench and the demo.

torch's generator is used here only to initialise and shuffle training (not secret).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from secureinfer.he.model import HEModel, calibrate, forward, gelu_poly, relu_poly
from secureinfer.zoo import fit_classifier

__all__ = ["Poly", "Square", "activation_bounds", "conversion_report", "digits_split", "from_torch", "train_digits_he"]


class Square(nn.Module):
    """x -> x * x."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * x


class Poly(nn.Module):
    """x -> c0 + c1 x + c2 x^2 with fixed coefficients (ascending)."""

    def __init__(self, coeffs: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("coeffs", torch.tensor(list(coeffs) + [0.0] * (3 - len(coeffs)), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        c = self.coeffs.to(x.dtype)
        return c[0] + c[1] * x + c[2] * x * x


def _np(t: torch.Tensor) -> np.ndarray:
    return t.detach().cpu().double().numpy()


def activation_bounds(module: nn.Module, x: np.ndarray) -> list[float]:
    """max |input| of each ReLU/GELU of an ``nn.Sequential`` over samples ``x`` (in order)."""
    mods = list(module.children()) if isinstance(module, nn.Sequential) else [module]
    bounds: list[float] = []
    h = torch.from_numpy(np.asarray(x, dtype=np.float64))
    with torch.no_grad():
        for mod in mods:
            if isinstance(mod, (nn.ReLU, nn.GELU)):
                bounds.append(float(h.abs().max()))
            h = mod.double()(h)
    return bounds


def from_torch(module: nn.Module, input_shape: Sequence[int], *, name: str,
               relu_bound: float | str | None = None, gelu_bound: float | str | None = None,
               calibration: np.ndarray | None = None) -> HEModel:
    """Convert an ``nn.Sequential`` (see the module docstring); weights copied as float64.

    ``relu_bound`` / ``gelu_bound``: the range [-b, b] of the polynomial fit, or ``"auto"``
    to use each activation's max |input| over ``calibration`` samples.
    """
    layers: list[dict[str, Any]] = []
    weights: dict[str, np.ndarray] = {}
    mods = list(module.children()) if isinstance(module, nn.Sequential) else [module]
    auto: list[float] = []
    if "auto" in (relu_bound, gelu_bound):
        if calibration is None:
            raise ValueError('relu_bound="auto" needs calibration samples')
        auto = activation_bounds(module, calibration)
    k_act = 0
    for mod in mods:
        if isinstance(mod, (nn.ReLU, nn.GELU)):
            b_auto = auto[k_act] if auto else None
            k_act += 1
            rb = b_auto if relu_bound == "auto" else relu_bound
            gb = b_auto if gelu_bound == "auto" else gelu_bound
        else:
            rb = gb = None
        i = len(layers)
        if isinstance(mod, nn.Conv2d):
            layers.append({"type": "conv2d", "out_channels": mod.out_channels, "kernel_size": list(mod.kernel_size),
                           "stride": list(mod.stride), "padding": list(mod.padding)
                           if not isinstance(mod.padding, str) else mod.padding,
                           "dilation": list(mod.dilation), "groups": mod.groups})
            weights[f"{i}.weight"] = _np(mod.weight)
            if mod.bias is not None:
                weights[f"{i}.bias"] = _np(mod.bias)
        elif isinstance(mod, nn.Linear):
            layers.append({"type": "linear", "out_features": mod.out_features})
            weights[f"{i}.weight"] = _np(mod.weight)
            if mod.bias is not None:
                weights[f"{i}.bias"] = _np(mod.bias)
        elif isinstance(mod, nn.AvgPool2d):
            k = mod.kernel_size
            s = mod.stride if mod.stride is not None else k
            layers.append({"type": "avgpool2d", "kernel_size": [k, k] if isinstance(k, int) else list(k),
                           "stride": [s, s] if isinstance(s, int) else list(s)})
        elif isinstance(mod, nn.Flatten):
            layers.append({"type": "flatten"})
        elif isinstance(mod, Square):
            layers.append({"type": "square"})
        elif isinstance(mod, Poly):
            layers.append({"type": "poly", "coeffs": [float(c) for c in mod.coeffs]})
        elif isinstance(mod, nn.ReLU) and rb is not None:
            rb = float(rb)
            layers.append({"type": "poly", "coeffs": relu_poly(rb), "replaces": f"relu on [-{rb:g}, {rb:g}]"})
        elif isinstance(mod, nn.GELU) and gb is not None:
            gb = float(gb)
            layers.append({"type": "poly", "coeffs": gelu_poly(gb), "replaces": f"gelu on [-{gb:g}, {gb:g}]"})
        elif isinstance(mod, (nn.Dropout, nn.Identity)):
            continue
        else:
            layers.append({"type": type(mod).__name__.lower()})
    for ly in layers:  # drop default-valued conv keys so the description stays minimal
        if ly.get("type") == "conv2d":
            if ly.get("dilation") == [1, 1]:
                del ly["dilation"]
            if ly.get("groups") == 1:
                del ly["groups"]
    return HEModel(name=name, input_shape=tuple(int(s) for s in input_shape), layers=layers, weights=weights)


def conversion_report(original: nn.Module, converted: HEModel, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
    """Accuracy of the original (e.g. ReLU) model and of its HE-friendly conversion on (x, y)."""
    with torch.no_grad():
        orig = original.double()(torch.from_numpy(np.asarray(x, dtype=np.float64))).numpy()
    conv = forward(converted, np.asarray(x, dtype=np.float64))
    return {"accuracy_original": float((orig.argmax(1) == y).mean()),
            "accuracy_converted": float((conv.argmax(1) == y).mean()),
            "argmax_agreement": float((orig.argmax(1) == conv.argmax(1)).mean()),
            "max_abs_logit_diff": float(np.abs(orig - conv).max())}


def digits_split(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits in [0, 1], shape (N, 1, 8, 8), 70/30 stratified split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = (d.data / 16.0).reshape(-1, 1, 8, 8)
    x_tr, x_te, y_tr, y_te = train_test_split(x, d.target, test_size=0.3, random_state=seed, stratify=d.target)
    return x_tr, x_te, y_tr, y_te


def train_digits_he(*, kind: str = "cnn", epochs: int = 15, seed: int = 0,
                    ) -> tuple[HEModel, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Train an x^2 network on digits; returns (model, x_train, x_test, y_train, y_test).

    ``kind="cnn"``: conv 3x3 (4 channels) - x^2 - flatten - linear 144->32 - x^2 - linear
    32->10 (depth 5). ``kind="mlp"``: flatten - linear 64->32 - x^2 - linear 32->10 (depth 3).
    ``output_bound`` is calibrated on the training split.
    """
    x_tr, x_te, y_tr, y_te = digits_split(seed)
    torch.manual_seed(seed)  # initial weights of the demo HE model (not secret)
    if kind == "cnn":
        net = nn.Sequential(nn.Conv2d(1, 4, 3), Square(), nn.Flatten(), nn.Linear(144, 32), Square(),
                            nn.Linear(32, 10))
    elif kind == "mlp":
        net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), Square(), nn.Linear(32, 10))
    else:
        raise ValueError(f"kind must be 'cnn' or 'mlp', got {kind!r}")
    net = net.double()
    fit_classifier(net, torch.from_numpy(x_tr), torch.from_numpy(y_tr).long(), epochs=epochs, lr=3e-3, seed=seed,
                   batch_size=32)
    model = from_torch(net.eval(), (1, 8, 8), name=f"digits-{kind}")
    calibrate(model, x_tr)
    return model, x_tr, x_te, y_tr, y_te
