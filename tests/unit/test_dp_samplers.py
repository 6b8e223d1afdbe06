"""Unit tests of the exact samplers: exact arithmetic, float-filter error bounds, the exact
fallback path, argument checking. The distribution tests are in tests/stats."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import stats

from secureinfer.dp import _counts, _exact, samplers
from secureinfer.errors import InvalidArgumentError
from secureinfer.prg import Prg

mpmath = pytest.importorskip("mpmath")


def prg(tag: int = 0) -> Prg:
    return Prg(bytes([tag]) * 32)


def _exact_log(num: int, den: int) -> float:
    with mpmath.workdps(60):
        return float(mpmath.log(mpmath.mpf(num)) - mpmath.log(mpmath.mpf(den)))


# ------------------------------------------------------------------ float filter formulas


@pytest.mark.parametrize("lam", [Fraction(1), Fraction(7, 3), Fraction(40), Fraction(1001, 7), Fraction(10**6 + 1, 3), Fraction(10**12) + Fraction(1, 3)])
def test_poisson_log_ratio_within_stated_error(lam: Fraction) -> None:
    m = lam.numerator // lam.denominator
    sd = math.sqrt(float(lam))
    js = sorted({0, 1, -1, 2, -2, 15, -15} | {int(c * sd) for c in (-9, -4, -1.5, 0.7, 3, 8, 20)})
    js = np.array([j for j in js if j >= -m and abs(j) <= 20000], dtype=np.int64)
    val, err = _counts.poisson_logr(lam, m, js)
    for j, v, e in zip(js, val, err):
        ref = _exact_log(*_counts.poisson_ratio(lam, m, int(j)))
        assert abs(v - ref) <= e, (int(j), v, ref, e)
        assert e < 1e-7


@pytest.mark.parametrize("n,p", [(20, Fraction(1, 3)), (100, Fraction(1, 2)), (5000, Fraction(1, 7)), (10**9, Fraction(1, 3)), (10**6, Fraction(3, 10**5))])
def test_binomial_log_ratio_within_stated_error(n: int, p: Fraction) -> None:
    m = ((n + 1) * p.numerator) // p.denominator
    sd = math.sqrt(float(n * p * (1 - p)))
    js = {0, 1, -1, 16, -16} | {int(c * sd) for c in (-9, -3, -1, 0.5, 2, 7, 15)}
    js = np.array(sorted(j for j in js if -m <= j <= n - m and abs(j) <= 20000), dtype=np.int64)
    val, err = _counts.binomial_logr(n, p, m, js)
    for j, v, e in zip(js, val, err):
        ref = _exact_log(*_counts.binomial_ratio(n, p, m, int(j)))
        assert abs(v - ref) <= e, (int(j), v, ref, e)


@pytest.mark.parametrize("r,scale", [(Fraction(1, 3), Fraction(10)), (Fraction(1, 2), Fraction(3, 2)), (Fraction(2, 3), Fraction(65536))])
def test_nb_log_pmf_within_stated_error(r: Fraction, scale: Fraction) -> None:
    ks = np.array([0, 1, 2, 5, 15, 16, 17, 100, 1000, 5000, 20000], dtype=np.int64)
    val, err = _counts.nb_logf(r, scale, ks)
    for k, v, e in zip(ks, val, err):
        num, den = _counts.nb_coeff(r, int(k))
        with mpmath.workdps(60):
            ref = float(mpmath.log(mpmath.mpf(num)) - mpmath.log(mpmath.mpf(den)) - mpmath.mpf(int(k)) / mpmath.mpf(scale.numerator) * scale.denominator)
        assert abs(v - ref) <= e, (int(k), v, ref, e)


@pytest.mark.parametrize("lam", [Fraction(1), Fraction(5, 2), Fraction(10**6 + 1, 3), Fraction(2**59) + Fraction(1, 3)])
def test_poisson_envelope_constant_bounds_the_sup(lam: Fraction, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, float] = {}
    real = _counts._envelope

    def spy(*args: object, **kw: object) -> np.ndarray:
        seen.update(sup=kw["sup"], t=kw["t"], m=kw["m"])  # type: ignore[arg-type]
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(_counts, "_envelope", spy)
    samplers.poisson(prg(9), lam=lam, size=10)
    m, t = int(seen["m"]), int(seen["t"])
    lam_f = float(lam)
    centers = [lam_f * math.expm1(1 / t) + float(lam - m), lam_f * math.expm1(-1 / t) + float(lam - m)]
    js = {0} | {int(c) + d for c in centers for d in range(-300, 301)} | {int(v) for v in np.linspace(-m, 40 * t, 2001)}
    j = np.array(sorted(v for v in js if v >= -m), dtype=np.int64)
    val, _ = _counts.poisson_logr(lam, m, j)
    assert seen["sup"] >= float(np.max(val + np.abs(j) / t))


@pytest.mark.parametrize("n,p", [(20, Fraction(1, 3)), (10**6, Fraction(1, 2)), (2**58, Fraction(1, 3)), (10**7, Fraction(1, 10**6))])
def test_binomial_envelope_constant_bounds_the_sup(n: int, p: Fraction, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: dict[str, float] = {}
    real = _counts._envelope

    def spy(*args: object, **kw: object) -> np.ndarray:
        seen.update(sup=kw["sup"], t=kw["t"], m=kw["m"])  # type: ignore[arg-type]
        return real(*args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(_counts, "_envelope", spy)
    samplers.binomial(prg(10), n=n, p=p, size=10)
    m, t = int(seen["m"]), int(seen["t"])
    js = set(range(-min(m, 2000), 2001)) | {int(v) for v in np.linspace(-m, min(n - m, 60 * t), 4001)}
    js |= {int(v) for v in np.linspace(-40 * t, 40 * t, 8001)}
    j = np.array(sorted(v for v in js if -m <= v <= n - m), dtype=np.int64)
    val, _ = _counts.binomial_logr(n, p, m, j)
    assert seen["sup"] >= float(np.max(val + np.abs(j) / t))


def test_log1pmx_and_lnfact() -> None:
    x = np.array([-0.9, -0.3, -0.2499, -1e-3, 0.0, 1e-8, 0.1, 0.25, 3.0])
    with mpmath.workdps(40):
        ref = [float(mpmath.log1p(mpmath.mpf(v)) - mpmath.mpf(v)) for v in x]
    assert np.allclose(_counts.log1pmx(x), ref, rtol=1e-13, atol=1e-300)
    k = np.array([0, 1, 15, 16, 17, 1000, 10**9])
    with mpmath.workdps(40):
        ref = [float(mpmath.loggamma(int(v) + 1)) for v in k]
    assert np.allclose(_counts.lnfact(k), ref, rtol=1e-14)


# ------------------------------------------------------------------ exact arithmetic


@pytest.mark.parametrize("x", [Fraction(0), Fraction(1, 3), Fraction(-7, 2), Fraction(100, 7), Fraction(-300), Fraction(2**-40)])
def test_exp_bounds_bracket(x: Fraction) -> None:
    for prec in (8, 64, 200):
        lo, hi = _exact.exp_bounds(x, prec)
        with mpmath.workdps(120):
            v = mpmath.exp(mpmath.mpf(x.numerator) / x.denominator) * mpmath.mpf(2) ** prec
            assert lo <= v <= hi
            assert hi - lo <= max(4, v * mpmath.mpf(2) ** (-prec + 4))


def test_exact_less_decides_correctly() -> None:
    g = prg(1)
    half = 1 << 61
    assert _exact.exact_less(g, half - 1, 1, 2, Fraction(0))  # U < 1/2 for sure
    assert not _exact.exact_less(g, half, 1, 2, Fraction(0))  # U >= 1/2 for sure
    # threshold inside [v, v+1)/2^62: needs extra bits; check the rate of the refinement
    hits = sum(_exact.exact_less(g, 5, 5 * 4 + 1, 4 << 62, Fraction(0)) for _ in range(4000))
    # A = (5 + 1/4)/2^62, U = (5 + rest)/2^62: P(U < A) = 1/4
    assert stats.binomtest(hits, 4000, 0.25).pvalue > 1e-6


def test_accept_filtered_fallback_is_exact() -> None:
    g = prg(2)
    n = 6000
    log_a = np.full(n, math.log(1 / 3))
    calls: list[int] = []

    def exact13(i: int) -> tuple[int, int, Fraction]:
        calls.append(i)
        return 1, 3, Fraction(0)

    out = _exact.accept_filtered(g, log_a, 50.0, exact13)  # a huge margin: every draw goes exact
    assert len(calls) == n
    assert stats.binomtest(int(out.sum()), n, 1 / 3).pvalue > 1e-6
    calls.clear()
    out = _exact.accept_filtered(g, log_a, 1e-9, exact13)
    assert len(calls) < 5
    assert stats.binomtest(int(out.sum()), n, 1 / 3).pvalue > 1e-6


def test_bernoulli_big_denominators() -> None:
    g = prg(3)
    den = (1 << 90) + 12345
    num = np.full(20000, den // 3, dtype=object)
    assert stats.binomtest(int(_exact.bern_frac(g, num, den).sum()), 20000, 1 / 3).pvalue > 1e-6
    gam = np.full(20000, 3 * ((1 << 80) + 1) // 2, dtype=object)  # gamma ~ 3/2 with a huge denominator
    hits = int(_exact.bern_exp(g, gam, (1 << 80) + 1).sum())
    assert stats.binomtest(hits, 20000, math.exp(-1.5)).pvalue > 1e-6
    assert _exact.bern_frac(g, np.array([5, 0, 9], dtype=np.int64), 5).tolist() == [True, False, True]


def test_below_is_uniform_and_in_range() -> None:
    g = prg(4)
    for bound in (1, 2, 3, 7, 1000, (1 << 33) + 5, 1 << 63):
        x = _exact.below(g, bound, 5000)
        assert x.dtype == np.int64 and x.min() >= 0 and (x.max() < bound if bound < (1 << 63) else True)
    x = _exact.below(g, 7, 70000)
    assert stats.chisquare(np.bincount(x, minlength=7)).pvalue > 1e-6


# ------------------------------------------------------------------ fallback path end to end


def test_poisson_and_nb_through_the_exact_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """With the filter disabled every acceptance is decided by exact big-integer arithmetic."""
    monkeypatch.setattr(_counts, "_FLOOR", 60.0)
    g = prg(5)
    x = samplers.poisson(g, lam=Fraction(7, 3), size=3000)
    k = np.arange(0, 9)
    obs = np.array([np.sum(x == v) for v in k] + [np.sum(x >= 9)])
    exp = np.append(stats.poisson.pmf(k, 7 / 3), stats.poisson.sf(8, 7 / 3)) * 3000
    assert stats.chisquare(obs, exp).pvalue > 1e-6
    y = samplers.negative_binomial(g, r=Fraction(1, 2), scale=Fraction(2), size=2000)
    k = np.arange(0, 6)
    q = math.exp(-0.5)
    obs = np.array([np.sum(y == v) for v in k] + [np.sum(y >= 6)])
    exp = np.append(stats.nbinom.pmf(k, 0.5, 1 - q), stats.nbinom.sf(5, 0.5, 1 - q)) * 2000
    assert stats.chisquare(obs, exp).pvalue > 1e-6


def test_nb_beyond_bands_path() -> None:
    """The proposal from beyond the core bands (normally reached with prob. < e^-100)."""
    g = prg(6)
    got = [_counts._nb_beyond_one(g, Fraction(1, 2), Fraction(1, 8), 4, 0, 1 << 40) for _ in range(200)]
    assert all(v is None or v >= 16 for v in got)


# ------------------------------------------------------------------ API


def test_shapes_dtypes_and_determinism() -> None:
    for fn in (
        lambda g: samplers.discrete_laplace(g, scale=3, size=(4, 5)),
        lambda g: samplers.discrete_gaussian(g, sigma2=Fraction(5, 2), size=(4, 5)),
        lambda g: samplers.skellam(g, mu=2, size=(4, 5)),
        lambda g: samplers.binomial(g, n=30, p=Fraction(1, 4), size=(4, 5)),
        lambda g: samplers.poisson(g, lam=Fraction(1, 3), size=(4, 5)),
        lambda g: samplers.negative_binomial(g, r=Fraction(4, 3), scale=2, size=(4, 5)),
        lambda g: samplers.geometric(g, scale=2, size=(4, 5)),
        lambda g: samplers.discrete_laplace_share(g, scale=5, n_parties=3, size=(4, 5)),
        lambda g: samplers.skellam_share(g, mu=9, n_parties=3, size=(4, 5)),
    ):
        a, b, c = fn(prg(7)), fn(prg(7)), fn(prg(8))
        assert a.shape == (4, 5) and a.dtype == np.int64
        assert np.array_equal(a, b)
        assert not np.array_equal(a, c)
    assert samplers.bernoulli(prg(), p=Fraction(1, 2), size=3).dtype == bool
    assert samplers.bernoulli_exp(prg(), gamma=0, size=4).all()
    assert samplers.poisson(prg(), lam=0, size=3).tolist() == [0, 0, 0]
    assert samplers.binomial(prg(), n=9, p=1, size=2).tolist() == [9, 9]
    assert samplers.discrete_laplace(prg(), scale=1, size=0).shape == (0,)


def test_bad_arguments_are_refused() -> None:
    g = prg()
    bad = [
        lambda: samplers.discrete_laplace(g, scale=0.5, size=3),  # float: not an exact rational
        lambda: samplers.discrete_laplace(g, scale=0, size=3),
        lambda: samplers.discrete_laplace(g, scale=-2, size=3),
        lambda: samplers.discrete_laplace(g, scale=Fraction(1, 3**40), size=3),
        lambda: samplers.discrete_gaussian(g, sigma2=True, size=3),
        lambda: samplers.poisson(g, lam=-1, size=3),
        lambda: samplers.binomial(g, n=-1, p=Fraction(1, 2), size=3),
        lambda: samplers.binomial(g, n=5, p=Fraction(3, 2), size=3),
        lambda: samplers.bernoulli(g, p=2, size=3),
        lambda: samplers.skellam(g, mu=0, size=3),
        lambda: samplers.discrete_laplace_share(g, scale=1, n_parties=0, size=3),
        lambda: samplers.skellam_share(g, mu=1, n_parties=1.5, size=3),  # type: ignore[arg-type]
        lambda: samplers.geometric(g, scale=2, size=-1),
        lambda: samplers.negative_binomial(g, r=0, scale=2, size=3),
    ]
    for fn in bad:
        with pytest.raises(InvalidArgumentError):
            fn()
