"""Lower an :class:`~secureinfer.he.model.HEModel` to the three operations CKKS runs.

Every HE-friendly layer is either linear in its input or a degree-2 polynomial applied
elementwise, so a model becomes a list of

* :class:`LinearStep` — y = M x + b with a sparse matrix M over the flattened (C, H, W)
  features (conv2d, avgpool2d, linear; flatten is free); costs one rescale;
* :class:`SquareStep` — y = x * x (ciphertext product, relinearise, rescale);
* :class:`AffineStep` — y = a * x + s elementwise; free when a == 1, else one rescale.

Folding (so that depth = number of multiplications that cannot be avoided):

1. ``poly`` c0 + c1 x + c2 x^2 with c2 != 0 becomes affine(1, c1/2c2), square,
   affine(c2, c0 - c1^2/4c2) (completing the square); with c2 == 0 it is affine(c1, c0).
2. An affine after a linear step folds into its rows (diag(a) M, a b + s); an affine
   before a linear step folds into its columns (M diag(a), b + M s); consecutive affines
   merge; affine(a, s) before a square becomes affine(1, s/a), square, affine(a^2, 0).
3. Consecutive linear steps merge into one sparse product (conv then avgpool costs one
   level, not two).

So a degree-2 activation between linear layers costs exactly one level (the square).

The first layer, when it is a conv2d, also gets an *im2col* form: a gather index (the
client expands its own input into kernel-window features before encrypting, as in the
TenSEAL tutorial and Gazelle/LoLa layouts) and the same linear map over the expanded
features; the layout planner decides per batch size whether that is cheaper.

``structural=True`` lowers the public architecture alone (weights replaced by ones), which
gives a superset of the non-zero pattern: client and server plan the same ciphertext layout
and rotation keys from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import scipy.sparse as sp

from secureinfer.he.model import HEModel, layer_shapes, validate

__all__ = ["AffineStep", "LinearStep", "Program", "SquareStep", "lower"]


@dataclass
class LinearStep:
    """y = matrix @ x + bias. ``expanded``: the same map over im2col features (first step)."""

    matrix: sp.csr_matrix
    bias: np.ndarray
    expanded: sp.csr_matrix | None = None

    @property
    def out_size(self) -> int:
        return int(self.matrix.shape[0])


@dataclass
class SquareStep:
    """y = x * x elementwise."""


@dataclass
class AffineStep:
    """y = scale * x + shift elementwise."""

    scale: np.ndarray
    shift: np.ndarray

    @property
    def unit_scale(self) -> bool:
        return bool(np.all(self.scale == 1.0))


Step = LinearStep | SquareStep | AffineStep


@dataclass
class Program:
    """The lowered model: steps over flat feature vectors, plus the im2col gather."""

    input_size: int
    output_size: int
    steps: list[Step]
    gather: np.ndarray | None = None  # int64 input index per im2col feature, -1 = zero padding
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def depth(self) -> int:
        """Rescales the program needs: linear steps, squares and non-unit affines."""
        return sum(1 for s in self.steps if isinstance(s, (LinearStep, SquareStep))
                   or (isinstance(s, AffineStep) and not s.unit_scale))


def _as2(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _conv(shape: tuple[int, ...], weight: np.ndarray, stride: tuple[int, int], padding: tuple[int, int],
          ) -> tuple[sp.csr_matrix, sp.csr_matrix, np.ndarray]:
    """conv2d as (natural matrix, im2col matrix, im2col gather).

    Windows w = y * Wo + x, taps t = c*kh*kw + i*kw + j; im2col feature e = t * n_win + w
    (tap-major, so the map from (t, w) to (o, w) has diagonals at multiples of n_win).
    """
    c, h, w = shape
    o, _, kh, kw = weight.shape
    (sh, sw), (ph, pw) = stride, padding
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    n_win, n_tap = ho * wo, c * kh * kw
    yy, xx = np.divmod(np.arange(n_win), wo)
    cc, rest = np.divmod(np.arange(n_tap), kh * kw)
    ii, jj = np.divmod(rest, kw)
    row = yy[None, :] * sh + ii[:, None] - ph  # (n_tap, n_win)
    col = xx[None, :] * sw + jj[:, None] - pw
    valid = (row >= 0) & (row < h) & (col >= 0) & (col < w)
    pix = np.where(valid, cc[:, None] * h * w + row * w + col, -1)
    gather = pix.reshape(-1).astype(np.int64)
    wt = weight.reshape(o, n_tap)
    # im2col matrix: ((o, w), (t, w)) -> wt[o, t]
    oo, tt, ww = np.meshgrid(np.arange(o), np.arange(n_tap), np.arange(n_win), indexing="ij")
    vals = wt[oo, tt]
    exp = sp.csr_matrix((vals.ravel(), ((oo * n_win + ww).ravel(), (tt * n_win + ww).ravel())),
                        shape=(o * n_win, n_tap * n_win))
    keep = (pix[tt, ww] >= 0)
    nat = sp.csr_matrix((vals[keep], ((oo * n_win + ww)[keep], pix[tt, ww][keep])), shape=(o * n_win, c * h * w))
    return nat, exp, gather


def _avgpool(shape: tuple[int, ...], kernel: tuple[int, int], stride: tuple[int, int]) -> sp.csr_matrix:
    c, h, w = shape
    (kh, kw), (sh, sw) = kernel, stride
    ho, wo = (h - kh) // sh + 1, (w - kw) // sw + 1
    cc, yy, xx, ii, jj = np.meshgrid(np.arange(c), np.arange(ho), np.arange(wo), np.arange(kh), np.arange(kw),
                                     indexing="ij")
    rows = (cc * ho * wo + yy * wo + xx).ravel()
    cols = (cc * h * w + (yy * sh + ii) * w + (xx * sw + jj)).ravel()
    return sp.csr_matrix((np.full(rows.size, 1.0 / (kh * kw)), (rows, cols)), shape=(c * ho * wo, c * h * w))


def _raw_steps(model: HEModel, structural: bool) -> tuple[list[Step], np.ndarray | None]:
    shapes = layer_shapes(model)
    steps: list[Step] = []
    gather = None
    for i, layer in enumerate(model.layers):
        kind, shape = layer["type"], shapes[i]
        n_out = int(np.prod(shapes[i + 1]))

        def weight(name: str, shp: tuple[int, ...], default: float, _i: int = i) -> np.ndarray:
            if structural:
                return np.full(shp, default)
            w = model.weights.get(f"{_i}.{name}")
            return np.full(shp, 0.0) if w is None else np.asarray(w, dtype=np.float64).reshape(shp)

        if kind == "conv2d":
            o, (kh, kw) = int(layer["out_channels"]), _as2(layer["kernel_size"])
            wt = weight("weight", (o, shape[0], kh, kw), 1.0)
            nat, exp, g = _conv(shape, wt, _as2(layer.get("stride", 1)), _as2(layer.get("padding", 0)))
            bias = np.repeat(weight("bias", (o,), 0.0), n_out // o)
            first = not steps
            steps.append(LinearStep(nat, bias, exp if first else None))
            if first:
                gather = g
        elif kind == "avgpool2d":
            k = _as2(layer["kernel_size"])
            steps.append(LinearStep(_avgpool(shape, k, _as2(layer.get("stride", k))), np.zeros(n_out)))
        elif kind == "linear":
            o = int(layer["out_features"])
            steps.append(LinearStep(sp.csr_matrix(weight("weight", (o, int(shape[0])), 1.0)),
                                    weight("bias", (o,), 0.0)))
        elif kind == "square":
            steps.append(SquareStep())
        elif kind == "poly":
            c0, c1, c2 = (list(map(float, layer["coeffs"])) + [0.0, 0.0, 0.0])[:3]
            n = int(np.prod(shape))
            if c2 != 0.0:
                steps += [AffineStep(np.ones(n), np.full(n, c1 / (2 * c2))), SquareStep(),
                          AffineStep(np.full(n, c2), np.full(n, c0 - c1 * c1 / (4 * c2)))]
            else:
                steps.append(AffineStep(np.full(n, c1), np.full(n, c0)))
        # flatten: nothing to do in the flat feature order
    return steps, gather


def _fold(steps: list[Step], gather: np.ndarray | None) -> list[Step]:
    changed = True
    while changed:
        changed = False
        for k in range(len(steps) - 1):
            a, b = steps[k], steps[k + 1]
            new: list[Step] | None = None
            if isinstance(a, AffineStep) and isinstance(b, AffineStep):
                new = [AffineStep(b.scale * a.scale, b.scale * a.shift + b.shift)]
            elif isinstance(a, LinearStep) and isinstance(b, AffineStep):
                d = sp.diags(b.scale)
                new = [LinearStep((d @ a.matrix).tocsr(), b.scale * a.bias + b.shift,
                                  None if a.expanded is None else (d @ a.expanded).tocsr())]
            elif isinstance(a, AffineStep) and isinstance(b, LinearStep):
                exp = None
                if b.expanded is not None and gather is not None:
                    ag = np.where(gather >= 0, a.scale[np.maximum(gather, 0)], 0.0)
                    exp = (b.expanded @ sp.diags(ag)).tocsr()
                new = [LinearStep((b.matrix @ sp.diags(a.scale)).tocsr(), b.bias + b.matrix @ a.shift, exp)]
            elif isinstance(a, LinearStep) and isinstance(b, LinearStep):
                new = [LinearStep((b.matrix @ a.matrix).tocsr(), b.matrix @ a.bias + b.bias,
                                  None if a.expanded is None else (b.matrix @ a.expanded).tocsr())]
            elif (isinstance(a, AffineStep) and isinstance(b, SquareStep) and not a.unit_scale
                  and np.all(a.scale != 0)):
                # (a x + s)^2 = a^2 (x + s/a)^2: the scale moves behind the square, for free
                new = [AffineStep(np.ones_like(a.scale), a.shift / a.scale), SquareStep(),
                       AffineStep(a.scale * a.scale, np.zeros_like(a.shift))]
            if new is not None:
                steps = steps[:k] + new + steps[k + 2:]
                changed = True
                break
    return steps


def lower(model: HEModel, *, structural: bool = False) -> Program:
    """Lower ``model`` (validated) to a :class:`Program` (see the module docstring)."""
    validate(model)
    steps, gather = _raw_steps(model, structural)
    steps = _fold(steps, gather)
    for s in steps:
        if isinstance(s, LinearStep):
            for m in (s.matrix, s.expanded):
                if m is not None:
                    m.sum_duplicates()
                    if structural:
                        m.eliminate_zeros()
                    m.sort_indices()
    first = steps[0] if steps else None
    if not (isinstance(first, LinearStep) and first.expanded is not None):
        gather = None
        if isinstance(first, LinearStep):
            first.expanded = None
    n_in = int(np.prod(model.input_shape))
    n_out = int(np.prod(layer_shapes(model)[-1]))
    return Program(input_size=n_in, output_size=n_out, steps=steps, gather=gather)
