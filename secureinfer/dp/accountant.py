"""Privacy accounting: pure DP, zCDP and Rényi DP events, composition, (epsilon, delta).

A :class:`PrivacyEvent` states the cost of one release in every currency that applies:

* ``epsilon`` -- pure epsilon-DP (delta = 0); composes by addition (sequential composition).
* ``rho`` -- rho-zCDP (Bun & Steinke 2016); composes by addition. Gaussian and discrete
  Gaussian noise of variance sigma2 on an L2-sensitivity-D query: rho = D^2/(2 sigma2)
  (CKS20, Canonne–Kamath–Steinke 2020, Thm. 14 for the discrete Gaussian). Pure
  epsilon-DP implies (epsilon^2/2)-zCDP (BS16 Prop. 3.3).
* ``rdp`` -- the Rényi-DP curve epsilon(alpha) on a grid of orders (Mironov 2017);
  composes by addition order by order. Closed forms: Gaussian alpha D^2/(2 sigma2);
  Laplace, continuous (Mironov 2017, Prop. 6) and discrete (exact sum, derived below);
  Skellam, the bound of Agarwal–Kairouz–Liu 2021 (Thm. 3.5).
* ``delta`` -- an additive failure probability (e.g. ring overflow of value + noise).

Conversion to (epsilon, delta) takes the smallest of: the pure epsilon; the RDP bound of
CKS20 Prop. 12 = Balle et al. 2020 Thm. 21, epsilon = min_alpha tau_alpha +
log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1), which is never worse than the
classic tau_alpha + log(1/delta)/(alpha-1) of Mironov 2017 Prop. 3; and for zCDP the same
bound with tau_alpha = alpha rho minimised over continuous alpha (CKS20 Cor. 13). Results
are clamped at 0 (epsilon is never negative) and are monotone: less noise, larger
epsilon.

Collusion (noise added inside the MPC): when n parties each add an independent share of
infinitely divisible noise and up to t of them may collude, the colluders know (and can
subtract) their own shares, so only the n - t honest shares count: a fraction
:func:`honest_fraction` = (n - t)/n of the variance.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from fractions import Fraction

import numpy as np

from secureinfer.errors import InvalidArgumentError

__all__ = [
    "DEFAULT_ORDERS",
    "Accountant",
    "PrivacyEvent",
    "compose",
    "delta_for_epsilon",
    "distributed_laplace_event",
    "distributed_skellam_event",
    "epsilon_for_delta",
    "gaussian_event",
    "honest_fraction",
    "honest_variance",
    "laplace_event",
    "pure_event",
    "rdp_gaussian",
    "rdp_laplace",
    "rdp_discrete_laplace",
    "rdp_skellam",
    "skellam_event",
    "zcdp_event",
]

DEFAULT_ORDERS: tuple[float, ...] = (
    1.1, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0, 7.0, 8.0, 10.0, 12.0, 14.0,
    16.0, 20.0, 24.0, 28.0, 32.0, 40.0, 48.0, 64.0, 96.0, 128.0, 256.0, 512.0, 1024.0,
)  # fmt: skip


def _positive(x: float | int | Fraction, name: str, *, allow_zero: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, (int, float, Fraction)):
        raise InvalidArgumentError(f"{name} must be a number, got {type(x).__name__}")
    v = float(x)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        raise InvalidArgumentError(f"{name} must be {'>= 0' if allow_zero else '> 0'} and finite, got {x!r}")
    return v


def _orders(orders: Iterable[float]) -> tuple[float, ...]:
    out = tuple(float(a) for a in orders)
    if not out or any(not math.isfinite(a) or a <= 1 for a in out):
        raise InvalidArgumentError("RDP orders must be finite and > 1")
    return out


@dataclass(frozen=True)
class PrivacyEvent:
    """The cost of one release (or of several composed); see the module docstring."""

    mechanism: str
    rdp: tuple[float, ...]
    orders: tuple[float, ...] = DEFAULT_ORDERS
    epsilon: float | None = None
    rho: float | None = None
    delta: float = 0.0
    count: int = 1
    params: dict[str, str] = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if len(self.rdp) != len(self.orders):
            raise InvalidArgumentError("rdp and orders must have the same length")
        if any(not v >= 0 for v in self.rdp):  # also rejects NaN
            raise InvalidArgumentError("RDP values must be >= 0")
        if not 0 <= self.delta <= 1:
            raise InvalidArgumentError(f"delta must be in [0, 1], got {self.delta}")

    def epsilon_for_delta(self, delta: float) -> float:
        """Shorthand for :func:`epsilon_for_delta`."""
        return epsilon_for_delta(self, delta)

    def to_json(self) -> str:
        """A JSON object (used by the ledger; no pickle)."""
        return json.dumps(
            {
                "mechanism": self.mechanism,
                "rdp": list(self.rdp),
                "orders": list(self.orders),
                "epsilon": self.epsilon,
                "rho": self.rho,
                "delta": self.delta,
                "count": self.count,
                "params": self.params,
            },
            sort_keys=True,
        )

    @classmethod
    def from_json(cls, text: str) -> PrivacyEvent:
        try:
            d = json.loads(text)
            return cls(
                mechanism=str(d["mechanism"]),
                rdp=tuple(float(v) for v in d["rdp"]),
                orders=_orders(d["orders"]),
                epsilon=None if d["epsilon"] is None else float(d["epsilon"]),
                rho=None if d["rho"] is None else float(d["rho"]),
                delta=float(d["delta"]),
                count=int(d["count"]),
                params={str(k): str(v) for k, v in d.get("params", {}).items()},
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise InvalidArgumentError(f"malformed privacy event: {exc}") from exc


# --------------------------------------------------------------------------- RDP curves


def rdp_gaussian(*, sigma2: float, l2_sensitivity_sq: float, orders: Iterable[float] = DEFAULT_ORDERS) -> tuple[float, ...]:
    """alpha D^2 / (2 sigma2): Gaussian (Mironov 2017) and discrete Gaussian (CKS20 upper bound)."""
    rho = _positive(l2_sensitivity_sq, "l2_sensitivity_sq", allow_zero=True) / (2 * _positive(sigma2, "sigma2"))
    return tuple(a * rho for a in _orders(orders))


def rdp_laplace(*, scale: float, sensitivity: float, orders: Iterable[float] = DEFAULT_ORDERS) -> tuple[float, ...]:
    """Continuous Laplace, b = scale/sensitivity (Mironov 2017, Prop. 6):
    1/(alpha-1) log(alpha/(2alpha-1) e^((alpha-1)/b) + (alpha-1)/(2alpha-1) e^(-alpha/b))."""
    b = _positive(scale, "scale") / _positive(sensitivity, "sensitivity")
    out = []
    for a in _orders(orders):
        s = np.logaddexp(math.log(a / (2 * a - 1)) + (a - 1) / b, math.log((a - 1) / (2 * a - 1)) - a / b)
        out.append(max(0.0, min(float(s) / (a - 1), 1 / b)))
    return tuple(out)


def rdp_discrete_laplace(*, scale: float, sensitivity: int, orders: Iterable[float] = DEFAULT_ORDERS) -> tuple[float, ...]:
    """Exact RDP of discrete Laplace P(k) ~ exp(-|k|/s) against its shift by an integer D.

    With q = e^(-1/s), c = (1-q)/(1+q), r = e^(-(2alpha-1)/s), the sum
    sum_k P(k)^alpha P(k-D)^(1-alpha) splits at k <= 0, 0 < k < D, k >= D into
    c [e^((alpha-1)D/s) / (1-q) + e^((alpha-1)D/s) r (1 - r^(D-1)) / (1-r)
    + e^(-(alpha-1)D/s) q^D / (1-q)]; RDP = log(sum) / (alpha-1).
    """
    s = _positive(scale, "scale")
    if isinstance(sensitivity, bool) or not isinstance(sensitivity, int) or sensitivity < 0:
        raise InvalidArgumentError(f"sensitivity must be an int >= 0 (grid units), got {sensitivity!r}")
    d = sensitivity
    if d == 0:
        return tuple(0.0 for _ in _orders(orders))
    log_q = -1.0 / s
    log_1mq = math.log(-math.expm1(log_q))
    log_c = log_1mq - math.log1p(math.exp(log_q))
    out = []
    for a in _orders(orders):
        e = (a - 1) * d / s
        terms = [e - log_1mq, -e + d * log_q - log_1mq]
        if d >= 2:
            log_r = -(2 * a - 1) / s
            terms.append(e + log_r + math.log(-math.expm1((d - 1) * log_r)) - math.log(-math.expm1(log_r)))
        total = log_c + float(np.logaddexp.reduce(terms))
        out.append(max(0.0, min(total / (a - 1), d / s)))
    return tuple(out)


def rdp_skellam(
    *, mu: float, l1_sensitivity: float, l2_sensitivity_sq: float, orders: Iterable[float] = DEFAULT_ORDERS
) -> tuple[float, ...]:
    """Skellam Sk(mu) = Poisson(mu) - Poisson(mu) (variance 2 mu) per coordinate.

    Agarwal, Kairouz, Liu, "The Skellam Mechanism for Differentially Private Federated
    Learning", NeurIPS 2021, Thm. 3.5: epsilon(alpha) <= alpha D2^2/(4 mu) +
    min(((2 alpha - 1) D2^2 + 6 D1)/(16 mu^2), 3 D1/(4 mu)); we use 2 alpha in place of
    2 alpha - 1 (a slightly larger, still valid bound). The tests check it against the
    exact Rényi divergence computed from the Skellam pmf.
    """
    m = _positive(mu, "mu")
    d1 = _positive(l1_sensitivity, "l1_sensitivity", allow_zero=True)
    d2 = _positive(l2_sensitivity_sq, "l2_sensitivity_sq", allow_zero=True)
    if d2 > d1 * d1 + 1e-9 * max(1.0, d1 * d1):
        raise InvalidArgumentError("l2_sensitivity_sq cannot exceed l1_sensitivity^2")
    return tuple(
        a * d2 / (4 * m) + min((2 * a * d2 + 6 * d1) / (16 * m * m), 3 * d1 / (4 * m)) for a in _orders(orders)
    )


# --------------------------------------------------------------------------- events


def pure_event(epsilon: float, *, mechanism: str = "pure", orders: Iterable[float] = DEFAULT_ORDERS) -> PrivacyEvent:
    """A pure epsilon-DP release; RDP min(epsilon, alpha epsilon^2 / 2) (BS16 Prop. 3.3)."""
    e = _positive(epsilon, "epsilon", allow_zero=True)
    o = _orders(orders)
    return PrivacyEvent(mechanism, tuple(min(e, a * e * e / 2) for a in o), o, epsilon=e, rho=e * e / 2)


def zcdp_event(rho: float, *, mechanism: str = "zcdp", orders: Iterable[float] = DEFAULT_ORDERS) -> PrivacyEvent:
    """A rho-zCDP release; RDP alpha rho."""
    r = _positive(rho, "rho", allow_zero=True)
    o = _orders(orders)
    return PrivacyEvent(mechanism, tuple(a * r for a in o), o, rho=r)


def laplace_event(
    *, scale: float | Fraction, sensitivity: int, discrete: bool = True, orders: Iterable[float] = DEFAULT_ORDERS
) -> PrivacyEvent:
    """Laplace noise of ``scale`` on a query of L1-``sensitivity``: pure epsilon = D/scale.

    ``discrete`` (the default, what the samplers draw): exact discrete-Laplace RDP;
    otherwise the continuous Laplace curve (Mironov 2017).
    """
    s = _positive(scale, "scale")
    eps = _positive(sensitivity, "sensitivity", allow_zero=True) / s
    o = _orders(orders)
    if discrete:
        curve = rdp_discrete_laplace(scale=s, sensitivity=int(sensitivity), orders=o)
    else:
        curve = rdp_laplace(scale=s, sensitivity=float(sensitivity), orders=o) if sensitivity else tuple(0.0 for _ in o)
    params = {"scale": str(scale), "sensitivity": str(sensitivity)}
    return PrivacyEvent("laplace", curve, o, epsilon=eps, rho=eps * eps / 2, params=params)


def gaussian_event(
    *, sigma2: float | Fraction, l2_sensitivity_sq: float | Fraction, orders: Iterable[float] = DEFAULT_ORDERS
) -> PrivacyEvent:
    """(Discrete) Gaussian noise of variance parameter sigma2: rho = D^2/(2 sigma2) zCDP."""
    o = _orders(orders)
    curve = rdp_gaussian(sigma2=float(sigma2), l2_sensitivity_sq=float(l2_sensitivity_sq), orders=o)
    rho = float(l2_sensitivity_sq) / (2 * float(sigma2))
    params = {"sigma2": str(sigma2), "l2_sensitivity_sq": str(l2_sensitivity_sq)}
    return PrivacyEvent("gaussian", curve, o, rho=rho, params=params)


def skellam_event(
    *, mu: float | Fraction, l1_sensitivity: float, l2_sensitivity_sq: float, orders: Iterable[float] = DEFAULT_ORDERS
) -> PrivacyEvent:
    """Skellam Sk(mu) noise per coordinate (AKL21 RDP bound)."""
    o = _orders(orders)
    curve = rdp_skellam(mu=float(mu), l1_sensitivity=l1_sensitivity, l2_sensitivity_sq=l2_sensitivity_sq, orders=o)
    params = {"mu": str(mu), "l1_sensitivity": str(l1_sensitivity), "l2_sensitivity_sq": str(l2_sensitivity_sq)}
    return PrivacyEvent("skellam", curve, o, params=params)


def honest_fraction(n_parties: int, collusion_threshold: int) -> Fraction:
    """(n - t)/n: the share of infinitely divisible noise that t colluders cannot remove."""
    for v, name in ((n_parties, "n_parties"), (collusion_threshold, "collusion_threshold")):
        if isinstance(v, bool) or not isinstance(v, int):
            raise InvalidArgumentError(f"{name} must be an int, got {v!r}")
    if n_parties < 1:
        raise InvalidArgumentError(f"n_parties must be >= 1, got {n_parties}")
    if not 0 <= collusion_threshold < n_parties:
        raise InvalidArgumentError(
            f"collusion_threshold must be in [0, n_parties - 1] = [0, {n_parties - 1}], got {collusion_threshold}"
        )
    return Fraction(n_parties - collusion_threshold, n_parties)


def honest_variance(total_variance: float, *, n_parties: int, collusion_threshold: int) -> float:
    """The variance of the honest parties' part of n equal independent noise shares."""
    return _positive(total_variance, "total_variance", allow_zero=True) * float(
        honest_fraction(n_parties, collusion_threshold)
    )


def distributed_skellam_event(
    *,
    mu_total: float | Fraction,
    n_parties: int,
    collusion_threshold: int,
    l1_sensitivity: float,
    l2_sensitivity_sq: float,
    orders: Iterable[float] = DEFAULT_ORDERS,
) -> PrivacyEvent:
    """Skellam(mu_total) split into n shares Skellam(mu_total/n); t may collude.

    The honest parties' shares sum to exactly Skellam(mu_total (n-t)/n), so the event is
    :func:`skellam_event` at that mu.
    """
    mu_h = Fraction(mu_total) * honest_fraction(n_parties, collusion_threshold)
    ev = skellam_event(mu=mu_h, l1_sensitivity=l1_sensitivity, l2_sensitivity_sq=l2_sensitivity_sq, orders=orders)
    return replace(ev, params={**ev.params, "n_parties": str(n_parties), "collusion_threshold": str(collusion_threshold)})


def distributed_laplace_event(
    *,
    scale: float | Fraction,
    share_parties: int,
    n_parties: int,
    collusion_threshold: int,
    sensitivity: int,
    orders: Iterable[float] = DEFAULT_ORDERS,
) -> PrivacyEvent:
    """Each of n parties adds NB(1/k) - NB(1/k) (k = ``share_parties``); t may collude.

    The h = n - t honest shares sum to NB(h/k) - NB(h/k). If h >= k this contains a full
    discrete Laplace(scale) plus independent noise (post-processing), so epsilon =
    D/scale. If h < k the honest noise is NB(r) - NB(r), r = h/k < 1, whose pmf ratio at
    neighbouring integers lies in [r q, q] on each side of 0 (the NB ratio
    (j + r)/(j + 1) q lies there), so epsilon <= D (1/scale + ln(1/r)): a valid but much
    weaker bound -- calibrate shares with k = n - t.
    """
    frac = honest_fraction(n_parties, collusion_threshold)
    if isinstance(share_parties, bool) or not isinstance(share_parties, int) or share_parties < 1:
        raise InvalidArgumentError(f"share_parties must be an int >= 1, got {share_parties!r}")
    r = frac * n_parties / share_parties
    extra = {"share_parties": str(share_parties), "n_parties": str(n_parties), "collusion_threshold": str(collusion_threshold)}
    if r >= 1:
        ev = laplace_event(scale=scale, sensitivity=sensitivity, orders=orders)
        return replace(ev, params={**ev.params, **extra})
    eps = _positive(sensitivity, "sensitivity", allow_zero=True) * (1 / _positive(scale, "scale") + math.log(1 / float(r)))
    ev = pure_event(eps, mechanism="laplace-shares", orders=orders)
    return replace(ev, params={"scale": str(scale), "sensitivity": str(sensitivity), **extra})


# --------------------------------------------------------------------------- composition


def compose(events: Iterable[PrivacyEvent]) -> PrivacyEvent:
    """Sequential composition: sums of epsilon (if all pure), rho (if all zCDP), RDP, delta."""
    evs = list(events)
    if not evs:
        return PrivacyEvent("none", tuple(0.0 for _ in DEFAULT_ORDERS), DEFAULT_ORDERS, epsilon=0.0, rho=0.0, count=0)
    orders = evs[0].orders
    if any(e.orders != orders for e in evs):
        raise InvalidArgumentError("cannot compose events computed on different RDP orders")
    rdp = tuple(float(v) for v in np.sum([e.rdp for e in evs], axis=0))
    eps = None if any(e.epsilon is None for e in evs) else float(sum(e.epsilon for e in evs))  # type: ignore[misc]
    rho = None if any(e.rho is None for e in evs) else float(sum(e.rho for e in evs))  # type: ignore[misc]
    delta = min(1.0, float(sum(e.delta for e in evs)))
    names = sorted({e.mechanism for e in evs})
    return PrivacyEvent(
        "+".join(names), rdp, orders, epsilon=eps, rho=rho, delta=delta, count=sum(e.count for e in evs)
    )


def _rdp_to_eps(tau: np.ndarray, alpha: np.ndarray, delta: float) -> float:
    """min_alpha tau + log((alpha-1)/alpha) - (log delta + log alpha)/(alpha-1) (CKS20 Prop. 12)."""
    vals = tau + np.log1p(-1.0 / alpha) - (math.log(delta) + np.log(alpha)) / (alpha - 1.0)
    return float(np.min(vals))


def _zcdp_to_eps(rho: float, delta: float) -> float:
    """CKS20 Cor. 13: the RDP bound with tau_alpha = alpha rho, alpha minimised continuously."""
    if rho == 0:
        return 0.0
    alpha = 1.0 + np.logspace(-6, 7, 4000)
    vals = alpha * rho + np.log1p(-1.0 / alpha) - (math.log(delta) + np.log(alpha)) / (alpha - 1.0)
    i = int(np.argmin(vals))
    lo, hi = alpha[max(i - 1, 0)], alpha[min(i + 1, alpha.size - 1)]
    for _ in range(100):  # golden-section refinement on the bracketing interval
        m1, m2 = lo + (hi - lo) * 0.382, lo + (hi - lo) * 0.618
        f1 = m1 * rho + math.log1p(-1 / m1) - (math.log(delta) + math.log(m1)) / (m1 - 1)
        f2 = m2 * rho + math.log1p(-1 / m2) - (math.log(delta) + math.log(m2)) / (m2 - 1)
        lo, hi = (lo, m2) if f1 < f2 else (m1, hi)
    best = (lo + hi) / 2
    fb = best * rho + math.log1p(-1 / best) - (math.log(delta) + math.log(best)) / (best - 1)
    return min(float(vals[i]), fb)


def epsilon_for_delta(event: PrivacyEvent, delta: float) -> float:
    """The smallest epsilon we can prove for ``event`` at ``delta`` (never negative).

    ``delta`` must exceed the event's own additive delta; the remaining delta' goes to the
    conversions listed in the module docstring. Returns ``math.inf`` where no finite
    epsilon holds (delta <= event.delta and the event is not pure).
    """
    d = _positive(delta, "delta", allow_zero=True)
    if d >= 1:
        raise InvalidArgumentError(f"delta must be < 1, got {delta}")
    rest = d - event.delta
    best = math.inf if event.epsilon is None or event.delta > d else event.epsilon
    if rest > 0:
        alpha = np.array(event.orders)
        best = min(best, _rdp_to_eps(np.array(event.rdp), alpha, rest))
        if event.rho is not None:
            best = min(best, _zcdp_to_eps(event.rho, rest))
    return max(0.0, best)


def delta_for_epsilon(event: PrivacyEvent, epsilon: float) -> float:
    """The smallest delta we can prove at ``epsilon`` (CKS20 Prop. 12 on the RDP curve)."""
    e = _positive(epsilon, "epsilon", allow_zero=True)
    if event.epsilon is not None and event.epsilon <= e:
        return event.delta
    alpha = np.array(event.orders)
    tau = np.array(event.rdp)
    log_d = (alpha - 1) * (tau - e) + (alpha - 1) * np.log1p(-1 / alpha) - np.log(alpha)
    if event.rho is not None:
        a2 = 1.0 + np.logspace(-6, 7, 4000)
        log_d = np.concatenate([log_d, (a2 - 1) * (a2 * event.rho - e) + (a2 - 1) * np.log1p(-1 / a2) - np.log(a2)])
    return min(1.0, event.delta + math.exp(min(0.0, float(np.min(log_d)))))


class Accountant:
    """Accumulates events and answers what has been spent (not thread-safe)."""

    def __init__(self, *, orders: Iterable[float] = DEFAULT_ORDERS) -> None:
        self._orders = _orders(orders)
        self._events: list[PrivacyEvent] = []

    def add(self, event: PrivacyEvent) -> None:
        if event.orders != self._orders:
            raise InvalidArgumentError("event was computed on different RDP orders than this accountant")
        self._events.append(event)

    @property
    def events(self) -> tuple[PrivacyEvent, ...]:
        return tuple(self._events)

    def total(self) -> PrivacyEvent:
        return compose(self._events) if self._events else compose([pure_event(0.0, orders=self._orders)])

    def epsilon(self, delta: float) -> float:
        return epsilon_for_delta(self.total(), delta)
