"""Exact random primitives for the DP samplers: uniform integers, Bernoulli(p) for rational
p, Bernoulli(exp(-gamma)) for rational gamma, and the exact fallback of the filtered
rejection step.

Everything here is *exact*: every probability is a rational number (or exp of one) and is
realised by comparing uniform integers drawn from a :class:`secureinfer.prg.Prg` with
integers, never by rounding a float (Mironov 2012, "On significance of the least
significant bits for differential privacy", shows what float samplers leak). The arrays
are vectorised with numpy: a rejection loop redraws only the positions still undecided.

Private module: the public API is :mod:`secureinfer.dp.samplers`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from fractions import Fraction
from numbers import Rational
from typing import TYPE_CHECKING

import numpy as np

from secureinfer.errors import InvalidArgumentError

if TYPE_CHECKING:  # only for annotations: importing prg pulls in torch
    from secureinfer.prg import Prg

TWO62 = 1 << 62
TWO63 = 1 << 63
TWO64 = 1 << 64

Size = int | Sequence[int]


# --------------------------------------------------------------------------- arguments


def as_fraction(value: object, *, name: str, allow_zero: bool = False) -> Fraction:
    """``value`` as an exact :class:`Fraction`; ints and Fractions only (no floats).

    A float such as ``0.1`` is not the rational its digits suggest, so it is refused
    rather than silently turned into ``3602879701896397/36028797018963968``.
    """
    if isinstance(value, bool) or not isinstance(value, Rational):
        raise InvalidArgumentError(
            f"{name} must be an int or fractions.Fraction (an exact rational), "
            f"got {type(value).__name__} {value!r}"
        )
    f = Fraction(value)  # type: ignore[arg-type]
    if f < 0 or (f == 0 and not allow_zero):
        raise InvalidArgumentError(f"{name} must be {'>= 0' if allow_zero else '> 0'}, got {f}")
    return f


def shape_of(size: Size) -> tuple[int, ...]:
    """Validate a numpy-style ``size`` and return it as a shape tuple."""
    shape = (size,) if isinstance(size, (int, np.integer)) else tuple(size)
    if any(not isinstance(d, (int, np.integer)) or d < 0 for d in shape):
        raise InvalidArgumentError(f"size must be a non-negative int or tuple of them, got {size!r}")
    return tuple(int(d) for d in shape)


def numel(shape: tuple[int, ...]) -> int:
    return int(np.prod(shape, dtype=np.int64)) if shape else 1


# --------------------------------------------------------------------------- uniforms


def below(prg: Prg, bound: int, n: int) -> np.ndarray:
    """``n`` exact uniform integers in ``[0, bound)`` as int64 (``1 <= bound <= 2**63``).

    Rejection on the smallest power of two >= bound. Candidates are drawn in batches and
    the accepted ones kept *in order*, which is still i.i.d. uniform. Cost: < 2 words of
    PRG output per value (32-bit words when ``bound <= 2**32``).
    """
    if not 1 <= bound <= TWO63:
        raise ValueError("bound must be in [1, 2**63]")
    if n == 0 or bound == 1:
        return np.zeros(n, dtype=np.int64)
    bits = (bound - 1).bit_length()
    parts: list[np.ndarray] = []
    have = 0
    while have < n:
        want = int((n - have) * (1 << bits) / bound * 1.02) + 16
        if bits <= 32:
            raw = np.frombuffer(prg.bytes(4 * want), dtype="<u4")
            cand = raw & np.uint32((1 << bits) - 1)
            cand = cand[cand < bound].astype(np.int64)
            parts.append(cand[: n - have])
            have += parts[-1].size
            continue
        else:  # bits <= 63, so the masked words fit int64
            raw = np.frombuffer(prg.bytes(8 * want), dtype="<u8")
            cand = (raw & np.uint64((1 << bits) - 1)).astype(np.int64)
        cand = cand[cand < bound]
        parts.append(cand[: n - have])
        have += parts[-1].size
    return np.concatenate(parts) if len(parts) > 1 else parts[0]


def below_big(prg: Prg, bound: int) -> int:
    """One exact uniform integer in ``[0, bound)`` for a Python int of any size."""
    if bound < 1:
        raise ValueError("bound must be >= 1")
    bits = (bound - 1).bit_length()
    nbytes = (bits + 7) // 8
    while True:
        cand = int.from_bytes(prg.bytes(nbytes), "little") & ((1 << bits) - 1)
        if cand < bound:
            return cand


# --------------------------------------------------------------------------- Bernoulli


def bern_frac(prg: Prg, num: np.ndarray, den: int) -> np.ndarray:
    """Elementwise Bernoulli(num/den), exact; ``num >= 0`` (int64 or object array), den >= 1.

    ``num >= den`` gives 1. For ``den < 2**63``: ``U < num`` with ``U`` uniform in
    ``[0, den)``. Otherwise the uniform is compared in base ``2**64`` with the digits of
    ``num/den`` (first digit ``floor(num * 2**64 / den)``); a tie (probability 2^-64)
    moves to the next digit, so the law is exact for any denominator.
    """
    n = num.size
    if n == 0:
        return np.zeros(0, dtype=bool)
    if den < TWO63:
        capped = np.minimum(num, den)
        if capped.dtype == object:
            capped = capped.astype(np.int64)
        return below(prg, den, n) < capped
    out = np.zeros(n, dtype=bool)
    rest = num.astype(object)
    full = rest >= den
    out[full] = True
    todo = np.nonzero(~full)[0]
    rest = rest[todo]
    while todo.size:
        scaled = rest * TWO64
        digit = scaled // den
        w = prg.uint64(todo.size)
        d = digit.astype(np.uint64)
        out[todo[w < d]] = True
        tie = w == d
        todo, rest = todo[tie], (scaled - digit * den)[tie]
    return out


def bern_const(prg: Prg, p: Fraction, n: int) -> np.ndarray:
    """``n`` i.i.d. Bernoulli(p) for a rational ``0 <= p <= 1``."""
    return bern_frac(prg, np.full(n, p.numerator, dtype=object if p.numerator >= TWO63 else np.int64), p.denominator)


def bern_exp1(prg: Prg, n: int) -> np.ndarray:
    """``n`` i.i.d. Bernoulli(exp(-1)) (Canonne–Kamath–Steinke 2020, Algorithm 1, gamma = 1).

    K = 1, 2, ...: continue while Bernoulli(1/K) = 1; return [K odd]. P(return 1) =
    sum_k (-1)^k / k! = e^-1. Expected cost: e^1 - 1 ~ 1.7 uniform draws.
    """
    out = np.zeros(n, dtype=bool)
    active = np.arange(n)
    k = 1
    while active.size:
        go_on = below(prg, k, active.size) == 0  # Bernoulli(1/k)
        out[active[~go_on]] = k % 2 == 1
        active = active[go_on]
        k += 1
    return out


def bern_exp(prg: Prg, num: np.ndarray, den: int) -> np.ndarray:
    """Elementwise Bernoulli(exp(-num/den)) for rational gamma = num/den >= 0, exact.

    Canonne, Kamath, Steinke 2020 ("The discrete Gaussian for differential privacy"),
    Algorithm 1: for gamma in [0, 1], K = 1, 2, ... while Bernoulli(gamma/K) = 1, return
    [K odd]; for gamma > 1, floor(gamma) independent Bernoulli(exp(-1)) must all be 1 and
    then Bernoulli(exp(-(gamma - floor(gamma)))). Expected cost O(1 + gamma) uniform draws
    (the product of Bernoulli(exp(-1)) stops at the first 0, so O(1) on average).
    """
    n = num.size
    if n == 0:
        return np.zeros(0, dtype=bool)
    if den >= TWO63 and num.dtype != object:
        num = num.astype(object)
    whole = num // den
    rem = num - whole * den
    if whole.dtype == object:
        whole = whole.astype(np.int64)
    if rem.dtype == object and den < TWO63:
        rem = rem.astype(np.int64)
    alive = np.ones(n, dtype=bool)
    c = 1
    while True:
        idx = np.nonzero(alive & (whole >= c))[0]
        if idx.size == 0:
            break
        alive[idx] = bern_exp1(prg, idx.size)
        c += 1
    out = np.zeros(n, dtype=bool)
    idx = np.nonzero(alive)[0]
    r = rem[idx]
    active = np.arange(idx.size)
    k = 1
    while active.size:
        go_on = bern_frac(prg, r[active], den * k)
        out[idx[active[~go_on]]] = k % 2 == 1
        active = active[go_on]
        k += 1
    return out


def geometric_e1(prg: Prg, n: int) -> np.ndarray:
    """``n`` i.i.d. V >= 0 with P(V = v) = (1 - e^-1) e^-v: successes of Bernoulli(exp(-1))."""
    v = np.zeros(n, dtype=np.int64)
    active = np.arange(n)
    block = 4  # trials drawn per round; those after the first failure are simply unused
    while active.size:
        trials = bern_exp1(prg, active.size * block).reshape(active.size, block)
        run = np.argmin(trials, axis=1)  # index of the first failure (0 if none)
        full = trials.all(axis=1)
        v[active] += np.where(full, block, run)
        active = active[full]
    return v


def geometric_scaled(prg: Prg, t: int, s: int, n: int) -> np.ndarray:
    """``n`` i.i.d. Y >= 0 with P(Y = y) proportional to exp(-y * s / t), exact.

    The magnitude step of CKS20 Algorithm 2: U uniform in [0, t) kept with probability
    exp(-U/t), V ~ geometric_e1, X = U + t*V is geometric with ratio exp(-1/t), and
    Y = floor(X / s) is geometric with ratio exp(-s/t). Expected cost O(1) uniform draws
    per value (acceptance of U is (1 - e^-1) t (1 - e^(-1/t)) >= 0.63 - 1/t).
    """
    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        u = below(prg, t, todo.size)
        keep = bern_exp(prg, u, t)
        u = u[keep]
        v = geometric_e1(prg, u.size)
        if u.size and (int(v.max()) + 1) * t >= TWO62:  # astronomically rare: exact ints
            x = u.astype(object) + v.astype(object) * t
            y = (x // s).astype(np.int64)
        else:
            y = (u + v * t) // s
        out[todo[keep]] = y
        todo = todo[~keep]
    return out


# --------------------------------------------------------------------------- exact arithmetic


def prod(xs: list[int]) -> int:
    """Product of a list of ints by a balanced tree (fast for long lists of big ints)."""
    if not xs:
        return 1
    while len(xs) > 1:
        nxt = [xs[i] * xs[i + 1] for i in range(0, len(xs) - 1, 2)]
        if len(xs) % 2:
            nxt.append(xs[-1])
        xs = nxt
    return xs[0]


def prod_range(lo: int, hi: int) -> int:
    """``lo * (lo+1) * ... * (hi-1)`` (1 when ``hi <= lo``)."""
    return prod(list(range(lo, hi))) if hi > lo else 1


def exp_bounds(x: Fraction, prec: int) -> tuple[int, int]:
    """Integers ``lo <= exp(x) * 2**prec <= hi``, with ``hi - lo`` shrinking as prec grows.

    Taylor series of exp(x / 2^s) (|x / 2^s| <= 1/2, remainder <= 2 * next term) in
    Fractions, rounded outward to fixed point, then squared s times with outward rounding.
    """
    if x < 0:
        mag = int(-x * Fraction(1442696, 1000000)) + 2  # > log2(exp(-x))
        p2 = prec + mag + 8
        lo2, hi2 = exp_bounds(-x, p2)
        scale = 1 << (prec + p2)
        return scale // hi2, -(-scale // lo2)
    s = 0
    while x / (1 << s) > Fraction(1, 2):
        s += 1
    y = x / (1 << s)
    w = prec + 2 * s + 16
    term = Fraction(1)
    total = Fraction(0)
    k = 0
    bound = Fraction(1, 1 << (w + 2))
    while True:
        total += term
        k += 1
        term = term * y / k
        if term <= bound:
            break
    lo = (total.numerator << w) // total.denominator
    upper = total + 2 * term
    hi = -((-upper.numerator << w) // upper.denominator)
    for _ in range(s):
        lo = (lo * lo) >> w
        hi = -((-hi * hi) >> w)
    shift = w - prec
    return lo >> shift, -((-hi) >> shift)


def exact_less(prg: Prg, v62: int, num: int, den: int, x: Fraction) -> bool:
    """Decide ``U < (num/den) * exp(x)`` exactly, for ``U`` uniform with leading 62 bits v62.

    ``U = (v62 + rest) / 2**62`` with ``rest`` uniform in [0, 1) drawn 64 bits at a time
    only as needed; exp(x) is bracketed by :func:`exp_bounds` at growing precision. The
    loop ends with probability 1 (it continues only while U lies in a shrinking interval
    around the threshold). ``num/den`` is never reduced: gcd of huge ints is slow.
    """
    u, ubits, prec = v62, 62, 64
    while True:
        elo, ehi = exp_bounds(x, prec)
        # U in [u, u+1) / 2^ubits ; A in [num*elo, num*ehi] / (den * 2^prec)
        if (u + 1) * den << prec <= (num * elo) << ubits:
            return True
        if (u * den) << prec >= (num * ehi) << ubits:
            return False
        u = (u << 64) | int(prg.uint64(1)[0])
        ubits += 64
        prec += 64


ExactFn = Callable[[int], tuple[int, int, Fraction]]


def accept_filtered(
    prg: Prg, log_a: np.ndarray, margin: np.ndarray | float, exact: ExactFn
) -> np.ndarray:
    """Elementwise Bernoulli(A_i) where ``log_a`` approximates log A_i within ``margin``.

    Draw a 62-bit uniform V_i. If V_i + 1 <= floor(exp(log_a - margin) 2^62) the exact
    uniform is certainly below A_i: accept; if V_i >= ceil(exp(log_a + margin) 2^62) it
    is certainly above: reject. Otherwise (probability about 2 * margin * A_i) call
    ``exact(i) -> (num, den, x)`` with A_i = num/den * exp(x) and decide with
    :func:`exact_less`. The floats only choose *when* exact arithmetic is needed; the law
    of the output is exactly Bernoulli(A_i) provided ``|log_a - log A| < margin``, which
    the callers' tests check against exact big-integer logarithms.
    """
    n = log_a.size
    v = (prg.uint64(n) >> np.uint64(2)).astype(np.int64)
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        lo_f = np.floor(np.minimum(np.exp(log_a - margin), 1.0) * float(TWO62))
        hi_f = np.ceil(np.minimum(np.exp(log_a + margin), 1.0) * float(TWO62))
    lo = np.where(np.isfinite(lo_f), lo_f, 0.0).astype(np.int64)  # integers <= 2^62
    hi = np.where(np.isfinite(hi_f), hi_f, 0.0).astype(np.int64)
    accept = v + 1 <= lo
    reject = v >= hi
    out = accept.copy()
    for i in np.nonzero(~(accept | reject))[0]:
        num, den, x = exact(int(i))
        out[i] = num > 0 and exact_less(prg, int(v[i]), num, den, x)
    return out


def lnfact_small_table() -> np.ndarray:
    """ln(k!) for k = 0..15 (math.lgamma is accurate to a few ulp here)."""
    return np.array([math.lgamma(k + 1) for k in range(16)])


def discrete_laplace_ts(prg: Prg, t: int, s: int, n: int) -> np.ndarray:
    """``n`` i.i.d. discrete Laplace with scale t/s: P(z) proportional to exp(-|z| s / t).

    Canonne–Kamath–Steinke 2020, Algorithm 2: a magnitude Y from
    :func:`geometric_scaled` and a uniform sign, rejecting "-0" so that 0 is not counted
    twice. Expected cost O(1) uniform draws per value for any scale.
    """
    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        y = geometric_scaled(prg, t, s, todo.size)
        neg = prg.bits(todo.size).astype(bool)
        good = ~(neg & (y == 0))
        out[todo[good]] = np.where(neg, -y, y)[good]
        todo = todo[~good]
    return out
