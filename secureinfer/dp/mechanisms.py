"""Plaintext reference DP mechanisms on the fixed-point grid, and the per-party noise share.

Values are int64 fixed-point integers (units of 2^-f). A mechanism is a frozen dataclass
naming the noise law and the sensitivity it was calibrated for, all in grid units:

* :class:`LaplaceMechanism` -- discrete Laplace(scale), pure epsilon = D1/scale.
* :class:`GaussianMechanism` -- discrete Gaussian(sigma2), rho = D2^2/(2 sigma2) zCDP.
* :class:`SkellamMechanism` -- Skellam(mu), the RDP bound of AKL21; infinitely
  divisible, the Gaussian-like choice for noise added inside the MPC.

Output perturbation of logits (:func:`perturb`): each coordinate is first clipped to
[-C, C], so whatever the model does, two outputs differ by at most 2C per coordinate:
L1-sensitivity 2 C d, squared L2-sensitivity 4 C^2 d for d coordinates
(:func:`clip_sensitivity`). Report-noisy-max (:func:`noisy_argmax`, PATE's noisy vote
aggregation, Papernot et al. 2017/2018): noise on every vote count, release the argmax
only (post-processing); one teacher changing its vote moves two counts by one, so
:func:`vote_sensitivity` is (2, 2).

Inside the MPC each party calls :func:`draw_noise_share` and adds the result to its
additive share of the clipped value; no party learns the total noise. The mechanism's
``collusion_threshold`` t (default n - 1, the project's security model) sets how the noise
is split: the shares are calibrated so that the n - t honest shares *alone* carry the
declared noise, hence :meth:`event` is the cost whatever t parties do. Ring overflow of
value + noise is charged to delta by :func:`release_event`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import TYPE_CHECKING, Union

import numpy as np

from secureinfer.dp import accountant as acc
from secureinfer.dp import samplers
from secureinfer.errors import InvalidArgumentError

if TYPE_CHECKING:
    from secureinfer.prg import Prg

__all__ = [
    "GaussianMechanism",
    "LaplaceMechanism",
    "Mechanism",
    "SkellamMechanism",
    "clip",
    "clip_sensitivity",
    "draw_noise_share",
    "noisy_argmax",
    "perturb",
    "release_event",
    "round_up",
    "vote_sensitivity",
]

RING_BITS = 64


def round_up(x: Fraction | float | int, *, bits: int = 16) -> Fraction:
    """The smallest multiple of 2^-bits that is >= x (an integer when x >= 2^20).

    Noise parameters are rounded *up* to simple rationals: more noise keeps the guarantee
    and keeps the samplers' integers small.
    """
    f = Fraction(x)
    if f <= 0:
        raise InvalidArgumentError(f"noise parameter must be > 0, got {x!r}")
    if f >= 1 << 20:
        return Fraction(math.ceil(f))
    return Fraction(math.ceil(f * (1 << bits)), 1 << bits)


def _int(v: object, name: str, *, minimum: int = 0) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise InvalidArgumentError(f"{name} must be an int >= {minimum}, got {v!r}")
    return int(v)


def _threshold(t: int | None, n_parties: int) -> int:
    n = _int(n_parties, "n_parties", minimum=1)
    tt = n - 1 if t is None else _int(t, "collusion_threshold")
    acc.honest_fraction(n, tt)  # validates 0 <= t < n
    return tt


def clip_sensitivity(*, clip_bound: int, dim: int) -> tuple[int, int]:
    """(L1, squared L2) sensitivity of ``dim`` coordinates each clipped to [-C, C]."""
    c = _int(clip_bound, "clip_bound", minimum=1)
    d = _int(dim, "dim", minimum=1)
    return 2 * c * d, 4 * c * c * d


def vote_sensitivity() -> tuple[int, int]:
    """(L1, squared L2) sensitivity of a vote histogram when one voter changes its vote."""
    return 2, 2


@dataclass(frozen=True)
class LaplaceMechanism:
    """Discrete Laplace(scale) per coordinate; pure epsilon = l1_sensitivity / scale."""

    scale: Fraction
    l1_sensitivity: int
    collusion_threshold: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "scale", Fraction(self.scale))
        if self.scale <= 0:
            raise InvalidArgumentError("scale must be > 0")
        _int(self.l1_sensitivity, "l1_sensitivity")

    @classmethod
    def for_epsilon(cls, epsilon: float, *, l1_sensitivity: int, collusion_threshold: int | None = None) -> LaplaceMechanism:
        """scale = D1/epsilon rounded up (the achieved epsilon is <= the one asked for)."""
        e = Fraction(acc._positive(epsilon, "epsilon"))
        return cls(round_up(Fraction(_int(l1_sensitivity, "l1_sensitivity")) / e), l1_sensitivity, collusion_threshold)

    def event(self) -> acc.PrivacyEvent:
        return acc.laplace_event(scale=self.scale, sensitivity=self.l1_sensitivity)

    def sample(self, prg: Prg, size: int | tuple[int, ...]) -> np.ndarray:
        return samplers.discrete_laplace(prg, scale=self.scale, size=size)

    def share(self, prg: Prg, *, n_parties: int, size: int | tuple[int, ...]) -> np.ndarray:
        h = n_parties - _threshold(self.collusion_threshold, n_parties)
        return samplers.discrete_laplace_share(prg, scale=self.scale, n_parties=h, size=size)

    def total_variance(self, n_parties: int = 1) -> float:
        """Variance of the summed noise per coordinate: n/h copies' worth of 2q/(1-q)^2."""
        h = n_parties - _threshold(self.collusion_threshold, n_parties) if n_parties > 1 else 1
        q = math.exp(-1 / float(self.scale))
        return n_parties / h * 2 * q / (1 - q) ** 2


@dataclass(frozen=True)
class GaussianMechanism:
    """Discrete Gaussian N_Z(0, sigma2) per coordinate; rho = l2_sensitivity_sq/(2 sigma2).

    Not infinitely divisible: inside the MPC only ``collusion_threshold = n - 1`` is
    supported (every party adds a full copy); use :class:`SkellamMechanism` otherwise.
    """

    sigma2: Fraction
    l2_sensitivity_sq: int
    collusion_threshold: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "sigma2", Fraction(self.sigma2))
        if self.sigma2 <= 0:
            raise InvalidArgumentError("sigma2 must be > 0")
        _int(self.l2_sensitivity_sq, "l2_sensitivity_sq")

    @classmethod
    def for_rho(cls, rho: float, *, l2_sensitivity_sq: int, collusion_threshold: int | None = None) -> GaussianMechanism:
        r = Fraction(acc._positive(rho, "rho"))
        return cls(round_up(Fraction(_int(l2_sensitivity_sq, "l2_sensitivity_sq")) / (2 * r)), l2_sensitivity_sq, collusion_threshold)

    @classmethod
    def for_epsilon_delta(
        cls, epsilon: float, delta: float, *, l2_sensitivity_sq: int, collusion_threshold: int | None = None
    ) -> GaussianMechanism:
        """The smallest (rounded-up) sigma2 whose zCDP conversion meets (epsilon, delta)."""
        d2 = _int(l2_sensitivity_sq, "l2_sensitivity_sq", minimum=1)
        rho = _bisect_param(lambda r: acc.epsilon_for_delta(acc.zcdp_event(r), delta), epsilon)
        return cls(round_up(Fraction(d2) / (2 * Fraction(rho))), d2, collusion_threshold)

    def event(self) -> acc.PrivacyEvent:
        return acc.gaussian_event(sigma2=self.sigma2, l2_sensitivity_sq=self.l2_sensitivity_sq)

    def sample(self, prg: Prg, size: int | tuple[int, ...]) -> np.ndarray:
        return samplers.discrete_gaussian(prg, sigma2=self.sigma2, size=size)

    def share(self, prg: Prg, *, n_parties: int, size: int | tuple[int, ...]) -> np.ndarray:
        if n_parties - _threshold(self.collusion_threshold, n_parties) != 1:
            raise InvalidArgumentError(
                "the discrete Gaussian is not infinitely divisible: with fewer than n-1 colluders "
                "use SkellamMechanism (or collusion_threshold = n_parties - 1)"
            )
        return self.sample(prg, size)

    def total_variance(self, n_parties: int = 1) -> float:
        return n_parties * float(self.sigma2)  # upper bound: N_Z variance < sigma2


@dataclass(frozen=True)
class SkellamMechanism:
    """Skellam Sk(mu) = Poisson(mu) - Poisson(mu) per coordinate (AKL21 RDP bound)."""

    mu: Fraction
    l1_sensitivity: int
    l2_sensitivity_sq: int
    collusion_threshold: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "mu", Fraction(self.mu))
        if self.mu <= 0:
            raise InvalidArgumentError("mu must be > 0")
        _int(self.l1_sensitivity, "l1_sensitivity")
        _int(self.l2_sensitivity_sq, "l2_sensitivity_sq")

    @classmethod
    def for_epsilon_delta(
        cls, epsilon: float, delta: float, *, l1_sensitivity: int, l2_sensitivity_sq: int,
        collusion_threshold: int | None = None,
    ) -> SkellamMechanism:  # fmt: skip
        """The smallest (rounded-up) mu whose RDP conversion meets (epsilon, delta)."""
        d1, d2 = _int(l1_sensitivity, "l1_sensitivity", minimum=1), _int(l2_sensitivity_sq, "l2_sensitivity_sq", minimum=1)

        def eps(inv_mu: float) -> float:
            ev = acc.skellam_event(mu=1 / inv_mu, l1_sensitivity=d1, l2_sensitivity_sq=d2)
            return acc.epsilon_for_delta(ev, delta)

        inv = _bisect_param(eps, epsilon)
        return cls(round_up(Fraction(1) / Fraction(inv)), d1, d2, collusion_threshold)

    def event(self) -> acc.PrivacyEvent:
        return acc.skellam_event(mu=self.mu, l1_sensitivity=self.l1_sensitivity, l2_sensitivity_sq=self.l2_sensitivity_sq)

    def sample(self, prg: Prg, size: int | tuple[int, ...]) -> np.ndarray:
        return samplers.skellam(prg, mu=self.mu, size=size)

    def share(self, prg: Prg, *, n_parties: int, size: int | tuple[int, ...]) -> np.ndarray:
        h = n_parties - _threshold(self.collusion_threshold, n_parties)
        return samplers.skellam_share(prg, mu=self.mu, n_parties=h, size=size)

    def total_variance(self, n_parties: int = 1) -> float:
        h = n_parties - _threshold(self.collusion_threshold, n_parties) if n_parties > 1 else 1
        return 2 * float(self.mu) * n_parties / h


Mechanism = Union[LaplaceMechanism, GaussianMechanism, SkellamMechanism]


def _bisect_param(fn, target: float) -> float:  # type: ignore[no-untyped-def]
    """Largest x on a log scale with fn(x) <= target, fn increasing in x (noise 1/x)."""
    t = acc._positive(target, "epsilon")
    lo, hi = 1e-30, 1e30
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if fn(mid) <= t else (lo, mid)
        if hi / lo < 1 + 1e-12:
            break
    return lo


def clip(values: np.ndarray, *, bound: int) -> np.ndarray:
    """Clip int64 fixed-point values to [-bound, bound] (grid units)."""
    b = _int(bound, "bound", minimum=1)
    v = np.asarray(values)
    if v.dtype.kind not in "iu":
        raise InvalidArgumentError(f"values must be integers on the fixed-point grid, got dtype {v.dtype}")
    return np.clip(v.astype(np.int64), -b, b)


def _log_tail(mech: Mechanism, x: float, n_parties: int) -> float:
    """log of an upper bound on P(|total noise| >= x) for one coordinate."""
    if isinstance(mech, LaplaceMechanism):  # NB(R) - NB(R), R = n/h; Chernoff at lambda = 1/(2s)
        h = n_parties - _threshold(mech.collusion_threshold, n_parties) if n_parties > 1 else 1
        s = float(mech.scale)
        log_mgf = (n_parties / h) * (math.log(-math.expm1(-1 / s)) - math.log(-math.expm1(-1 / (2 * s))))
        return math.log(2) + log_mgf - x / (2 * s)
    if isinstance(mech, GaussianMechanism):  # subgaussian (CKS20 Cor. 9), n copies
        return math.log(2) - x * x / (2 * n_parties * float(mech.sigma2))
    h = n_parties - _threshold(mech.collusion_threshold, n_parties) if n_parties > 1 else 1
    m = float(mech.mu) * n_parties / h  # Sk(m): E e^(lX) = exp(2m(cosh l - 1)), l = asinh(x/2m)
    lam = math.asinh(x / (2 * m))
    return math.log(2) + 2 * m * (math.cosh(lam) - 1) - lam * x


def release_event(mech: Mechanism, *, size: int, value_bound: int, n_parties: int = 1) -> acc.PrivacyEvent:
    """The mechanism's event plus delta for ring overflow of |value| <= value_bound + noise.

    Overflow happens only if |noise| > 2^63 - 1 - value_bound; its probability (union over
    ``size`` coordinates, Chernoff tail of the *total* noise of all parties) is added to
    delta. It is astronomically small for sane parameters (it underflows to 0.0 below
    ~1e-308, which is then what is charged).
    """
    room = float((1 << (RING_BITS - 1)) - 1 - _int(value_bound, "value_bound"))
    if room <= 0:
        raise InvalidArgumentError("value_bound leaves no room in the ring for noise")
    log_p = math.log(_int(size, "size", minimum=1)) + _log_tail(mech, room, n_parties)
    ev = mech.event()
    return replace(ev, delta=min(1.0, ev.delta + (math.exp(log_p) if log_p < 0 else 1.0)))


def perturb(prg: Prg, values: np.ndarray, *, mechanism: Mechanism, clip_bound: int) -> tuple[np.ndarray, acc.PrivacyEvent]:
    """Clip ``values`` (e.g. logits) to [-C, C] and add central noise: the plaintext reference.

    The mechanism must have been calibrated for at least :func:`clip_sensitivity` of this
    many coordinates; a smaller declared sensitivity is refused.
    """
    v = clip(values, bound=clip_bound)
    l1, l2 = clip_sensitivity(clip_bound=clip_bound, dim=int(v.size))
    _check_sensitivity(mechanism, l1, l2)
    noisy = v + mechanism.sample(prg, v.shape)
    return noisy, release_event(mechanism, size=int(v.size), value_bound=clip_bound)


def _check_sensitivity(mech: Mechanism, l1: int, l2: int) -> None:
    have_l1 = getattr(mech, "l1_sensitivity", None)
    have_l2 = getattr(mech, "l2_sensitivity_sq", None)
    if (have_l1 is not None and have_l1 < l1) or (have_l2 is not None and have_l2 < l2):
        raise InvalidArgumentError(
            f"mechanism calibrated for sensitivity L1={have_l1}, L2^2={have_l2} but this release "
            f"needs L1={l1}, L2^2={l2}"
        )


def noisy_argmax(prg: Prg, votes: np.ndarray, *, mechanism: Mechanism) -> tuple[np.ndarray, acc.PrivacyEvent]:
    """Report-noisy-max over the last axis of integer vote counts (ties: lowest index).

    One event per row (a batch of b rows composes b events). The mechanism must cover
    :func:`vote_sensitivity`.
    """
    v = np.asarray(votes)
    if v.dtype.kind not in "iu" or v.ndim < 1 or v.shape[-1] < 1:
        raise InvalidArgumentError("votes must be a non-empty integer array of counts (..., classes)")
    _check_sensitivity(mechanism, *vote_sensitivity())
    noisy = v.astype(np.int64) + mechanism.sample(prg, v.shape)
    rows = int(np.prod(v.shape[:-1], dtype=np.int64)) if v.ndim > 1 else 1
    ev = release_event(mechanism, size=int(v.shape[-1]), value_bound=int(np.abs(v).max()))
    return np.argmax(noisy, axis=-1), acc.compose([ev] * rows)


def draw_noise_share(prg: Prg, mechanism: Mechanism, n_parties: int, size: int | tuple[int, ...]) -> np.ndarray:
    """This party's int64 share of the mechanism's noise, to add to its share of the value.

    Each of the ``n_parties`` calls this with its *own* secret PRG. With t =
    ``mechanism.collusion_threshold`` (default n - 1) and h = n - t, the shares are:
    Laplace -- NB(1/h) - NB(1/h) (any h of them sum to discrete Laplace(scale) exactly);
    Skellam -- Skellam(mu/h); Gaussian -- a full discrete Gaussian (h = 1 only). The sum
    over all n parties therefore has n/h times the declared variance, and
    ``mechanism.event()`` holds whichever t parties collude.
    """
    return mechanism.share(prg, n_parties=n_parties, size=size)
