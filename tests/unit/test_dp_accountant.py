"""Accountant values against closed forms and independent numerical computations."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from scipy import integrate, special, stats

from secureinfer.dp import accountant as A
from secureinfer.errors import InvalidArgumentError

REL = 0.01  # the acceptance criterion: within 1%


def _renyi_continuous(logp, logq, alpha: float, lo: float, hi: float) -> float:
    """D_alpha(P||Q) by numerical integration (independent of the closed forms)."""
    f = lambda x: math.exp(alpha * logp(x) + (1 - alpha) * logq(x))  # noqa: E731
    pts = [0.0, 1.0] if lo < 0 < hi else None
    val, _ = integrate.quad(f, lo, hi, points=pts, limit=400, epsabs=0, epsrel=1e-11)
    return math.log(val) / (alpha - 1)


def _renyi_discrete(logp: np.ndarray, logq: np.ndarray, alpha: float) -> float:
    return float(special.logsumexp(alpha * logp + (1 - alpha) * logq)) / (alpha - 1)


# ------------------------------------------------------------------ closed forms vs numerics


@pytest.mark.parametrize("sigma2,d2,alpha", [(1.0, 1.0, 2.0), (4.0, 1.0, 8.0), (0.25, 4.0, 1.5), (100.0, 9.0, 32.0)])
def test_gaussian_rdp_matches_integral(sigma2: float, d2: float, alpha: float) -> None:
    (got,) = A.rdp_gaussian(sigma2=sigma2, l2_sensitivity_sq=d2, orders=[alpha])
    d, s = math.sqrt(d2), math.sqrt(sigma2)
    ref = _renyi_continuous(
        lambda x: stats.norm.logpdf(x, 0, s), lambda x: stats.norm.logpdf(x, d, s), alpha, -40 * s - 10, 40 * s + 10
    )
    assert got == pytest.approx(ref, rel=REL)
    assert got == pytest.approx(alpha * d2 / (2 * sigma2), rel=1e-12)


@pytest.mark.parametrize("b,alpha", [(1.0, 2.0), (2.0, 8.0), (0.5, 1.5), (10.0, 32.0), (1.0, 1.1)])
def test_laplace_rdp_matches_integral(b: float, alpha: float) -> None:
    (got,) = A.rdp_laplace(scale=b, sensitivity=1.0, orders=[alpha])
    ref = _renyi_continuous(
        lambda x: stats.laplace.logpdf(x, 0, b), lambda x: stats.laplace.logpdf(x, 1, b), alpha, -60 * b, 60 * b + 1
    )
    assert got == pytest.approx(ref, rel=REL)


def test_laplace_rdp_published_value() -> None:
    # Mironov 2017 Prop. 6 at b = 1, alpha = 2: log(2/3 e + 1/3 e^-2) = 0.61912...
    (got,) = A.rdp_laplace(scale=1.0, sensitivity=1.0, orders=[2.0])
    assert got == pytest.approx(math.log(2 / 3 * math.e + 1 / 3 * math.exp(-2)), rel=1e-12)
    assert got == pytest.approx(0.619124, rel=1e-5)


@pytest.mark.parametrize("s,d,alpha", [(1.0, 1, 2.0), (3.0, 2, 8.0), (0.7, 5, 1.5), (50.0, 7, 20.0), (2.5, 1, 1024.0)])
def test_discrete_laplace_rdp_matches_pmf_sum(s: float, d: int, alpha: float) -> None:
    (got,) = A.rdp_discrete_laplace(scale=s, sensitivity=d, orders=[alpha])
    k = np.arange(-int(80 * s) - 50 - d, int(80 * s) + 50 + d)
    q = math.exp(-1 / s)
    logc = math.log((1 - q) / (1 + q))
    logp = logc - np.abs(k) / s
    logq = logc - np.abs(k - d) / s
    assert got == pytest.approx(_renyi_discrete(logp, logq, alpha), rel=REL)
    assert got <= d / s + 1e-12


@pytest.mark.parametrize("sigma2,d,alpha", [(4.0, 1, 2.0), (9.0, 2, 8.0), (25.0, 3, 32.0), (1.0, 1, 4.0)])
def test_discrete_gaussian_rdp_bound(sigma2: float, d: int, alpha: float) -> None:
    (bound,) = A.rdp_gaussian(sigma2=sigma2, l2_sensitivity_sq=d * d, orders=[alpha])
    k = np.arange(-int(60 * math.sqrt(sigma2)) - 20, int(60 * math.sqrt(sigma2)) + 20)
    logz = float(special.logsumexp(-(k**2) / (2 * sigma2)))
    logp = -(k**2) / (2 * sigma2) - logz
    logq = -((k - d) ** 2) / (2 * sigma2) - logz
    exact = _renyi_discrete(logp, logq, alpha)
    assert exact <= bound * (1 + 1e-9)  # CKS20: the discrete Gaussian is at least as private
    if sigma2 >= 4:
        assert bound == pytest.approx(exact, rel=REL)


@pytest.mark.parametrize(
    "mu,d,alpha,tight",
    [(500.0, 5, 8.0, True), (2000.0, 3, 32.0, True), (1000.0, 1, 2.0, True), (5.0, 1, 2.0, False),
     (20.0, 3, 4.0, False), (1.0, 1, 16.0, False), (50.0, 10, 1.5, False)],
)  # fmt: skip
def test_skellam_rdp_bound_vs_exact(mu: float, d: int, alpha: float, tight: bool) -> None:
    (bound,) = A.rdp_skellam(mu=mu, l1_sensitivity=d, l2_sensitivity_sq=d * d, orders=[alpha])
    span = int(14 * math.sqrt(2 * mu)) + 30 + d  # beyond this the pmf underflows; the tail is negligible
    k = np.arange(-span, span + 1)
    logp = stats.skellam.logpmf(k, mu, mu)
    logq = stats.skellam.logpmf(k - d, mu, mu)
    assert np.isfinite(logp).all() and np.isfinite(logq).all()
    exact = _renyi_discrete(logp, logq, alpha)
    assert exact <= bound
    if tight:
        assert bound == pytest.approx(exact, rel=REL)


# ------------------------------------------------------------------ conversion


def _brute_conversion(rho: float, delta: float) -> float:
    alpha = 1 + np.logspace(-5, 6, 1_000_000)
    return float(np.min(alpha * rho + np.log1p(-1 / alpha) - (math.log(delta) + np.log(alpha)) / (alpha - 1)))


@pytest.mark.parametrize("rho,delta", [(0.5, 1e-5), (0.01, 1e-6), (2.0, 1e-9), (1e-4, 1e-5), (10.0, 1e-3)])
def test_zcdp_conversion(rho: float, delta: float) -> None:
    got = A.epsilon_for_delta(A.zcdp_event(rho), delta)
    assert got == pytest.approx(_brute_conversion(rho, delta), rel=1e-3)
    classic = rho + 2 * math.sqrt(rho * math.log(1 / delta))  # Bun & Steinke 2016, Prop. 1.3
    assert got <= classic
    assert A.delta_for_epsilon(A.zcdp_event(rho), got) == pytest.approx(delta, rel=REL)


def test_rdp_conversion_beats_classic() -> None:
    ev = A.compose([A.skellam_event(mu=100, l1_sensitivity=2, l2_sensitivity_sq=2)] * 10)
    delta = 1e-6
    classic = min(t + math.log(1 / delta) / (a - 1) for a, t in zip(ev.orders, ev.rdp))  # Mironov 2017 Prop. 3
    got = A.epsilon_for_delta(ev, delta)
    assert 0 < got <= classic
    assert got >= classic - max(math.log(a) / (a - 1) for a in ev.orders)


def test_gaussian_conversion_sound_vs_analytic_gaussian() -> None:
    # Balle & Wang 2018 (analytic Gaussian): the exact delta(eps) of the Gaussian mechanism.
    sigma, delta = 2.0, 1e-5
    eps = A.epsilon_for_delta(A.gaussian_event(sigma2=sigma**2, l2_sensitivity_sq=1), delta)
    exact_delta = stats.norm.cdf(1 / (2 * sigma) - eps * sigma) - math.exp(eps) * stats.norm.cdf(-1 / (2 * sigma) - eps * sigma)
    assert exact_delta <= delta  # our epsilon is a valid (upper) bound
    assert eps < 1.3 * _analytic_eps(sigma, delta)  # and not much looser than the exact one


def _analytic_eps(sigma: float, delta: float) -> float:
    lo, hi = 0.0, 100.0
    for _ in range(200):
        mid = (lo + hi) / 2
        d = stats.norm.cdf(1 / (2 * sigma) - mid * sigma) - math.exp(mid) * stats.norm.cdf(-1 / (2 * sigma) - mid * sigma)
        lo, hi = (lo, mid) if d <= delta else (mid, hi)
    return hi


def test_classic_gaussian_calibration_holds() -> None:
    # Dwork & Roth 2014, Thm. A.1: sigma = sqrt(2 ln(1.25/delta))/eps gives (eps, delta) for eps < 1.
    for eps, delta in [(0.5, 1e-5), (0.9, 1e-6), (0.1, 1e-3)]:
        sigma2 = 2 * math.log(1.25 / delta) / eps**2
        assert A.epsilon_for_delta(A.gaussian_event(sigma2=sigma2, l2_sensitivity_sq=1), delta) <= eps


def test_pure_dp_composition_and_conversion() -> None:
    ev = A.compose([A.laplace_event(scale=10, sensitivity=1)] * 7)
    assert ev.epsilon == pytest.approx(0.7)
    assert A.epsilon_for_delta(ev, 0.0) == pytest.approx(0.7)
    assert A.epsilon_for_delta(ev, 1e-6) <= 0.7 + 1e-12
    many = A.compose([A.laplace_event(scale=2, sensitivity=1)] * 100)
    assert many.epsilon == pytest.approx(50.0)
    assert A.epsilon_for_delta(many, 1e-6) < 40  # RDP composition beats the sum of epsilons


def test_gaussian_composition_is_additive_in_rho() -> None:
    ev = A.compose([A.gaussian_event(sigma2=Fraction(9, 2), l2_sensitivity_sq=1)] * 4)
    assert ev.rho == pytest.approx(4 / 9)
    assert ev.count == 4
    assert A.epsilon_for_delta(ev, 1e-5) == pytest.approx(A.epsilon_for_delta(A.zcdp_event(4 / 9), 1e-5))


# ------------------------------------------------------------------ never negative, monotone


def test_epsilon_never_negative() -> None:
    for ev in [
        A.gaussian_event(sigma2=1e12, l2_sensitivity_sq=1),
        A.laplace_event(scale=1e9, sensitivity=1),
        A.skellam_event(mu=1e12, l1_sensitivity=1, l2_sensitivity_sq=1),
        A.compose([]),
        A.pure_event(0.0),
    ]:
        for delta in [0.0, 1e-12, 1e-3, 0.5, 0.999]:
            assert A.epsilon_for_delta(ev, delta) >= 0.0


@pytest.mark.parametrize("delta", [1e-9, 1e-5, 1e-2])
def test_monotone_less_noise_more_epsilon(delta: float) -> None:
    noise = [0.5, 1.0, 2.0, 4.0, 16.0, 100.0, 1e4]
    for make in (
        lambda v: A.gaussian_event(sigma2=v, l2_sensitivity_sq=1),
        lambda v: A.laplace_event(scale=v, sensitivity=3),
        lambda v: A.laplace_event(scale=v, sensitivity=3, discrete=False),
        lambda v: A.skellam_event(mu=v, l1_sensitivity=2, l2_sensitivity_sq=2),
        lambda v: A.compose([A.skellam_event(mu=v, l1_sensitivity=1, l2_sensitivity_sq=1)] * 5),
    ):
        eps = [A.epsilon_for_delta(make(v), delta) for v in noise]
        assert all(a >= b for a, b in zip(eps, eps[1:])), eps
        assert eps[0] > eps[-1]


def test_infinite_when_delta_not_achievable() -> None:
    assert A.epsilon_for_delta(A.gaussian_event(sigma2=1, l2_sensitivity_sq=1), 0.0) == math.inf


# ------------------------------------------------------------------ collusion


def test_honest_fraction_and_variance() -> None:
    assert A.honest_fraction(3, 1) == Fraction(2, 3)
    assert A.honest_fraction(2, 1) == Fraction(1, 2)
    assert A.honest_variance(12.0, n_parties=4, collusion_threshold=1) == pytest.approx(9.0)
    for n, t in [(3, 3), (3, -1), (0, 0), (2, 5)]:
        with pytest.raises(InvalidArgumentError):
            A.honest_fraction(n, t)


def test_distributed_skellam_counts_only_honest_noise() -> None:
    kw = dict(l1_sensitivity=1, l2_sensitivity_sq=1)
    ev = A.distributed_skellam_event(mu_total=300, n_parties=3, collusion_threshold=1, **kw)
    assert ev.rdp == A.skellam_event(mu=200, **kw).rdp
    worse = A.distributed_skellam_event(mu_total=300, n_parties=3, collusion_threshold=2, **kw)
    assert A.epsilon_for_delta(worse, 1e-6) > A.epsilon_for_delta(ev, 1e-6)


def test_distributed_laplace_event() -> None:
    full = A.distributed_laplace_event(scale=4, share_parties=2, n_parties=3, collusion_threshold=1, sensitivity=1)
    assert full.epsilon == pytest.approx(0.25)  # 2 honest shares of NB(1/2): a full discrete Laplace
    weak = A.distributed_laplace_event(scale=4, share_parties=3, n_parties=3, collusion_threshold=1, sensitivity=1)
    assert weak.epsilon == pytest.approx(0.25 + math.log(3 / 2))


@pytest.mark.parametrize("r,s", [(Fraction(2, 3), 4.0), (Fraction(1, 3), 2.0), (Fraction(1, 2), 10.0)])
def test_nb_difference_pure_bound_holds(r: Fraction, s: float) -> None:
    """The exact max log-ratio of NB(r) - NB(r) at neighbouring integers is within the bound."""
    q = math.exp(-1 / s)
    k = np.arange(0, int(60 * s) + 200)
    pmf = stats.nbinom.pmf(k, float(r), 1 - q)
    diff = np.correlate(pmf, pmf, mode="full")  # P(A - B = d), d = -(len-1)..(len-1)
    mid = len(k) - 1
    core = diff[mid - 40 : mid + 41]
    worst = float(np.max(np.abs(np.diff(np.log(core)))))
    assert worst <= 1 / s + math.log(1 / float(r)) + 1e-9


# ------------------------------------------------------------------ validation and serialisation


def test_invalid_parameters_are_refused() -> None:
    bad = [
        lambda: A.gaussian_event(sigma2=0, l2_sensitivity_sq=1),
        lambda: A.gaussian_event(sigma2=-1, l2_sensitivity_sq=1),
        lambda: A.laplace_event(scale=float("nan"), sensitivity=1),
        lambda: A.laplace_event(scale=1, sensitivity=-1),
        lambda: A.rdp_discrete_laplace(scale=1, sensitivity=1.5),  # type: ignore[arg-type]
        lambda: A.skellam_event(mu=1, l1_sensitivity=1, l2_sensitivity_sq=4),
        lambda: A.rdp_gaussian(sigma2=1, l2_sensitivity_sq=1, orders=[1.0]),
        lambda: A.epsilon_for_delta(A.zcdp_event(1), 1.0),
        lambda: A.epsilon_for_delta(A.zcdp_event(1), -0.1),
        lambda: A.pure_event(-1),
        lambda: A.compose([A.zcdp_event(1), A.zcdp_event(1, orders=[2.0, 3.0])]),
        lambda: A.PrivacyEvent.from_json('{"mechanism": "x"}'),
    ]
    for fn in bad:
        with pytest.raises(InvalidArgumentError):
            fn()


def test_json_roundtrip() -> None:
    ev = A.compose([A.laplace_event(scale=Fraction(7, 2), sensitivity=2), A.gaussian_event(sigma2=3, l2_sensitivity_sq=1)])
    back = A.PrivacyEvent.from_json(ev.to_json())
    assert back == ev
    acct = A.Accountant()
    acct.add(A.laplace_event(scale=1, sensitivity=1))
    acct.add(A.laplace_event(scale=1, sensitivity=1))
    assert acct.epsilon(0.0) == pytest.approx(2.0)
