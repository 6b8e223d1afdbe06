"""HE model description: a short list of HE-friendly layers plus numpy weights.

An :class:`HEModel` is *public architecture* (``layers``: JSON-able dicts) plus *weights*
(float64 numpy arrays named ``"<layer index>.<name>"``). The architecture is what the HE
server publishes in its model metadata (the client needs it to choose CKKS parameters and
rotation keys); the weights never leave the server.

Layer types (``"type"`` key) and their other keys:

* ``conv2d``: ``out_channels``, ``kernel_size`` [kh, kw], ``stride`` [sh, sw], ``padding``
  [ph, pw]; weights ``weight`` (O, C, kh, kw) and ``bias`` (O,) (bias optional).
* ``avgpool2d``: ``kernel_size``, ``stride`` (no padding).
* ``flatten``: (C, H, W) -> (C*H*W,), row-major like ``torch.flatten``.
* ``linear``: ``out_features``; weights ``weight`` (out, in), ``bias`` (out,) optional.
* ``square``: x -> x*x elementwise.
* ``poly``: ``coeffs`` [c0, c1, c2] (ascending), x -> c0 + c1 x + c2 x^2; degree <= 2.

Anything else (``relu``, ``maxpool2d``, ``gelu``, ...) is kept in the description so that
:func:`validate` can name it: it raises one :class:`~secureinfer.errors.UnsupportedModelError`
listing *every* layer that cannot run under CKKS, with a hint (e.g. use
:func:`relu_poly`).

File format (``.npz``, loaded with ``allow_pickle=False``): the weights under their names
plus ``__model__``, the architecture as UTF-8 JSON in a uint8 array. No pickle anywhere.

The plaintext reference :func:`forward` runs the same model in float64 with
``torch.nn.functional`` (independently of the HE lowering), which the tests use to check
the encrypted path.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from secureinfer.errors import InvalidArgumentError, ShapeError, UnsupportedModelError

__all__ = [
    "FORMAT",
    "HEModel",
    "SUPPORTED_LAYERS",
    "calibrate",
    "forward",
    "gelu_poly",
    "layer_shapes",
    "load_model",
    "relu_poly",
    "save_model",
    "validate",
]

FORMAT = "secureinfer.he/1"
SUPPORTED_LAYERS = ("conv2d", "avgpool2d", "flatten", "linear", "square", "poly")
_HINTS = {
    "relu": "ReLU is not a polynomial: replace it by poly(relu_poly(r)) over the input range [-r, r]",
    "gelu": "GELU is not a polynomial: replace it by poly(gelu_poly(r)) over the input range [-r, r]",
    "maxpool2d": "max pooling needs comparisons: use avgpool2d",
    "sigmoid": "sigmoid is not a polynomial: fit a degree-2 polynomial over the input range",
    "tanh": "tanh is not a polynomial: fit a degree-2 polynomial over the input range",
    "softmax": "softmax needs division and exp: return logits and apply softmax after decryption",
}
_MODEL_KEY = "__model__"


def _pair(v: Any, name: str, problems: list[str], where: str) -> tuple[int, int]:
    if isinstance(v, int) and not isinstance(v, bool):
        return (v, v)
    if isinstance(v, (list, tuple)) and len(v) == 2 and all(isinstance(t, int) and not isinstance(t, bool) for t in v):
        return (int(v[0]), int(v[1]))
    problems.append(f"{where}: {name} must be an int or [int, int], got {v!r}")
    return (1, 1)


@dataclass
class HEModel:
    """An HE-friendly network: public ``layers`` plus private ``weights``.

    ``input_shape`` excludes the batch dimension: (C, H, W) for image models, (F,) for
    vectors. ``output_bound`` (optional) is a bound on |output| found by :func:`calibrate`;
    parameter selection uses it to size the last modulus.
    """

    name: str
    input_shape: tuple[int, ...]
    layers: list[dict[str, Any]]
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    output_bound: float | None = None

    def architecture(self) -> dict[str, Any]:
        """The public part (no weights) as a JSON-able dict."""
        arch: dict[str, Any] = {
            "format": FORMAT,
            "name": self.name,
            "input_shape": list(self.input_shape),
            "layers": [dict(layer) for layer in self.layers],
        }
        if self.output_bound is not None:
            arch["output_bound"] = float(self.output_bound)
        return arch

    def architecture_json(self) -> str:
        return json.dumps(self.architecture(), sort_keys=True)

    @classmethod
    def from_architecture(cls, arch: Mapping[str, Any] | str, weights: Mapping[str, np.ndarray] | None = None) -> HEModel:
        """Rebuild from :meth:`architecture` output (weights optional: structure only)."""
        if isinstance(arch, str):
            try:
                arch = json.loads(arch)
            except json.JSONDecodeError as exc:
                raise InvalidArgumentError(f"model architecture is not valid JSON: {exc}") from None
        if not isinstance(arch, Mapping) or arch.get("format") != FORMAT:
            raise InvalidArgumentError(f"not an HE model description (expected format {FORMAT!r})")
        try:
            shape = tuple(int(s) for s in arch["input_shape"])
            layers = [dict(layer) for layer in arch["layers"]]
            name = str(arch["name"])
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"malformed HE model description: {exc!r}") from None
        bound = arch.get("output_bound")
        return cls(name=name, input_shape=shape, layers=layers,
                   weights={k: np.asarray(v, dtype=np.float64) for k, v in (weights or {}).items()},
                   output_bound=float(bound) if bound is not None else None)

    @property
    def output_size(self) -> int:
        return int(np.prod(layer_shapes(self)[-1]))


def layer_shapes(model: HEModel, *, problems: list[str] | None = None) -> list[tuple[int, ...]]:
    """Shapes (without batch) before the first layer and after each layer.

    With ``problems`` given, shape errors are appended there and inference continues as
    far as it can; without it the first error raises ShapeError.
    """
    own: list[str] = [] if problems is None else problems
    shape: tuple[int, ...] = tuple(model.input_shape)
    shapes = [shape]
    for i, layer in enumerate(model.layers):
        kind = layer.get("type")
        where = f"layer {i} ({kind})"
        if kind not in SUPPORTED_LAYERS:
            # the output shape of an unknown layer is unknown: stop checking shapes here
            shapes += [shape] * (len(model.layers) - i)
            break
        if kind == "conv2d":
            if len(shape) != 3:
                own.append(f"{where}: needs a (C, H, W) input, got shape {shape}")
            else:
                c, h, w = shape
                kh, kw = _pair(layer.get("kernel_size"), "kernel_size", own, where)
                sh, sw = _pair(layer.get("stride", 1), "stride", own, where)
                ph, pw = _pair(layer.get("padding", 0), "padding", own, where)
                o = layer.get("out_channels")
                if not isinstance(o, int) or o < 1:
                    own.append(f"{where}: out_channels must be a positive int, got {o!r}")
                    o = 1
                if min(kh, kw, sh, sw) < 1 or min(ph, pw) < 0:
                    own.append(f"{where}: kernel/stride must be >= 1 and padding >= 0")
                else:
                    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
                    if ho < 1 or wo < 1:
                        own.append(f"{where}: kernel {kh}x{kw} does not fit input {h}x{w}")
                    else:
                        shape = (o, ho, wo)
                        _check_weight(model, i, "weight", (o, c, kh, kw), own)
                        _check_weight(model, i, "bias", (o,), own, optional=True)
        elif kind == "avgpool2d":
            if len(shape) != 3:
                own.append(f"{where}: needs a (C, H, W) input, got shape {shape}")
            else:
                c, h, w = shape
                kh, kw = _pair(layer.get("kernel_size"), "kernel_size", own, where)
                sh, sw = _pair(layer.get("stride", layer.get("kernel_size")), "stride", own, where)
                if min(kh, kw, sh, sw) < 1 or kh > h or kw > w:
                    own.append(f"{where}: bad pooling window {kh}x{kw} stride {sh}x{sw} on {h}x{w}")
                else:
                    shape = (c, (h - kh) // sh + 1, (w - kw) // sw + 1)
        elif kind == "flatten":
            shape = (int(np.prod(shape)),)
        elif kind == "linear":
            o = layer.get("out_features")
            if len(shape) != 1:
                own.append(f"{where}: needs a flat input (add a flatten layer), got shape {shape}")
            elif not isinstance(o, int) or o < 1:
                own.append(f"{where}: out_features must be a positive int, got {o!r}")
            else:
                _check_weight(model, i, "weight", (o, shape[0]), own)
                _check_weight(model, i, "bias", (o,), own, optional=True)
                shape = (o,)
        elif kind in ("square", "poly"):
            pass
        shapes.append(shape)
        if problems is None and own:
            raise ShapeError(own[0])
    return shapes


def _check_weight(model: HEModel, i: int, name: str, shape: tuple[int, ...], problems: list[str],
                  *, optional: bool = False) -> None:
    key = f"{i}.{name}"
    w = model.weights.get(key)
    if w is None:
        if not optional and model.weights:
            problems.append(f"layer {i}: missing weight {key!r} of shape {shape}")
        return
    if tuple(w.shape) != shape:
        problems.append(f"layer {i}: weight {key!r} has shape {tuple(w.shape)}, expected {shape}")
    elif not np.all(np.isfinite(w)):
        problems.append(f"layer {i}: weight {key!r} has non-finite values")


def validate(model: HEModel) -> None:
    """Raise one UnsupportedModelError listing every layer that cannot run under CKKS.

    Checks layer types (with a hint for each unsupported one), polynomial degrees, layer
    hyperparameters, shapes and weight shapes. A model without weights (architecture only,
    as a client sees it) is checked for everything but the weights.
    """
    problems: list[str] = []
    if len(model.input_shape) not in (1, 3) or any(int(s) < 1 for s in model.input_shape):
        problems.append(f"input_shape must be (F,) or (C, H, W) with positive sizes, got {model.input_shape}")
    for i, layer in enumerate(model.layers):
        kind = layer.get("type")
        if kind not in SUPPORTED_LAYERS:
            hint = _HINTS.get(str(kind), f"supported layers: {', '.join(SUPPORTED_LAYERS)}")
            problems.append(f"layer {i} ({kind}): cannot run under CKKS; {hint}")
        elif kind == "poly":
            coeffs = layer.get("coeffs")
            if (not isinstance(coeffs, (list, tuple)) or not coeffs
                    or not all(isinstance(c, (int, float)) and math.isfinite(c) for c in coeffs)):
                problems.append(f"layer {i} (poly): coeffs must be a non-empty list of finite numbers")
            else:
                deg = max((k for k, c in enumerate(coeffs) if c != 0), default=0)
                if deg > 2:
                    problems.append(f"layer {i} (poly): degree {deg} > 2 is not supported; fit a degree-2 polynomial")
        elif kind == "conv2d":
            for key in ("dilation", "groups"):
                if layer.get(key, 1) not in (1, [1, 1], (1, 1)):
                    problems.append(f"layer {i} (conv2d): {key} != 1 is not supported")
    layer_shapes(model, problems=problems)  # collects shape problems; never raises
    if problems:
        raise UnsupportedModelError(f"model {model.name!r} cannot run under CKKS", problems)


# ----------------------------------------------------------------------------- I/O


def save_model(model: HEModel, path: str | os.PathLike[str]) -> Path:
    """Write ``model`` as one ``.npz`` (weights + architecture JSON); return the path."""
    validate(model)
    out = Path(path)
    arrays = {k: np.asarray(v, dtype=np.float64) for k, v in model.weights.items()}
    if _MODEL_KEY in arrays:
        raise InvalidArgumentError(f"weight name {_MODEL_KEY!r} is reserved")
    arrays[_MODEL_KEY] = np.frombuffer(model.architecture_json().encode(), dtype=np.uint8)
    with open(out, "wb") as fh:
        np.savez(fh, **arrays)
    return out


def load_model(path: str | os.PathLike[str]) -> HEModel:
    """Read a model written by :func:`save_model` (no pickle) and validate it."""
    p = Path(path)
    try:
        with np.load(p, allow_pickle=False) as data:
            if _MODEL_KEY not in data.files:
                raise InvalidArgumentError(f"{p} is not an HE model file (no {_MODEL_KEY!r} entry)")
            arch = bytes(data[_MODEL_KEY].astype(np.uint8)).decode()
            weights = {k: np.asarray(data[k], dtype=np.float64) for k in data.files if k != _MODEL_KEY}
    except FileNotFoundError:
        raise InvalidArgumentError(f"model file {p} does not exist") from None
    except (OSError, ValueError) as exc:
        raise InvalidArgumentError(f"cannot read HE model file {p}: {exc}") from None
    model = HEModel.from_architecture(arch, weights)
    validate(model)
    return model


# ----------------------------------------------------------------------------- reference


def forward(model: HEModel, x: np.ndarray) -> np.ndarray:
    """Plaintext float64 reference: (B, *input_shape) -> (B, n_outputs).

    Uses ``torch.nn.functional`` so that it is independent of the HE lowering.
    """
    import torch
    import torch.nn.functional as F  # noqa: N812

    validate(model)
    t = torch.as_tensor(np.asarray(x, dtype=np.float64))
    if tuple(t.shape[1:]) != tuple(model.input_shape):
        raise ShapeError(f"input shape {tuple(t.shape)}; expected (batch, {', '.join(map(str, model.input_shape))})")
    w = {k: torch.as_tensor(v) for k, v in model.weights.items()}
    for i, layer in enumerate(model.layers):
        kind = layer["type"]
        if kind == "conv2d":
            t = F.conv2d(t, w[f"{i}.weight"], w.get(f"{i}.bias"), stride=tuple(_as2(layer.get("stride", 1))),
                         padding=tuple(_as2(layer.get("padding", 0))))
        elif kind == "avgpool2d":
            k = _as2(layer["kernel_size"])
            t = F.avg_pool2d(t, tuple(k), stride=tuple(_as2(layer.get("stride", k))))
        elif kind == "flatten":
            t = t.reshape(t.shape[0], -1)
        elif kind == "linear":
            t = F.linear(t, w[f"{i}.weight"], w.get(f"{i}.bias"))
        elif kind == "square":
            t = t * t
        elif kind == "poly":
            c = list(layer["coeffs"]) + [0.0, 0.0, 0.0]
            t = c[0] + c[1] * t + c[2] * t * t
    return t.reshape(t.shape[0], -1).numpy()


def _as2(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(v[0]), int(v[1])]


def calibrate(model: HEModel, x: np.ndarray, *, margin: float = 2.0) -> float:
    """Set and return ``model.output_bound`` = margin * max |output| over samples ``x``."""
    y = forward(model, x)
    bound = float(margin * max(1.0, float(np.max(np.abs(y)))))
    model.output_bound = bound
    return bound


# ----------------------------------------------------------------------------- activations


def _fit(fn: np.ndarray, grid: np.ndarray) -> list[float]:
    # least squares over a uniform grid = L2 fit over the interval (deterministic, no sampling)
    coeffs = np.polynomial.polynomial.polyfit(grid, fn, 2)
    return [float(c) for c in coeffs]


def relu_poly(bound: float) -> list[float]:
    """Degree-2 least-squares approximation of ReLU on [-bound, bound] (ascending coeffs).

    Closed form of the L2 fit: 3b/32 + x/2 + 15/(32 b) x^2; the error is largest at 0
    and at the ends (about 0.094 * bound). Outside the range the polynomial diverges from
    ReLU quadratically, so ``bound`` must cover the layer's inputs.
    """
    if not bound > 0:
        raise InvalidArgumentError(f"relu_poly bound must be > 0, got {bound}")
    grid = np.linspace(-bound, bound, 4001)
    return _fit(np.maximum(grid, 0.0), grid)


def gelu_poly(bound: float) -> list[float]:
    """Degree-2 least-squares approximation of GELU (erf form) on [-bound, bound]."""
    if not bound > 0:
        raise InvalidArgumentError(f"gelu_poly bound must be > 0, got {bound}")
    from math import erf, sqrt

    grid = np.linspace(-bound, bound, 4001)
    fn = np.array([0.5 * g * (1.0 + erf(g / sqrt(2.0))) for g in grid])
    return _fit(fn, grid)
