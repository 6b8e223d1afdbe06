"""Watermark scheme: key expansion, exact extraction, quantization bound, binomial statistics."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch

from secureinfer.errors import InvalidArgumentError, RangeError
from secureinfer.prg import Prg
from secureinfer.watermark.scheme import (
    binomial_cdf,
    bit_errors,
    extract_bits,
    fixed_point_projection,
    float_projection,
    p_value,
    project_fixed_point,
    projection_matrix,
    projection_signs,
    quantization_bound,
    quantize_weights,
    seed_from,
    sign_blocks,
    threshold_for_fpr,
    watermark_bits,
)


def _brute_threshold(n: int, fpr: float) -> int:
    best = -1
    for k in range(n + 1):
        if Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n) <= Fraction(fpr):
            best = k
    return best


@pytest.mark.parametrize("n,fpr", [(256, 1e-9), (256, 1e-6), (64, 1e-3), (40, 1e-9), (300, 1e-12), (30, 0.5)])
def test_threshold_is_largest_k_within_fpr(n: int, fpr: float) -> None:
    k = threshold_for_fpr(n, fpr)
    assert k == _brute_threshold(n, fpr)
    assert binomial_cdf(k, n) <= Fraction(fpr) < binomial_cdf(k + 1, n)


def test_threshold_default_and_p_values() -> None:
    assert threshold_for_fpr(256) == 80  # P[Bin(256,1/2) <= 80] = 9.43e-10 <= 1e-9 < P[<= 81]
    assert p_value(0, 256) == 2.0**-256
    assert p_value(256, 256) == 1.0
    assert p_value(128, 256) == pytest.approx(0.5 + math.comb(256, 128) / 2**257)


def test_threshold_refuses_impossible_rates() -> None:
    with pytest.raises(InvalidArgumentError):
        threshold_for_fpr(16, 1e-9)  # 2^-16 > 1e-9
    for bad in (0.0, 1.0, -1.0, float("nan")):
        with pytest.raises(InvalidArgumentError):
            threshold_for_fpr(256, bad)


def test_expansion_is_deterministic_balanced_and_key_dependent() -> None:
    s1, s2 = bytes(32), bytes([1]) + bytes(31)
    a = projection_signs(s1, bits=256, dim=4096)
    assert a.dtype == torch.int8 and set(a.unique().tolist()) == {-1, 1}
    assert torch.equal(a, projection_signs(s1, bits=256, dim=4096))
    assert abs(float(a.float().mean())) < 0.01  # 1M Rademacher entries: sd 0.001
    assert not torch.equal(a, projection_signs(s2, bits=256, dim=4096))
    b = watermark_bits(s1, bits=256)
    assert b.dtype == torch.uint8 and 90 < int(b.sum()) < 166
    assert not torch.equal(b, watermark_bits(s2, bits=256))
    x = projection_matrix(s1, bits=8, dim=100, dtype=torch.float64)
    assert torch.allclose(x.norm(dim=1), torch.ones(8, dtype=torch.float64))


@pytest.mark.parametrize("dim", [1, 7, 64, 1001])
@pytest.mark.parametrize("chunk", [1, 9, 100, 1 << 22])
def test_sign_blocks_match_the_full_matrix(dim: int, chunk: int) -> None:
    seed = bytes(range(32))
    full = projection_signs(seed, bits=37, dim=dim)
    assert torch.equal(torch.cat(list(sign_blocks(seed, bits=37, dim=dim, chunk_elems=chunk))), full)


def test_seed_binds_owner_and_nonce() -> None:
    pk, nonce = bytes(range(32)), bytes(32)
    assert seed_from(pk, nonce) != seed_from(bytes(32), nonce)
    assert seed_from(pk, nonce) != seed_from(pk, bytes([1]) + bytes(31))
    with pytest.raises(InvalidArgumentError):
        seed_from(pk[:31], nonce)


def test_fixed_point_projection_is_exact_and_matches_python_ints() -> None:
    prg = Prg(bytes(32))
    q = torch.from_numpy(prg.below(2**40, 300)) - 2**39
    signs = projection_signs(bytes(32), bits=5, dim=300)
    y = fixed_point_projection(signs, q)
    ref = [sum(int(s) * int(v) for s, v in zip(row.tolist(), q.tolist())) for row in signs]
    assert y.tolist() == ref
    assert torch.equal(project_fixed_point(bytes(32), q, bits=5), y)
    with pytest.raises(RangeError):
        fixed_point_projection(signs, torch.full((300,), 2**60, dtype=torch.int64))


def test_quantization_bound_holds_in_the_worst_case() -> None:
    dim, f = 512, 4
    seed = bytes(range(32))
    signs = projection_signs(seed, bits=16, dim=dim)
    x = signs.double() / math.sqrt(dim)
    # Worst case for row 0: every weight sits just below a rounding tie, pushed against the sign.
    w = (torch.arange(dim, dtype=torch.float64) % 5) * 2.0**-f + signs[0].double() * (0.5 - 1e-9) * 2.0**-f
    q = quantize_weights(w, frac_bits=f)
    change = (x @ (q.double() * 2.0**-f) - x @ w).abs()
    bound = quantization_bound(dim, frac_bits=f)
    assert float(change.max()) <= bound
    assert float(change[0]) > 0.49 * bound  # the bound is attained up to the 1/2 of rounding


def test_sign_of_float_projection_equals_exact_extraction_when_margin_exceeds_bound() -> None:
    dim, f = 2048, 16
    seed = bytes(range(32))
    w = torch.from_numpy(Prg(bytes(32)).below(2**20, dim).astype("float64")) / 2**20 - 0.5
    y_float = float_projection(projection_matrix(seed, bits=64, dim=dim, dtype=torch.float64), w)
    keep = y_float.abs() > quantization_bound(dim, frac_bits=f)
    y_int = project_fixed_point(seed, quantize_weights(w, frac_bits=f), bits=64)
    assert keep.sum() > 50
    assert torch.equal(extract_bits(y_float)[keep], extract_bits(y_int)[keep])


def test_extract_and_bit_errors() -> None:
    y = torch.tensor([-3, 0, 5, -1])
    assert extract_bits(y).tolist() == [0, 1, 1, 0]
    assert bit_errors(torch.tensor([0, 1, 1, 0]), torch.tensor([1, 1, 0, 0])) == 2
    with pytest.raises(InvalidArgumentError):
        bit_errors(torch.zeros(3), torch.zeros(4))


def test_quantize_rejects_nan_and_overflow() -> None:
    with pytest.raises(RangeError):
        quantize_weights(torch.tensor([float("nan")]))
    with pytest.raises(RangeError):
        quantize_weights(torch.tensor([2.0**50]), frac_bits=16)


def test_unrelated_weights_give_binomial_hamming_distance() -> None:
    """Over random keys the distance from any fixed model is Bin(T, 1/2): check mean and spread."""
    w = torch.linspace(-1, 1, 600)
    q = quantize_weights(w)
    prg = Prg(bytes([9]) * 32)
    dists = []
    for _ in range(200):
        seed = prg.bytes(32)
        dists.append(bit_errors(extract_bits(project_fixed_point(seed, q, bits=64)), watermark_bits(seed, bits=64)))
    mean = sum(dists) / len(dists)
    var = sum((d - mean) ** 2 for d in dists) / (len(dists) - 1)
    assert abs(mean - 32) < 1.5  # sd of the mean: 4/sqrt(200) = 0.28
    assert 10 < var < 24  # Bin(64, 1/2) variance 16
