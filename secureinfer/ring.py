"""Fixed-point encoding and exact, fast arithmetic over the ring Z_2^64.

Ring elements are ``torch.int64`` tensors: two's complement, so ``+``, ``-`` and ``*``
wrap around mod 2^64 for free. A real ``x`` is encoded with ``f`` fractional bits as the
ring element ``round(x * 2^f)`` (:func:`encode`, :func:`decode`).

Exact ring matmul and conv2d
----------------------------
``torch`` has no fast int64 matmul (about 40x slower than float64 on CPU), so ring
products are computed with float64 kernels on *limbs* small enough that every float64
operation is exact.

*Limbs.* Every ``a`` in Z_2^64 is split into three balanced limbs of ``s = 22`` bits::

    a = a0 + 2^22 a1 + 2^44 a2  (mod 2^64),   a0, a1 in [-2^21, 2^21),  a2 in [-2^19, 2^19)

(with ``t = a + 2^21 + 2^43`` wrapping: ``a0 = (t & (2^22-1)) - 2^21``,
``a1 = ((t >> 22) & (2^22-1)) - 2^21``, ``a2 = t >> 44`` arithmetic). Then, mod 2^64::

    a b = c0 + 2^22 c1 + 2^44 c2,   c0 = a0 b0,  c1 = a0 b1 + a1 b0,
                                    c2 = a0 b2 + a1 b1 + a2 b0

because ``a1 b2``, ``a2 b1`` (shift 66) and ``a2 b2`` (shift 88) vanish mod 2^64; three
limbs need ``3s >= 64`` for that, so 22 is the narrowest width. This is a product of
degree-2 polynomials truncated mod x^3, which needs 5 multiplications, not 6 (Karatsuba
and Ofman, 1962): with ``o0 = a0 b0``, ``o1 = a1 b1``, ``o2 = (a0+a1)(b0+b1)``,
``o3 = a0 b2`` and ``o4 = a2 b0``: ``c0 = o0``, ``c1 = o2 - o0 - o1``,
``c2 = o3 + o4 + o1``, so ``a b = sum_i w_i o_i (mod 2^64)`` with
``w = (1 - 2^22, 2^44 - 2^22, 2^22, 2^44, 2^44)``. For matrices each ``o_i`` is a float64
matmul (conv) of limb matrices over the inner dimension K; all five, and all K-chunks,
run as one batched call on a ``(5 * J, ...)`` stack of limbs.

*Exactness.* float64 represents every integer of magnitude <= 2^53, and a sum of
integers is computed exactly, in any order and with or without FMA, as long as every
partial sum stays within that range; every partial sum is bounded by the sum of the
absolute values of its terms. Per term of the inner dimension the largest product is
``|(a0+a1)(b0+b1)| <= 2^22 * 2^22 = 2^44`` (``|o0|, |o1| <= 2^42``,
``|o3|, |o4| <= 2^40``), so with at most ``K_c = 2^53 / 2^44 = 512`` terms per chunk
every product and partial sum is an exact integer below 2^53. Larger K is split into
``J = ceil(K / 512)`` chunks (zero-padded to equal size). Each exact float64 result is
converted to int64 (exact) and the weighted sum over the 5 products and J chunks is
done in int64, wrapping mod 2^64. The tests check this against int64 references with
worst-case limbs (-1, INT64_MIN, INT64_MAX, |a0 + a1| = 2^22, ...) and K = 5000, and
fail if the chunk bound is raised.

*Cost.* One ring matmul (m, K) @ (K, n) = one batched float64 matmul of 5 (m, K, n)
products: 5x the flops of a float64 matmul of the same shape (chunking adds none), plus
about 8 elementwise passes over ``a`` and 3 over the (5, J, m, n) products.
:func:`prepare` does the limb split of a fixed right operand (model weights) once; it
holds 5 float64 copies of it. A ring conv2d is 4 float64 conv2d calls per chunk of
input channels (x0 with [w0; w2], x1 with w1, x0+x1 with w0+w1, x2 with w0): 5 units
of GEMM, 4 of im2col. On CPU it uses ``F.conv2d``, whose float64 kernel is im2col + GEMM
(exact). On other devices it uses an int64 im2col + :func:`matmul`, because cuDNN may
pick FFT or Winograd algorithms, which round. ``scripts/bench_ring.py`` measures the
ratio to one float64 op of the same shape: on one core of the 2-core development VM
about 6x for (256, 1024) @ (1024, 1024), 7-8x for (100, 784) @ (784, 128) and
(128, 128) @ (128, 128), and 10x (250 us, per-call overhead) for (1, 784) @ (784, 128).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from secureinfer.errors import InvalidArgumentError, RangeError, ShapeError

__all__ = [
    "DEFAULT_FRAC_BITS",
    "RING_BITS",
    "PreparedOperand",
    "bit",
    "conv2d",
    "decode",
    "encode",
    "from_numpy_u64",
    "logical_rshift",
    "matmul",
    "prepare",
    "prepare_conv2d",
    "to_numpy_u64",
    "value_range",
]

RING_BITS = 64
DEFAULT_FRAC_BITS = 16

_LIMB = 22  # limb width s: 3 limbs, and 3s >= 64 so that a1*b2, a2*b1 vanish
_HALF = 1 << (_LIMB - 1)
_MASK = (1 << _LIMB) - 1
_OFFSET = _HALF + (_HALF << _LIMB)
_MAX_CHUNK = 1 << (53 - 2 * _LIMB)  # 512 inner terms of |(a0+a1)(b0+b1)| <= 2^44
_F64 = torch.float64
_NUMPY_MAX = 1 << 16  # elementwise work on CPU tensors up to this size runs in numpy
_IM2COL_BLOCK = 1 << 24  # im2col entries per block of images (limbs: 40 bytes each)


# --------------------------------------------------------------------------- encoding


def value_range(frac_bits: int = DEFAULT_FRAC_BITS) -> float:
    """Largest |x| that :func:`encode` accepts by default: ``2^(31 - frac_bits)``.

    An encoded input then has magnitude <= 2^31, so the product of two encoded values is
    below 2^62: the range in which the comparison (sign bit with a guard bit) and the
    dealer-assisted truncation protocols work with their stated failure probability.
    Sums over wide layers grow by log2(K) bits on top of that, so values met in practice
    must stay far below this bound; it is a hard limit for inputs, not a guarantee for
    intermediate values.
    """
    _check_frac_bits(frac_bits)
    return 2.0 ** (31 - frac_bits)


def encode(
    x: Any,
    *,
    frac_bits: int = DEFAULT_FRAC_BITS,
    max_abs: float | None = None,
    device: str | torch.device | None = None,
) -> torch.Tensor:
    """Fixed-point encode ``x`` as int64 ring elements ``round(x * 2^frac_bits)``.

    ``x`` is anything numpy or torch can turn into float64 (computed in float64, rounding
    half to even). Raises :class:`RangeError` if any value is non-finite or exceeds
    ``max_abs`` (default :func:`value_range`), naming how many elements, the largest
    |x| found and the bound.
    """
    _check_frac_bits(frac_bits)
    bound = value_range(frac_bits) if max_abs is None else float(max_abs)
    if not bound > 0 or bound * 2.0**frac_bits >= 2.0**63:
        raise InvalidArgumentError(f"max_abs must be in (0, 2^{63 - frac_bits}), got {max_abs!r}")
    try:
        if isinstance(x, torch.Tensor):
            xf = x.detach().to(dtype=_F64, device=device if device is not None else x.device)
        else:
            xf = torch.as_tensor(np.asarray(x, dtype=np.float64), device=device)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"cannot encode {type(x).__name__} as real numbers: {e}") from e
    bad = ~torch.isfinite(xf) | (xf.abs() > bound)
    n_bad = int(bad.sum())
    if n_bad:
        if bool(torch.isnan(xf).any()):
            found = math.nan
        else:
            found = float(xf.abs().max())
        raise RangeError(
            f"{n_bad} of {xf.numel()} element(s) cannot be encoded with frac_bits={frac_bits}: "
            f"max |x| found is {found!r}, allowed |x| <= {bound!r}"
        )
    return torch.round(xf * 2.0**frac_bits).to(torch.int64)


def decode(x: torch.Tensor, *, frac_bits: int = DEFAULT_FRAC_BITS) -> torch.Tensor:
    """Float64 value of fixed-point ring elements: signed int64 / 2^frac_bits."""
    _check_frac_bits(frac_bits)
    _check_int64(x, "x")
    return x.to(_F64) / 2.0**frac_bits


def _check_frac_bits(frac_bits: int) -> None:
    if isinstance(frac_bits, bool) or not isinstance(frac_bits, int) or not 0 <= frac_bits <= 62:
        raise InvalidArgumentError(f"frac_bits must be an int in [0, 62], got {frac_bits!r}")


# ---------------------------------------------------------------------------- helpers


def logical_rshift(x: torch.Tensor, k: int) -> torch.Tensor:
    """Unsigned right shift of int64 ``x`` by ``k`` in [0, 64] (zeros shifted in)."""
    _check_int64(x, "x")
    if not 0 <= k <= RING_BITS:
        raise InvalidArgumentError(f"shift must be in [0, 64], got {k}")
    if k == 0:
        return x.clone()
    if k == RING_BITS:
        return torch.zeros_like(x)
    return (x >> k) & ((1 << (RING_BITS - k)) - 1)


def bit(x: torch.Tensor, k: int) -> torch.Tensor:
    """Bit ``k`` (0 = least significant, 63 = sign) of int64 ``x`` as int64 0/1."""
    _check_int64(x, "x")
    if not 0 <= k < RING_BITS:
        raise InvalidArgumentError(f"bit index must be in [0, 63], got {k}")
    return (x >> k) & 1


def to_numpy_u64(t: torch.Tensor) -> np.ndarray:
    """The int64 tensor ``t`` as a numpy uint64 array (a view for CPU tensors)."""
    _check_int64(t, "t")
    return t.detach().cpu().numpy().view(np.uint64)


def from_numpy_u64(a: np.ndarray, *, device: str | torch.device | None = None) -> torch.Tensor:
    """A numpy uint64 (or int64) array as a torch.int64 tensor (a view where possible)."""
    arr = np.asarray(a)
    if arr.dtype.kind not in "ui" or arr.dtype.itemsize != 8:
        raise ShapeError(f"expected a uint64 or int64 array, got {arr.dtype}")
    if (
        not arr.dtype.isnative
        or not arr.flags.writeable
        or any(s < 0 for s in arr.strides)
        or any(s % 8 for s in arr.strides)
    ):
        arr = np.ascontiguousarray(arr, dtype=arr.dtype.newbyteorder("="))
    t = torch.from_numpy(arr.view(np.int64))
    return t if device is None else t.to(device)


def _check_int64(t: Any, name: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
        got = t.dtype if isinstance(t, torch.Tensor) else type(t).__name__
        raise ShapeError(f"{name} must be a torch.int64 tensor of ring elements, got {got}")


# ---------------------------------------------------------------------- limb algebra


def _chunking(k: int, max_chunk: int = _MAX_CHUNK) -> tuple[int, int]:
    """(J, kc): the fewest chunks J of equal size kc <= max_chunk covering k terms."""
    j = max(1, -(-k // max_chunk))
    return j, -(-k // j)


def _limbs5(a: torch.Tensor, j: int, kc: int, *, dim: int = -1, right: bool = False) -> torch.Tensor:
    """Float64 limb stack of int64 ``a``: shape (5, j, *a.shape) with dim ``dim`` (< 0,
    the inner dimension K) replaced by kc.

    Index 0..4 along the first dim hold a0, a1, a0 + a1, a0, a2 (left operand) or
    b0, b1, b0 + b1, b2, b0 (``right``), so that the batched product of a left and a
    right stack is o0..o4 of the module docstring. Dim ``dim`` of ``a`` is zero-padded to
    j*kc and split into j chunks.
    """
    top, dup = (3, 4) if right else (4, 3)
    pad = j * kc - a.shape[dim]
    if pad:
        a = F.pad(a, (0, 0) * (-1 - dim) + (0, pad))
    shape = list(a.shape)
    shape[dim] = kc
    chunked_shape = (*a.shape[:dim], j, kc, *a.shape[dim:][1:])  # K = j*kc at dim
    if _small_cpu(a):  # the same steps in numpy: ~1 us per call instead of torch's ~5
        tn = np.moveaxis(a.numpy().reshape(chunked_shape), dim - 1, 0) + np.int64(_OFFSET)
        v = np.empty((5, j, *shape))
        np.bitwise_and(tn, _MASK, out=v[0], casting="unsafe")
        np.bitwise_and(tn >> _LIMB, _MASK, out=v[1], casting="unsafe")
        np.right_shift(tn, 2 * _LIMB, out=v[top], casting="unsafe")
        v[:2] -= _HALF
        np.add(v[0], v[1], out=v[2])
        v[dup] = v[0]
        return torch.from_numpy(v)
    out = torch.empty((5, j, *shape), dtype=_F64, device=a.device)
    views = out.unbind(0)
    tc = (a + _OFFSET).view(chunked_shape).movedim(dim - 1, 0)
    torch.bitwise_and(tc, _MASK, out=views[0])
    tc >>= _LIMB
    torch.bitwise_and(tc, _MASK, out=views[1])
    torch.bitwise_right_shift(tc, _LIMB, out=views[top])
    out[:2].sub_(_HALF)
    torch.add(views[0], views[1], out=views[2])
    views[dup].copy_(views[0])
    return out


def _small_cpu(t: torch.Tensor) -> bool:
    """Whether ``t`` is small enough that numpy's lower per-call cost beats torch."""
    return t.device.type == "cpu" and t.numel() <= _NUMPY_MAX


def _split5(a: torch.Tensor) -> torch.Tensor:
    """Float64 limb stack (5, *a.shape) of int64 ``a``, unchunked."""
    return _limbs5(a.unsqueeze(-1), 1, 1).view(5, *a.shape)


# a b = c0 + 2^22 c1 + 2^44 c2 with c0 = o0, c1 = o2 - o0 - o1, c2 = o3 + o4 + o1, i.e.
# the weighted sum of o0..o4 with these weights (all fit in int64).
_WEIGHTS = (1 - (1 << _LIMB), (1 << 2 * _LIMB) - (1 << _LIMB), 1 << _LIMB, 1 << 2 * _LIMB, 1 << 2 * _LIMB)


def _weights(device: torch.device) -> torch.Tensor:
    return torch.tensor(_WEIGHTS, dtype=torch.int64, device=device)


def _combine(o: torch.Tensor, weights: torch.Tensor | None) -> torch.Tensor:
    """int64 ``sum_j c0 + 2^22 c1 + 2^44 c2`` from float64 products ``o`` (5, J, ...).

    Every entry of ``o`` is an exactly computed integer of magnitude <= 2^53, so its
    conversion to int64 is exact; the rest is int64 arithmetic mod 2^64.
    """
    shape = (5, *(1,) * (o.dim() - 1))
    if _small_cpu(o):
        on = o.numpy().astype(np.int64)
        on *= np.array(_WEIGHTS, dtype=np.int64).reshape(shape)  # wraps mod 2^64
        return torch.from_numpy(on.reshape(o.shape[0] * o.shape[1], *o.shape[2:]).sum(0))
    oi = o.to(torch.int64)
    oi.mul_((weights if weights is not None else _weights(o.device)).view(shape))
    return oi.flatten(0, 1).sum(0)


# ------------------------------------------------------------------------- operands


@dataclass(frozen=True, eq=False)
class PreparedOperand:
    """A fixed int64 operand split into float64 limbs once, for :func:`matmul`/:func:`conv2d`.

    Made by :func:`prepare` (right operand of a matmul, ``kind == "matmul"``) or
    :func:`prepare_conv2d` (a conv2d weight, ``kind == "conv2d"``). ``shape`` is the shape
    of the int64 tensor it was made from; the tensors live on that tensor's device. Holds
    5 float64 copies of the operand (40 bytes per element). Immutable, so one prepared
    weight can serve concurrent requests.
    """

    kind: str
    shape: tuple[int, ...]
    device: torch.device
    groups: int = 1
    data: tuple[torch.Tensor, ...] = ()
    im2col: PreparedOperand | None = None
    weights: torch.Tensor | None = None  # _WEIGHTS on the device, made once

    def __repr__(self) -> str:
        how = "im2col" if self.im2col is not None else f"{len(self.data)} part(s)"
        return f"PreparedOperand(kind={self.kind!r}, shape={self.shape}, device={self.device}, {how})"


def prepare(b: torch.Tensor) -> PreparedOperand:
    """Precompute the limb split of a right matmul operand ``b`` (k,), (k, n) or (..., k, n).

    Cost: about 8 elementwise passes over ``b``; memory: 5 float64 copies of ``b``.
    """
    _check_int64(b, "b")
    if b.dim() == 0:
        raise ShapeError("matmul operands must be at least 1-D")
    bm = b.unsqueeze(-1) if b.dim() == 1 else b
    j, kc = _chunking(bm.shape[-2])
    data = _limbs5(bm, j, kc, dim=-2, right=True)
    return PreparedOperand("matmul", tuple(b.shape), b.device, 1, (data,), None, _weights(b.device))


def matmul(a: torch.Tensor, b: torch.Tensor | PreparedOperand) -> torch.Tensor:
    """Exact ``a @ b`` mod 2^64 for int64 tensors, with ``torch.matmul`` shape semantics.

    ``b`` may be a :class:`PreparedOperand` from :func:`prepare`. Algorithm, exactness
    and cost: see the module docstring (one batched call of 5 float64 matmuls).
    """
    _check_int64(a, "a")
    pb = b if isinstance(b, PreparedOperand) else prepare(b)
    if pb.kind != "matmul":
        raise InvalidArgumentError(f"matmul needs an operand from prepare(), got kind {pb.kind!r}")
    if pb.device != a.device:
        raise InvalidArgumentError(f"operands on different devices: {a.device} and {pb.device}")
    if a.dim() == 0:
        raise ShapeError("matmul operands must be at least 1-D")
    bdata = pb.data[0]  # (5, J, *bb, kc, n)
    b_vec = len(pb.shape) == 1
    bk = pb.shape[0] if b_vec else pb.shape[-2]
    am = a.unsqueeze(0) if a.dim() == 1 else a
    k, m = am.shape[-1], am.shape[-2]
    if k != bk:
        raise ShapeError(f"matmul shapes {tuple(a.shape)} and {pb.shape} do not match: {k} != {bk}")
    j, kc, n = bdata.shape[1], bdata.shape[-2], bdata.shape[-1]
    ba, bb = tuple(am.shape[:-2]), tuple(bdata.shape[2:-2])
    if not bb:  # fold a's batch dims into its rows: one (5J)-batched GEMM
        rows = math.prod(ba) * m
        a5 = _limbs5(am.reshape(rows, k), j, kc).view(5 * j, rows, kc)
        o = torch.bmm(a5, bdata.view(5 * j, kc, n)).view(5, j, rows, n)
        out_shape = (*ba, m, n)
    else:
        try:
            batch = tuple(torch.broadcast_shapes(ba, bb))
        except RuntimeError as e:
            raise ShapeError(f"matmul batch shapes {ba} and {bb} do not broadcast") from e
        a5 = _limbs5(am, j, kc).reshape(5, j, *(1,) * (len(batch) - len(ba)), *ba, m, kc)
        b5 = bdata.reshape(5, j, *(1,) * (len(batch) - len(bb)), *bb, kc, n)
        o = torch.matmul(a5, b5)
        out_shape = (*batch, m, n)
    r = _combine(o, pb.weights).reshape(out_shape)
    if b_vec:
        r = r.squeeze(-1)
    if a.dim() == 1:
        r = r.squeeze(-2 if not b_vec else -1)
    return r


# --------------------------------------------------------------------------- conv2d


def _pair(v: int | tuple[int, ...], name: str, low: int) -> tuple[int, int]:
    t = (v, v) if isinstance(v, int) else tuple(v)
    if len(t) != 2 or not all(isinstance(i, int) and i >= low for i in t):
        raise InvalidArgumentError(f"{name} must be an int or a pair of ints >= {low}, got {v!r}")
    return t  # type: ignore[return-value]


def prepare_conv2d(w: torch.Tensor, *, groups: int = 1, method: str = "auto") -> PreparedOperand:
    """Precompute the limb split of a conv2d weight ``w`` (O, C/groups, kh, kw).

    ``method``: ``"conv"`` (float64 ``F.conv2d``, exact on CPU), ``"im2col"`` (int64
    im2col + :func:`matmul`, exact everywhere) or ``"auto"``: ``"conv"`` on CPU when
    kh*kw <= 512, else ``"im2col"``.
    """
    _check_int64(w, "w")
    if w.dim() != 4 or w.numel() == 0:
        raise ShapeError(f"conv2d weight must be a non-empty (O, C/groups, kh, kw) tensor, got {w.shape}")
    o, cg, kh, kw = w.shape
    if not isinstance(groups, int) or groups < 1 or o % groups:
        raise InvalidArgumentError(f"groups must be a positive divisor of {o} output channels: {groups!r}")
    if method == "auto":
        method = "conv" if w.device.type == "cpu" and kh * kw <= _MAX_CHUNK else "im2col"
    shape = tuple(w.shape)
    if method == "im2col":
        b = w.reshape(groups, o // groups, cg * kh * kw).transpose(1, 2)
        return PreparedOperand("conv2d", shape, w.device, groups, (), prepare(b))
    if method != "conv" or kh * kw > _MAX_CHUNK:
        raise InvalidArgumentError(f"method must be 'auto', 'im2col' or 'conv' (kh*kw <= 512): {method!r}")
    _, cc = _chunking(cg, _MAX_CHUNK // (kh * kw))
    w5 = _split5(w)  # (5, O, Cg, kh, kw): w0, w1, w0+w1, w0, w2
    parts: list[torch.Tensor] = []
    for c in range(0, cg, cc):
        ws = w5[:, :, c : c + cc]
        per_group = (ws[0].unflatten(0, (groups, -1)), ws[4].unflatten(0, (groups, -1)))
        w02 = torch.stack(per_group, dim=1).flatten(0, 2)  # per group [w0; w2]
        parts += [w02, ws[1].contiguous(), ws[2].contiguous(), ws[0].contiguous()]
    return PreparedOperand("conv2d", shape, w.device, groups, tuple(parts), None, _weights(w.device))


def conv2d(
    x: torch.Tensor,
    w: torch.Tensor | PreparedOperand,
    *,
    stride: int | tuple[int, int] = 1,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    groups: int = 1,
    method: str = "auto",
) -> torch.Tensor:
    """Exact ring conv2d mod 2^64, NCHW input and OIHW weight as ``F.conv2d`` (no bias).

    ``w`` may come from :func:`prepare_conv2d` (its ``groups`` must match; ``method`` is
    then ignored). Cost: 4 float64 conv2d calls per chunk of <= 512 / (kh*kw) input
    channels (5 GEMM units), or an int64 im2col + :func:`matmul`; see the module docstring.
    """
    _check_int64(x, "x")
    pw = w if isinstance(w, PreparedOperand) else prepare_conv2d(w, groups=groups, method=method)
    if pw.kind != "conv2d":
        raise InvalidArgumentError(f"conv2d needs a weight from prepare_conv2d(), got kind {pw.kind!r}")
    if pw.groups != groups:
        raise InvalidArgumentError(f"weight was prepared for groups={pw.groups}, called with groups={groups}")
    if pw.device != x.device:
        raise InvalidArgumentError(f"operands on different devices: {x.device} and {pw.device}")
    o, cg, kh, kw = pw.shape
    if x.dim() != 4 or x.shape[1] != cg * groups:
        raise ShapeError(f"conv2d input must be (N, {cg * groups}, H, W), got {tuple(x.shape)}")
    sh, sw = _pair(stride, "stride", 1)
    ph, pv = _pair(padding, "padding", 0)
    dh, dw = _pair(dilation, "dilation", 1)
    n, _, h, wd = x.shape
    ho, wo = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (wd + 2 * pv - dw * (kw - 1) - 1) // sw + 1
    if ho <= 0 or wo <= 0:
        raise ShapeError(f"conv2d input {tuple(x.shape)} is smaller than the (dilated) kernel")
    og = o // groups
    if pw.im2col is not None:
        xp = F.pad(x, (pv, pv, ph, ph)) if ph or pv else x.contiguous()
        s_n, s_c, s_h, s_w = xp.stride()
        k = cg * kh * kw
        step = max(1, _IM2COL_BLOCK // (groups * ho * wo * k))  # images per block
        ys = []
        for i in range(0, n, step):  # bounded memory: the limbs take 40 bytes per entry
            nb = min(step, n - i)
            cols = xp.as_strided(
                (groups, nb, ho, wo, cg, kh, kw),
                (cg * s_c, s_n, sh * s_h, sw * s_w, s_c, dh * s_h, dw * s_w),
                xp.storage_offset() + i * s_n,
            ).reshape(groups, nb * ho * wo, k)
            y = matmul(cols, pw.im2col)  # (groups, nb*Ho*Wo, O/groups)
            ys.append(y.view(groups, nb, ho, wo, og).permute(1, 0, 4, 2, 3).reshape(nb, o, ho, wo))
        return ys[0] if len(ys) == 1 else torch.cat(ys)
    x5 = _split5(x)  # (5, N, C, H, W)
    nparts = len(pw.data) // 4
    cc = pw.data[1].shape[1]

    prods = torch.empty((5, nparts, n, groups, og, ho, wo), dtype=_F64, device=x.device)

    def conv(inp: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(inp.contiguous(), weight, None, (sh, sw), (ph, pv), (dh, dw), groups)
        return y.view(n, groups, -1, og, ho, wo)

    for i in range(nparts):
        w02, w1, w01, w0 = pw.data[4 * i : 4 * i + 4]
        xs = x5 if nparts == 1 else x5.unflatten(2, (groups, cg))[:, :, :, i * cc : (i + 1) * cc]
        xs = xs.flatten(2, 3) if nparts > 1 else xs
        o03 = conv(xs[0], w02)  # per group [x0 w0; x0 w2]
        prods[0, i].copy_(o03[:, :, 0])
        prods[3, i].copy_(o03[:, :, 1])
        for k, wk in ((1, w1), (2, w01), (4, w0)):
            prods[k, i].copy_(conv(xs[k], wk)[:, :, 0])
    return _combine(prods, pw.weights).reshape(n, o, ho, wo)
