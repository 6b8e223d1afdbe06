"""Goodness of fit of the exact DP samplers (10^6 draws, alpha = 1e-6 per check), the party
shares of infinitely divisible noise, and the same suite rejecting deliberately broken
samplers. Seeds are fixed, so a run is reproducible; heavier scales carry ``slow``."""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction

import dp_gof as G
import numpy as np
import pytest

from secureinfer.dp import _exact, mechanisms, samplers
from secureinfer.dp import accountant as A
from secureinfer.prg import Prg

N = 1_000_000
slow = pytest.mark.slow


def prg(label: str) -> Prg:
    return Prg.derived(b"secureinfer-dp-stats-test-seed!!", label)


def check(x: np.ndarray, law: G.Law) -> None:
    pv = G.run_suite(x, law)
    assert G.passes(pv), f"{law.name}: {pv}"


# ------------------------------------------------------------------ every sampler, several scales

DLAP = [Fraction(1, 2), Fraction(3), Fraction(1000), pytest.param(Fraction(1, 5), marks=slow), pytest.param(Fraction(196608), marks=slow)]
DGAUSS = [Fraction(1, 4), Fraction(9), Fraction(1 << 20), pytest.param(Fraction(7, 2), marks=slow), pytest.param(Fraction(1 << 32), marks=slow)]
POIS = [Fraction(3, 10), Fraction(7, 3), Fraction(10**6) + Fraction(1, 3), pytest.param(Fraction(9, 10), marks=slow), pytest.param(Fraction(40), marks=slow), pytest.param(Fraction(2**40, 3), marks=slow)]
SKEL = [Fraction(5, 2), Fraction(1000), pytest.param(Fraction(1, 3), marks=slow), pytest.param(Fraction(10**7), marks=slow)]
BINOM = [(5, Fraction(1, 3)), (100, Fraction(1, 3)), (10**6, Fraction(2, 7)), pytest.param(40, Fraction(9, 10), marks=slow), pytest.param(10**9, Fraction(1, 2), marks=slow)]
NB = [(Fraction(1, 3), Fraction(10)), (Fraction(1, 2), Fraction(1000)), pytest.param(Fraction(5, 2), Fraction(2), marks=slow), pytest.param(Fraction(2, 3), Fraction(65536), marks=slow)]


@pytest.mark.parametrize("scale", DLAP)
def test_discrete_laplace(scale: Fraction) -> None:
    check(samplers.discrete_laplace(prg(f"dlap{scale}"), scale=scale, size=N), G.discrete_laplace(float(scale)))


@pytest.mark.parametrize("sigma2", DGAUSS)
def test_discrete_gaussian(sigma2: Fraction) -> None:
    check(samplers.discrete_gaussian(prg(f"dg{sigma2}"), sigma2=sigma2, size=N), G.discrete_gaussian(float(sigma2)))


@pytest.mark.parametrize("lam", POIS)
def test_poisson(lam: Fraction) -> None:
    check(samplers.poisson(prg(f"pois{lam}"), lam=lam, size=N), G.poisson(float(lam)))


@pytest.mark.parametrize("mu", SKEL)
def test_skellam(mu: Fraction) -> None:
    check(samplers.skellam(prg(f"sk{mu}"), mu=mu, size=N), G.skellam(float(mu)))


@pytest.mark.parametrize("n,p", BINOM)
def test_binomial(n: int, p: Fraction) -> None:
    check(samplers.binomial(prg(f"bin{n},{p}"), n=n, p=p, size=N), G.binomial(n, float(p)))


@pytest.mark.parametrize("r,scale", NB)
def test_negative_binomial(r: Fraction, scale: Fraction) -> None:
    x = samplers.negative_binomial(prg(f"nb{r},{scale}"), r=r, scale=scale, size=N)
    check(x, G.negative_binomial(float(r), float(scale)))


# ------------------------------------------------------------------ party shares


def test_discrete_laplace_shares_sum_and_honest_part() -> None:
    n, scale = 3, Fraction(5)
    shares = [samplers.discrete_laplace_share(prg(f"dls{i}"), scale=scale, n_parties=n, size=N) for i in range(n)]
    check(sum(shares), G.discrete_laplace(5.0))  # exactly discrete Laplace
    honest = shares[0] + shares[1]  # one party's share removed (it colludes)
    check(honest, G.nb_difference(2 / 3, 5.0))
    q = math.exp(-1 / 5)
    expected = A.honest_variance(2 * q / (1 - q) ** 2, n_parties=n, collusion_threshold=1)
    assert abs(float(np.var(honest)) / expected - 1) < 6 * math.sqrt(5 / N)


def test_skellam_shares_sum_and_honest_part() -> None:
    n, mu = 3, Fraction(300)
    shares = [samplers.skellam_share(prg(f"sks{i}"), mu=mu, n_parties=n, size=N) for i in range(n)]
    check(sum(shares), G.skellam(300.0))
    honest = shares[1] + shares[2]
    check(honest, G.skellam(200.0))
    expected = A.honest_variance(600.0, n_parties=n, collusion_threshold=1)
    assert abs(float(np.var(honest)) / expected - 1) < 6 * math.sqrt(2 / N)


def test_mechanism_shares_honest_parties_carry_full_noise() -> None:
    """n = 3, t = 1: any two honest shares from draw_noise_share sum to the declared law."""
    mech = mechanisms.LaplaceMechanism(Fraction(4), 1, collusion_threshold=1)
    a, b = (mechanisms.draw_noise_share(prg(f"mech{i}"), mech, 3, N) for i in range(2))
    check(a + b, G.discrete_laplace(4.0))


# ------------------------------------------------------------------ broken samplers must be rejected


def _dlap_u_off_by_one(g: Prg, size: int) -> np.ndarray:
    """CKS20 Algorithm 2 for scale t = 10 with U drawn from [0, t-1) instead of [0, t)."""
    t, out, todo = 10, np.empty(size, dtype=np.int64), np.arange(size)
    while todo.size:
        u = _exact.below(g, t - 1, todo.size)
        keep = _exact.bern_exp(g, u, t)
        y = u[keep] + t * _exact.geometric_e1(g, int(keep.sum()))
        neg = g.bits(y.size).astype(bool)
        good = ~(neg & (y == 0))
        idx = todo[keep]
        out[idx[good]] = np.where(neg, -y, y)[good]
        todo = np.concatenate([todo[~keep], idx[~good]])
    return out


def _rounded_continuous_laplace(g: Prg, size: int) -> np.ndarray:
    """The textbook float sampler: round(b * sign * -log(U)) -- not the discrete Laplace."""
    u = ((g.uint64(size) >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53
    sign = np.where(g.bits(size).astype(bool), -1.0, 1.0)
    return np.rint(sign * -2.0 * np.log(u)).astype(np.int64)


def _dlap_biased_sign(g: Prg, size: int) -> np.ndarray:
    """Discrete Laplace(3) whose sign coin is Bernoulli(0.51) instead of 1/2."""
    out, todo = np.empty(size, dtype=np.int64), np.arange(size)
    while todo.size:
        y = _exact.geometric_scaled(g, 3, 1, todo.size)
        neg = _exact.below(g, 100, todo.size) < 51
        good = ~(neg & (y == 0))
        out[todo[good]] = np.where(neg, -y, y)[good]
        todo = todo[~good]
    return out


def _dgauss_biased_bernoulli(g: Prg, size: int) -> np.ndarray:
    """Discrete Gaussian(9) built on a Bernoulli primitive whose P(1) is ~2 points too high."""
    real = _exact.bern_frac

    def biased(prg_: Prg, num: np.ndarray, den: int) -> np.ndarray:
        return real(prg_, num, den) | (_exact.below(prg_, 50, num.size) == 0)

    _exact.bern_frac = biased  # type: ignore[assignment]
    try:
        return samplers.discrete_gaussian(g, sigma2=9, size=size)
    finally:
        _exact.bern_frac = real  # type: ignore[assignment]


BROKEN: list[tuple[str, Callable[[Prg, int], np.ndarray], Callable[[], G.Law]]] = [
    ("dlap: U range off by one", _dlap_u_off_by_one, lambda: G.discrete_laplace(10.0)),
    ("dlap: scale 1% too large", lambda g, n: samplers.discrete_laplace(g, scale=Fraction(1010, 100), size=n), lambda: G.discrete_laplace(10.0)),
    ("dlap: rounded continuous Laplace", _rounded_continuous_laplace, lambda: G.discrete_laplace(2.0)),
    ("dlap: biased sign Bernoulli", _dlap_biased_sign, lambda: G.discrete_laplace(3.0)),
    ("dgauss: biased Bernoulli primitive", _dgauss_biased_bernoulli, lambda: G.discrete_gaussian(9.0)),
    ("dgauss: sigma2 off by one", lambda g, n: samplers.discrete_gaussian(g, sigma2=10, size=n), lambda: G.discrete_gaussian(9.0)),
    ("dgauss: sigma 1% too large", lambda g, n: samplers.discrete_gaussian(g, sigma2=Fraction(9 * 10201, 10000), size=n), lambda: G.discrete_gaussian(9.0)),
    ("poisson: lambda off by one", lambda g, n: samplers.poisson(g, lam=41, size=n), lambda: G.poisson(40.0)),
    ("skellam: mu 1% too large", lambda g, n: samplers.skellam(g, mu=Fraction(505, 2), size=n), lambda: G.skellam(250.0)),
    ("skellam shares: one party missing", lambda g, n: sum(samplers.skellam_share(g, mu=300, n_parties=3, size=n) for _ in range(2)), lambda: G.skellam(300.0)),
    ("nb: r off by one third", lambda g, n: samplers.negative_binomial(g, r=Fraction(2, 3), scale=10, size=n), lambda: G.negative_binomial(1 / 3, 10.0)),
]


@pytest.mark.parametrize("name,sampler,law", BROKEN, ids=[b[0] for b in BROKEN])
def test_suite_rejects_broken_sampler(name: str, sampler: Callable[[Prg, int], np.ndarray], law: Callable[[], G.Law]) -> None:
    n = N // 5 if "missing" in name else N  # a third of the variance gone: 2e5 draws suffice
    pv = G.run_suite(sampler(prg("broken " + name), n), law())
    assert not G.passes(pv), f"{name} was not detected: {pv}"
