"""Exact integer samplers for differential-privacy noise on the fixed-point grid.

Noise is drawn in integer units of the fixed-point grid (2^-f for f fractional bits), so
the noisy value ``x + noise`` is again a grid point and no floating-point rounding can
leak the input (Mironov 2012: the low-order bits of textbook float Laplace samples reveal
the unperturbed value). Every parameter is an exact rational (``int`` or
``fractions.Fraction``; floats are refused), every random bit comes from a
:class:`secureinfer.prg.Prg` (AES-256-CTR), and each sampler's output law is *exactly* the
stated one:

==============================  ==============================================  =============
sampler                         law                                             method
==============================  ==============================================  =============
``bernoulli_exp``               Bernoulli(exp(-gamma))                          CKS20 Alg. 1
``geometric``                   P(k) ~ exp(-k/scale), k >= 0                    CKS20 Alg. 2
``discrete_laplace``            P(z) ~ exp(-|z|/scale)                          CKS20 Alg. 2
``discrete_gaussian``           P(z) ~ exp(-z^2 / (2 sigma2))                   CKS20 Alg. 3
``poisson``                     Poisson(lam)                                    envelope [1]
``skellam``                     Poisson(mu) - Poisson(mu), variance 2 mu        envelope [1]
``binomial``                    Binomial(n, p)                                  envelope [1]
``negative_binomial``           NB(r, q = exp(-1/scale))                        bands [1]
``discrete_laplace_share``      one party's share: NB(1/n) - NB(1/n)            bands [1]
``skellam_share``               one party's share: Skellam(mu/n)                envelope [1]
==============================  ==============================================  =============

CKS20 = Canonne, Kamath, Steinke, "The Discrete Gaussian for Differential Privacy",
NeurIPS 2020. [1] rejection sampling with a float filter and exact big-integer fallback,
see :mod:`secureinfer.dp._counts`. All run vectorised with numpy (rejection loops redraw
only the rejected positions); expected cost is O(1) uniform draws per value for every
parameter (a few hundred ns to a few us per value on one core; 10^6 values in seconds).

Infinite divisibility (noise added by n parties inside the MPC, no party knowing the
total): the geometric law is NB(1, q) and NB(a, q) + NB(b, q) = NB(a+b, q), so the sum of
n independent NB(1/n, q) is geometric and the sum over n parties of
NB(1/n, q) - NB(1/n, q) is *exactly* a discrete Laplace with q = exp(-1/scale). Likewise
Poisson(a) + Poisson(b) = Poisson(a+b), so n shares Skellam(mu/n) sum to Skellam(mu).

Timing is not constant (rejection sampling); the MPC parties draw their shares locally,
so the running time reveals at most a party's own share count to that party.
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from secureinfer.dp import _counts
from secureinfer.dp import _exact as ex
from secureinfer.errors import InvalidArgumentError

if TYPE_CHECKING:
    from secureinfer.prg import Prg

__all__ = [
    "bernoulli",
    "bernoulli_exp",
    "binomial",
    "discrete_gaussian",
    "discrete_laplace",
    "discrete_laplace_share",
    "geometric",
    "negative_binomial",
    "poisson",
    "skellam",
    "skellam_share",
]

_MAX_PART = 1 << 56  # numerator/denominator limit for scales fed to uniform draws


def _small(f: Fraction, name: str) -> Fraction:
    if f.numerator >= _MAX_PART or f.denominator >= _MAX_PART:
        raise InvalidArgumentError(
            f"{name} = {f} has a numerator or denominator >= 2^56; round it to a simpler "
            "rational (e.g. ceil(x * 2^k) / 2^k, rounding noise up keeps the guarantee)"
        )
    return f


def _parties(n_parties: int) -> int:
    if isinstance(n_parties, bool) or not isinstance(n_parties, int) or n_parties < 1:
        raise InvalidArgumentError(f"n_parties must be an int >= 1, got {n_parties!r}")
    return n_parties


def bernoulli(prg: Prg, *, p: Fraction | int, size: ex.Size) -> np.ndarray:
    """Bernoulli(p) for rational 0 <= p <= 1 as a bool array: ``U < num`` with U uniform
    in [0, den). Cost: one uniform draw (< 2 PRG words) per value."""
    pf = ex.as_fraction(p, name="p", allow_zero=True)
    if pf > 1:
        raise InvalidArgumentError(f"p must be <= 1, got {pf}")
    shape = ex.shape_of(size)
    return ex.bern_const(prg, pf, ex.numel(shape)).reshape(shape)


def bernoulli_exp(prg: Prg, *, gamma: Fraction | int, size: ex.Size) -> np.ndarray:
    """Bernoulli(exp(-gamma)) for rational gamma >= 0 as a bool array.

    CKS20 Algorithm 1 (see :func:`secureinfer.dp._exact.bern_exp`); expected cost O(1)
    uniform draws per value (about e for gamma <= 1, one Bernoulli(exp(-1)) chain above).
    """
    g = ex.as_fraction(gamma, name="gamma", allow_zero=True)
    shape = ex.shape_of(size)
    n = ex.numel(shape)
    num = np.full(n, g.numerator, dtype=object if g.numerator >= ex.TWO62 else np.int64)
    return ex.bern_exp(prg, num, g.denominator).reshape(shape)


def geometric(prg: Prg, *, scale: Fraction | int, size: ex.Size) -> np.ndarray:
    """k >= 0 with P(k) = (1 - q) q^k, q = exp(-1/scale), int64.

    The magnitude step of CKS20 Algorithm 2: U uniform in [0, t) kept with probability
    exp(-U/t), plus t times a Bernoulli(exp(-1)) run length, divided by s (scale = t/s).
    Expected O(1) uniform draws per value.
    """
    sc = _small(ex.as_fraction(scale, name="scale"), "scale")
    shape = ex.shape_of(size)
    return ex.geometric_scaled(prg, sc.numerator, sc.denominator, ex.numel(shape)).reshape(shape)


def discrete_laplace(prg: Prg, *, scale: Fraction | int, size: ex.Size) -> np.ndarray:
    """Discrete Laplace: P(z) = (1 - q)/(1 + q) q^|z| on the integers, q = exp(-1/scale).

    CKS20 Algorithm 2 (geometric magnitude, uniform sign, "-0" rejected). Variance
    2q/(1-q)^2 (about 2 scale^2). Adding it to an integer query of L1-sensitivity D gives
    pure (D/scale)-DP. Expected O(1) uniform draws per value for every scale.
    """
    sc = _small(ex.as_fraction(scale, name="scale"), "scale")
    shape = ex.shape_of(size)
    return ex.discrete_laplace_ts(prg, sc.numerator, sc.denominator, ex.numel(shape)).reshape(shape)


def discrete_gaussian(prg: Prg, *, sigma2: Fraction | int, size: ex.Size) -> np.ndarray:
    """Discrete Gaussian N_Z(0, sigma2): P(z) proportional to exp(-z^2 / (2 sigma2)).

    CKS20 Algorithm 3: t = floor(sigma) + 1, propose Y ~ discrete Laplace(t), accept with
    probability exp(-(|Y| - sigma2/t)^2 / (2 sigma2)), an exact Bernoulli(exp(-gamma)) with
    gamma = (|Y| b t - a)^2 / (2 a b t^2) for sigma2 = a/b (big integers where needed).
    Acceptance >= 0.5 (CKS20 Prop. 4 bound), so O(1) expected draws per value. The
    variance is slightly below sigma2; ρ = D^2 / (2 sigma2) zCDP for L2-sensitivity D.
    """
    s2 = _small(ex.as_fraction(sigma2, name="sigma2"), "sigma2")
    shape = ex.shape_of(size)
    n = ex.numel(shape)
    a, b = s2.numerator, s2.denominator
    t = math.isqrt(a // b) + 1
    den = 2 * a * b * t * t
    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        y = ex.discrete_laplace_ts(prg, t, 1, todo.size)
        mag = np.abs(y)
        if mag.size and (int(mag.max()) * b * t + a) < (1 << 31):
            num = (mag * (b * t) - a) ** 2
        else:
            num = (mag.astype(object) * (b * t) - a) ** 2
        ok = ex.bern_exp(prg, num, den)
        out[todo[ok]] = y[ok]
        todo = todo[~ok]
    return out.reshape(shape)


def poisson(prg: Prg, *, lam: Fraction | int, size: ex.Size) -> np.ndarray:
    """Poisson(lam) for rational lam >= 0, int64.

    lam < 1: sum of at most two pieces lam' <= 1/2, each a geometric count accepted with
    probability 1/K! (exact rationals only). lam >= 1: rejection from mode + discrete
    Laplace(floor(sqrt(lam)) + 1) with the filtered exact acceptance of
    :mod:`secureinfer.dp._counts`; about 1.4 proposals per value for every lam.
    """
    la = ex.as_fraction(lam, name="lam", allow_zero=True)
    shape = ex.shape_of(size)
    if la == 0:
        return np.zeros(shape, dtype=np.int64)
    if la >= 1 << 60:
        raise InvalidArgumentError(f"lam = {la} is too large (>= 2^60)")
    return _counts.poisson(prg, la, ex.numel(shape)).reshape(shape)


def skellam(prg: Prg, *, mu: Fraction | int, size: ex.Size) -> np.ndarray:
    """Symmetric Skellam Sk(mu) = Poisson(mu) - Poisson(mu), variance 2 mu, int64.

    The notation Sk_{mu,mu} of Agarwal, Kairouz, Liu, "The Skellam Mechanism for
    Differentially Private Federated Learning", NeurIPS 2021. Two exact Poisson draws.
    """
    m = ex.as_fraction(mu, name="mu")
    shape = ex.shape_of(size)
    return poisson(prg, lam=m, size=shape) - poisson(prg, lam=m, size=shape)


def binomial(prg: Prg, *, n: int, p: Fraction | int, size: ex.Size) -> np.ndarray:
    """Binomial(n, p) for an int n >= 0 and rational 0 <= p <= 1, int64.

    n <= 8: a sum of exact Bernoulli(p). Larger n: rejection from the mode plus a discrete
    Laplace of scale floor(sqrt(npq)) + 1 with filtered exact acceptance (p > 1/2 is
    sampled as n - Binomial(n, 1-p)). O(1) expected proposals per value.
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise InvalidArgumentError(f"n must be an int >= 0, got {n!r}")
    if n >= 1 << 60:
        raise InvalidArgumentError(f"n = {n} is too large (>= 2^60)")
    pf = ex.as_fraction(p, name="p", allow_zero=True)
    if pf > 1:
        raise InvalidArgumentError(f"p must be <= 1, got {pf}")
    shape = ex.shape_of(size)
    return _counts.binomial(prg, n, pf, ex.numel(shape)).reshape(shape)


def negative_binomial(prg: Prg, *, r: Fraction | int, scale: Fraction | int, size: ex.Size) -> np.ndarray:
    """NB(r, q): P(k) = Gamma(k+r) / (Gamma(r) k!) (1-q)^r q^k, q = exp(-1/scale), int64.

    Integer part of r: a sum of geometrics; fractional part: rejection from a banded
    envelope with filtered exact acceptance. Mean r q/(1-q), variance r q/(1-q)^2.
    """
    rf = ex.as_fraction(r, name="r")
    sc = _small(ex.as_fraction(scale, name="scale"), "scale")
    if rf > 1 << 20:
        raise InvalidArgumentError(f"r = {rf} is too large (> 2^20)")
    shape = ex.shape_of(size)
    return _counts.negative_binomial(prg, rf, sc, ex.numel(shape)).reshape(shape)


def discrete_laplace_share(
    prg: Prg, *, scale: Fraction | int, n_parties: int, size: ex.Size
) -> np.ndarray:
    """One party's share of discrete Laplace(scale) noise: NB(1/n) - NB(1/n), q = exp(-1/scale).

    The sum of the shares of ``n_parties`` parties (each with its own PRG) is exactly
    discrete_laplace(scale). To keep the full noise when up to t parties collude (they
    know their own shares), call this with ``n_parties = n - t``: any n - t honest shares
    then sum to discrete Laplace(scale) and the others only add independent noise.
    """
    k = _parties(n_parties)
    sc = _small(ex.as_fraction(scale, name="scale"), "scale")
    shape = ex.shape_of(size)
    if k == 1:
        return discrete_laplace(prg, scale=sc, size=shape)
    r = Fraction(1, k)
    n = ex.numel(shape)
    return (_counts.negative_binomial(prg, r, sc, n) - _counts.negative_binomial(prg, r, sc, n)).reshape(shape)


def skellam_share(prg: Prg, *, mu: Fraction | int, n_parties: int, size: ex.Size) -> np.ndarray:
    """One party's share of Skellam(mu) noise: Skellam(mu / n_parties).

    The shares of ``n_parties`` parties sum to exactly Skellam(mu); any h of them sum to
    Skellam(mu h / n_parties), which is what the accountant counts for h = n - t honest
    parties (see :func:`secureinfer.dp.accountant.honest_fraction`).
    """
    k = _parties(n_parties)
    m = ex.as_fraction(mu, name="mu")
    return skellam(prg, mu=m / k, size=size)
