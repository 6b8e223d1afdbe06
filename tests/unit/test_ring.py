"""Tests of secureinfer.ring: fixed point, helpers, exact Z_2^64 matmul and conv2d.

References are int64 torch ops (which wrap mod 2^64), themselves checked against Python
integers on tiny cases. Test data comes from a fixed-seed Prg (not secret).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from secureinfer import ring
from secureinfer.errors import InvalidArgumentError, RangeError, ShapeError
from secureinfer.prg import Prg

M64 = 1 << 64
INT64_MIN = -(1 << 63)
INT64_MAX = (1 << 63) - 1


def wrap(v: int) -> int:
    """Python int -> the int64 with the same residue mod 2^64."""
    v %= M64
    return v - M64 if v >= 1 << 63 else v


def limb_value(a0: int, a1: int, a2: int) -> int:
    return wrap(a0 + (a1 << 22) + (a2 << 44))


# Values whose limbs are at their extremes: a0 = a1 = -2^21 makes |a0 + a1| = 2^22, the
# largest Karatsuba operand, and a2 = +-2^19 the largest top limb.
EXTREMES = [
    -1,
    INT64_MIN,
    INT64_MAX,
    0,
    1,
    wrap(0xAAAAAAAAAAAAAAAA),
    wrap(0x5555555555555555),
    wrap(0xFFFFFFFF00000000),
    wrap(0x00000000FFFFFFFF),
    limb_value(-(1 << 21), -(1 << 21), -(1 << 19)),
    limb_value(-(1 << 21), -(1 << 21), (1 << 19) - 1),
    limb_value((1 << 21) - 1, (1 << 21) - 1, (1 << 19) - 1),
    limb_value((1 << 21) - 1, -(1 << 21), -(1 << 19)),
]


def prg(label: str) -> Prg:
    return Prg.derived(b"test_ring fixed seed, not secret", label)


def ring_data(shape: tuple[int, ...], label: str) -> torch.Tensor:
    """Uniform ring elements with about a quarter replaced by the extreme values."""
    p = prg(label)
    t = p.ring(shape)
    pick = torch.from_numpy(p.below(4 * len(EXTREMES), shape))
    ext = torch.tensor(EXTREMES, dtype=torch.int64)
    use = pick < len(EXTREMES)
    return torch.where(use, ext[pick.clamp(max=len(EXTREMES) - 1)], t)


def near_worst(shape: tuple[int, ...], label: str) -> torch.Tensor:
    """Values with a0 = a1 = -2^21 + small odd noise: every limb product near its bound,
    and low bits set so that a rounded float64 sum would be detected."""
    p = prg(label)
    noise = torch.from_numpy(p.below(1 << 6, shape))
    top = torch.from_numpy(p.below(1 << 20, shape)) - (1 << 19)
    a0 = -(1 << 21) + noise
    a1 = -(1 << 21) + noise.flip(-1)
    return a0 + (a1 << 22) + (top << 44)


# ------------------------------------------------------------------------- encoding


def test_constants_and_value_range() -> None:
    assert ring.RING_BITS == 64 and ring.DEFAULT_FRAC_BITS == 16
    assert ring.value_range(16) == 2.0**15
    assert ring.value_range(0) == 2.0**31
    with pytest.raises(InvalidArgumentError):
        ring.value_range(63)


def test_encode_decode_round_trip() -> None:
    x = np.array([[0.0, 1.0, -1.0, 3.25], [-32768.0, 32768.0, 1e-3, -12345.678]])
    e = ring.encode(x)
    assert e.dtype == torch.int64 and e.shape == (2, 4)
    assert e[0].tolist() == [0, 1 << 16, -(1 << 16), 13 << 14]
    back = ring.decode(e, frac_bits=16)
    assert back.dtype == torch.float64
    assert torch.allclose(back, torch.from_numpy(x), atol=2.0**-17, rtol=0)
    for f in (0, 8, 20, 30):
        y = torch.linspace(-ring.value_range(f), ring.value_range(f), 101, dtype=torch.float64)
        back = ring.decode(ring.encode(y, frac_bits=f), frac_bits=f)
        assert torch.allclose(back, y, atol=2.0 ** (-f - 1), rtol=0)


def test_encode_inputs_and_rounding() -> None:
    assert ring.encode(1.5, frac_bits=0).item() == 2
    assert ring.encode([0.5, 2.5, -0.5], frac_bits=0).tolist() == [0, 2, 0]  # half to even
    assert ring.encode(torch.tensor([1.0], dtype=torch.float32)).tolist() == [1 << 16]
    assert ring.encode(np.int32(3)).item() == 3 << 16


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan, 32768.5, -1e9])
def test_encode_range_error(bad: float) -> None:
    x = np.array([1.0, bad, 2.0, bad])
    with pytest.raises(RangeError) as info:
        ring.encode(x)
    msg = str(info.value)
    assert "2 of 4" in msg and "32768" in msg
    assert ("nan" in msg) if math.isnan(bad) else (repr(abs(bad)) in msg)


def test_encode_custom_bound() -> None:
    assert ring.encode([100.0], max_abs=100.0).tolist() == [100 << 16]
    with pytest.raises(RangeError):
        ring.encode([100.5], max_abs=100.0)
    with pytest.raises(InvalidArgumentError):
        ring.encode([1.0], frac_bits=16, max_abs=2.0**48)
    with pytest.raises(InvalidArgumentError):
        ring.encode([1.0], frac_bits=-1)
    with pytest.raises(InvalidArgumentError):
        ring.encode(["one"])


# -------------------------------------------------------------------------- helpers


def test_logical_rshift_and_bit() -> None:
    x = torch.tensor(EXTREMES, dtype=torch.int64)
    for k in (0, 1, 21, 22, 44, 63, 64):
        assert ring.logical_rshift(x, k).tolist() == [wrap((v % M64) >> k) for v in EXTREMES]
    for k in (0, 1, 31, 62, 63):
        assert ring.bit(x, k).tolist() == [((v % M64) >> k) & 1 for v in EXTREMES]
    with pytest.raises(InvalidArgumentError):
        ring.bit(x, 64)
    with pytest.raises(ShapeError):
        ring.bit(x.to(torch.int32), 1)


def test_numpy_u64_views() -> None:
    t = torch.tensor([-1, 5, INT64_MIN], dtype=torch.int64)
    a = ring.to_numpy_u64(t)
    assert a.dtype == np.uint64 and a.tolist() == [M64 - 1, 5, 1 << 63]
    a[1] = 7  # a view: writes through
    assert t[1].item() == 7
    back = ring.from_numpy_u64(a)
    assert back.dtype == torch.int64 and back.tolist() == [-1, 7, INT64_MIN]
    back[0] = 3
    assert a[0] == 3
    ro = np.arange(4, dtype=np.uint64)[::-1]
    assert ring.from_numpy_u64(ro).tolist() == [3, 2, 1, 0]
    with pytest.raises(ShapeError):
        ring.from_numpy_u64(np.zeros(2, dtype=np.float64))


def test_limb_split() -> None:
    x = torch.tensor(EXTREMES, dtype=torch.int64)
    limbs = ring._split5(x)
    a0, a1, a01, a0b, a2 = (limbs[i].to(torch.int64).tolist() for i in range(5))
    assert a0 == a0b and a01 == [u + v for u, v in zip(a0, a1)]
    for v, l0, l1, l2 in zip(EXTREMES, a0, a1, a2):
        assert wrap(l0 + (l1 << 22) + (l2 << 44)) == v
        assert -(1 << 21) <= l0 < 1 << 21 and -(1 << 21) <= l1 < 1 << 21 and abs(l2) <= 1 << 19
    assert limbs[:3, 9].tolist() == [-(1 << 21), -(1 << 21), -(1 << 22)]


# --------------------------------------------------------------------------- matmul


def test_int64_reference_wraps_like_python_ints() -> None:
    a = torch.tensor([EXTREMES[:4], EXTREMES[4:8]], dtype=torch.int64)
    b = torch.tensor([EXTREMES[9:12], EXTREMES[:3], EXTREMES[5:8], EXTREMES[10:13]], dtype=torch.int64)
    ref = [[wrap(sum(int(a[i, k]) * int(b[k, j]) for k in range(4))) for j in range(3)] for i in range(2)]
    assert (a @ b).tolist() == ref
    assert ring.matmul(a, b).tolist() == ref


@pytest.mark.parametrize(
    "m,k,n",
    [(1, 1, 1), (3, 7, 5), (4, 512, 3), (5, 513, 2), (1, 784, 128), (6, 1100, 4), (2, 5000, 3)],
)
def test_matmul_exact(m: int, k: int, n: int) -> None:
    a, b = ring_data((m, k), f"a{m},{k}"), ring_data((k, n), f"b{k},{n}")
    assert torch.equal(ring.matmul(a, b), a @ b)
    assert torch.equal(ring.matmul(a, ring.prepare(b)), a @ b)


@pytest.mark.parametrize("k", [512, 513, 5000])
def test_matmul_worst_case_limbs(k: int) -> None:
    a, b = near_worst((3, k), f"wa{k}"), near_worst((k, 4), f"wb{k}").contiguous()
    assert torch.equal(ring.matmul(a, b), a @ b)
    for v in EXTREMES:  # constant matrices of each extreme value
        av = torch.full((2, k), v, dtype=torch.int64)
        assert torch.equal(ring.matmul(av, b), av @ b)
        assert torch.equal(ring.matmul(a, av.T), a @ av.T)


@pytest.mark.parametrize(
    "sa,sb",
    [
        ((2, 3, 4, 9), (9, 5)),
        ((2, 3, 4, 9), (3, 9, 5)),
        ((2, 1, 4, 9), (3, 9, 5)),
        ((4, 9), (2, 9, 5)),
        ((9,), (9, 5)),
        ((4, 9), (9,)),
        ((9,), (9,)),
        ((2, 3, 4, 9), (9,)),
        ((9,), (2, 9, 5)),
        ((0, 9), (9, 5)),
        ((4, 0), (0, 5)),
        ((3, 700), (2, 700, 2)),
    ],
)
def test_matmul_broadcasting(sa: tuple[int, ...], sb: tuple[int, ...]) -> None:
    a, b = ring_data(sa, f"ba{sa}"), ring_data(sb, f"bb{sb}")
    ref = torch.matmul(a, b)
    got = ring.matmul(a, b)
    assert got.shape == ref.shape and torch.equal(got, ref)
    assert torch.equal(ring.matmul(a, ring.prepare(b)), ref)


@pytest.mark.parametrize("numpy_max", [0, 1 << 40], ids=["torch-elementwise", "numpy-elementwise"])
def test_both_elementwise_paths(numpy_max: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small CPU tensors take a numpy path for the limb split and combine: check both."""
    monkeypatch.setattr(ring, "_NUMPY_MAX", numpy_max)
    a, b = near_worst((3, 1100), "pa"), ring_data((5, 1100), "pb").T  # transposed b
    assert torch.equal(ring.matmul(a, b), a @ b)
    assert torch.equal(ring.matmul(a[:, ::2], ring.prepare(b[::2])), a[:, ::2] @ b[::2])
    a3, b3 = ring_data((2, 3, 4, 600), "pc"), ring_data((3, 600, 2), "pd")
    assert torch.equal(ring.matmul(a3, b3), torch.matmul(a3, b3))
    x, w = ring_data((2, 64, 5, 5), "px"), ring_data((4, 32, 3, 3), "pw")
    for method in ("conv", "im2col"):
        got = ring.conv2d(x, w, padding=1, groups=2, method=method)
        assert torch.equal(got, conv_reference(x, w, 1, 1, 1, 2))


def test_matmul_non_contiguous_inputs() -> None:
    a, b = ring_data((9, 6), "nca"), ring_data((5, 9), "ncb")
    assert torch.equal(ring.matmul(a.T, b.T), a.T @ b.T)
    assert torch.equal(ring.matmul(a.T[::2], b.T[:, 1:]), a.T[::2] @ b.T[:, 1:])


def test_prepared_operand_is_reusable() -> None:
    b = ring_data((30, 7), "pb")
    pb = ring.prepare(b)
    assert pb.kind == "matmul" and pb.shape == (30, 7) and "matmul" in repr(pb)
    for i in range(3):
        a = ring_data((i + 1, 30), f"pa{i}")
        assert torch.equal(ring.matmul(a, pb), a @ b)


def test_matmul_errors() -> None:
    a, b = ring_data((3, 4), "ea"), ring_data((5, 2), "eb")
    with pytest.raises(ShapeError):
        ring.matmul(a, b)
    with pytest.raises(ShapeError):
        ring.matmul(a.to(torch.float64), b)
    with pytest.raises(ShapeError):
        ring.prepare(torch.tensor(3))
    with pytest.raises(ShapeError):
        ring.matmul(ring_data((2, 3, 4), "ec"), ring_data((3, 4, 4), "ed"))
    with pytest.raises(InvalidArgumentError):
        ring.matmul(a, ring.prepare_conv2d(ring_data((2, 1, 2, 2), "ee")))


# --------------------------------------------------------------------------- conv2d


def conv_reference(
    x: torch.Tensor, w: torch.Tensor, stride: int, padding: int, dilation: int, groups: int
) -> torch.Tensor:
    """int64 conv2d by elementwise products summed over channels and kernel offsets."""
    n, c, h, wd = x.shape
    o, cg, kh, kw = w.shape
    xp = torch.nn.functional.pad(x, (padding,) * 4)
    ho = (h + 2 * padding - dilation * (kh - 1) - 1) // stride + 1
    wo = (wd + 2 * padding - dilation * (kw - 1) - 1) // stride + 1
    out = torch.zeros((n, groups, o // groups, ho, wo), dtype=torch.int64)
    wg = w.view(groups, o // groups, cg, kh, kw)
    for p in range(kh):
        for q in range(kw):
            xs = xp[:, :, p * dilation :: stride, q * dilation :: stride][:, :, :ho, :wo]
            xs = xs.reshape(n, groups, 1, cg, ho, wo)
            out += (xs * wg[None, :, :, :, p, q, None, None]).sum(3)
    return out.view(n, o, ho, wo)


def test_conv_reference_against_python_ints() -> None:
    x = ring_data((1, 2, 3, 3), "cx")
    w = ring_data((2, 1, 2, 2), "cw")
    ref = conv_reference(x, w, 1, 0, 1, 2)
    for oc in range(2):
        for i in range(2):
            for j in range(2):
                s = sum(int(x[0, oc, i + p, j + q]) * int(w[oc, 0, p, q]) for p in range(2) for q in range(2))
                assert ref[0, oc, i, j].item() == wrap(s)


CONV_CASES = [
    # (x shape, w shape, stride, padding, dilation, groups)
    ((1, 1, 28, 28), (16, 1, 5, 5), 1, 0, 1, 1),
    ((2, 4, 9, 9), (6, 2, 3, 3), 2, 1, 1, 2),
    ((2, 3, 10, 11), (4, 3, 3, 2), 1, 2, 2, 1),
    ((1, 6, 7, 7), (6, 1, 3, 3), 1, 1, 1, 6),  # depthwise
    ((2, 64, 5, 5), (3, 64, 3, 3), 1, 1, 1, 1),  # K = 576 > 512: channel chunks
    ((1, 120, 4, 4), (4, 60, 3, 3), 3, 1, 1, 2),  # chunks inside groups
]


@pytest.mark.parametrize("method", ["auto", "conv", "im2col"])
@pytest.mark.parametrize("case", CONV_CASES)
def test_conv2d_exact(case: tuple, method: str) -> None:
    xs, ws, s, p, d, g = case
    x, w = ring_data(xs, f"x{xs}"), ring_data(ws, f"w{ws}")
    ref = conv_reference(x, w, s, p, d, g)
    kw = dict(stride=s, padding=p, dilation=d, groups=g)
    got = ring.conv2d(x, w, method=method, **kw)
    assert got.shape == ref.shape and torch.equal(got, ref)
    pw = ring.prepare_conv2d(w, groups=g, method=method)
    assert torch.equal(ring.conv2d(x, pw, **kw), ref)


@pytest.mark.parametrize("method", ["conv", "im2col"])
def test_conv2d_worst_case_limbs(method: str) -> None:
    x = near_worst((2, 60, 6, 6), "wx")
    w = near_worst((3, 60, 3, 3), "ww")
    ref = conv_reference(x, w, 1, 1, 1, 1)
    assert torch.equal(ring.conv2d(x, w, padding=1, method=method), ref)
    for v in EXTREMES[:3] + EXTREMES[9:]:
        wv = torch.full((2, 60, 3, 3), v, dtype=torch.int64)
        assert torch.equal(ring.conv2d(x, wv, method=method), conv_reference(x, wv, 1, 0, 1, 1))


def test_conv2d_im2col_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    x, w = ring_data((5, 4, 7, 7), "bx"), ring_data((6, 2, 3, 3), "bw")
    monkeypatch.setattr(ring, "_IM2COL_BLOCK", 2 * 25 * 18 * 2)  # 2 images per block
    got = ring.conv2d(x, w, padding=0, groups=2, method="im2col")
    assert torch.equal(got, conv_reference(x, w, 1, 0, 1, 2))


def test_conv2d_large_kernel_uses_im2col() -> None:
    x, w = ring_data((1, 1, 24, 24), "lx"), ring_data((2, 1, 23, 23), "lw")  # kh*kw = 529
    pw = ring.prepare_conv2d(w)
    assert pw.im2col is not None
    assert torch.equal(ring.conv2d(x, pw), conv_reference(x, w, 1, 0, 1, 1))
    with pytest.raises(InvalidArgumentError):
        ring.prepare_conv2d(w, method="conv")


def test_conv2d_errors() -> None:
    x, w = ring_data((1, 4, 5, 5), "ex"), ring_data((4, 2, 3, 3), "ew")
    with pytest.raises(ShapeError):
        ring.conv2d(x, w)  # groups=1 needs 2 input channels
    with pytest.raises(InvalidArgumentError):
        ring.conv2d(x, ring.prepare_conv2d(w, groups=2), groups=1)
    with pytest.raises(InvalidArgumentError):
        ring.prepare_conv2d(w, groups=3)
    with pytest.raises(InvalidArgumentError):
        ring.conv2d(x, w, groups=2, stride=0)
    with pytest.raises(ShapeError):
        ring.conv2d(x[:, :, :2, :2], w, groups=2)
    with pytest.raises(InvalidArgumentError):
        ring.conv2d(x, ring.prepare(w), groups=2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu() -> None:
    a, b = ring_data((50, 1300), "ga"), ring_data((1300, 30), "gb")
    assert torch.equal(ring.matmul(a.cuda(), ring.prepare(b.cuda())).cpu(), a @ b)
    x, w = ring_data((2, 64, 9, 9), "gx"), ring_data((8, 32, 3, 3), "gw")
    ref = conv_reference(x, w, 2, 1, 1, 2)
    assert torch.equal(ring.conv2d(x.cuda(), w.cuda(), stride=2, padding=1, groups=2).cpu(), ref)
