"""Exact Poisson, binomial and negative-binomial samplers for rational parameters.

These counts have no small closed-form sampler that is both exact and sublinear in the
mean, so they use rejection sampling whose acceptance probability A(k) is computable but
not a simple rational:

* **Poisson / binomial** (log-concave): propose k = m + Y around the mode m with Y a
  discrete Laplace of scale t = floor(sqrt(variance)) + 1 (CKS20 Algorithm 2), accept with
  A = R(j) exp(|j|/t - L), where R(j) = pmf(m+j)/pmf(m) is an exact rational and L >=
  sup_j log R(j) + |j|/t (concavity puts the sup where the increments change sign).
  Acceptance about 0.7; expected O(1) draws per value for any mean.
* **Negative binomial NB(r, exp(-1/s))**, r in (0, 1] (decreasing, log-convex): a banded
  envelope, bands {0}, [1,2), [2,4), ... with dyadic heights above the pmf, a geometric
  proposal over the bands beyond 128 s, and A = f(k) / height.

The Bernoulli(A) step is :func:`secureinfer.dp._exact.accept_filtered`: a float estimate of
log A with a stated error margin decides almost every draw; the rest (probability ~1e-9
each) are decided with exact big-integer arithmetic, so the output law is exact. The
float formulas are written without cancellation (log1p / log1p(x) - x / Stirling
differences) and the unit tests check them against exact big-integer logarithms.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from fractions import Fraction
from typing import TYPE_CHECKING

import numpy as np

from secureinfer.dp import _exact as ex

if TYPE_CHECKING:
    from secureinfer.prg import Prg

LogRatio = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]
ExactRatio = Callable[[int], tuple[int, int]]

_HALF_LN_2PI = 0.5 * math.log(2.0 * math.pi)
_LNFACT16 = np.array([math.lgamma(k + 1) for k in range(16)])
_REL = 1e-14  # relative rounding error allowed per term of the float formulas
_FLOOR = 1e-12  # absolute slack added to every margin
_STIRLING = 1e-13  # > twice the truncation error of the 4-term Stirling series at z >= 16 (1.2e-14)


def _stirling_tail(z: np.ndarray | float) -> np.ndarray | float:
    """S(z) with ln Gamma(z+1) = (z+1/2) ln z - z + ln(2 pi)/2 + S(z); error < 1e-14 for z >= 16.

    The same series is the tail of ln Gamma(w) = (w-1/2) ln w - w + ln(2 pi)/2 + S(w).
    """
    zi = 1.0 / np.asarray(z, dtype=np.float64)
    z2 = zi * zi
    return zi * (1.0 / 12 - z2 * (1.0 / 360 - z2 * (1.0 / 1260 - z2 / 1680)))


def lnfact(k: np.ndarray) -> np.ndarray:
    """ln(k!) for an int64 array, table below 16, Stirling above (relative error ~1e-15)."""
    k = np.asarray(k, dtype=np.int64)
    out = np.empty(k.shape, dtype=np.float64)
    small = k < 16
    out[small] = _LNFACT16[k[small]]
    kb = k[~small].astype(np.float64)
    out[~small] = (kb + 0.5) * np.log(kb) - kb + _HALF_LN_2PI + _stirling_tail(kb)
    return out


def log1pmx(x: np.ndarray) -> np.ndarray:
    """log(1 + x) - x without cancellation (series for |x| < 1/4)."""
    x = np.asarray(x, dtype=np.float64)
    out = np.empty_like(x)
    small = np.abs(x) < 0.25
    xs = x[small]
    acc = np.zeros_like(xs)
    for i in range(40, 1, -1):  # x^2 (-1/2 + x (1/3 + x (-1/4 + ...)))
        acc = acc * xs + (1.0 if i % 2 else -1.0) / i
    out[small] = acc * xs * xs
    xl = x[~small]
    with np.errstate(divide="ignore"):
        out[~small] = np.log1p(xl) - xl
    return out


# --------------------------------------------------------------------------- Poisson


def poisson_logr(lam: Fraction, m: int, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log(pmf(m+j)/pmf(m)) for Poisson(lam) and an error bound, for int64 j >= -m.

    With k = m + j, x = j/m, phi = lam - m:
    -m (log1p(x) - x) - log1p(x)/2 - j log1p((j - phi)/lam) - S(k) + S(m)
    (Stirling for both factorials, rearranged so no two large terms cancel) when
    k, m >= 16; the direct j ln lam - ln k! + ln m! otherwise.
    """
    j = np.asarray(j, dtype=np.int64)
    k = m + j
    val = np.empty(j.shape, dtype=np.float64)
    err = np.empty(j.shape, dtype=np.float64)
    acc = k >= 16 if m >= 16 else np.zeros(j.shape, dtype=bool)
    if acc.any():
        jj, kk = j[acc].astype(np.float64), k[acc].astype(np.float64)
        x = jj / m
        t1 = -float(m) * log1pmx(x)
        t2 = -0.5 * np.log1p(x)
        t3 = -jj * np.log1p((jj - float(lam - m)) / float(lam))
        t4 = _stirling_tail(float(m)) - _stirling_tail(kk)
        val[acc] = t1 + t2 + t3 + t4
        err[acc] = _STIRLING + _REL * (1.0 + np.abs(t1) + np.abs(t2) + np.abs(t3))
    d = ~acc
    if d.any():
        jj = j[d].astype(np.float64)
        lk, lm = lnfact(k[d]), float(lnfact(np.array([m]))[0])
        t = jj * math.log(lam)
        val[d] = t - lk + lm
        err[d] = 2 * _STIRLING + _REL * (1.0 + np.abs(t) + np.abs(lk) + abs(lm))
    return val, err


def poisson_ratio(lam: Fraction, m: int, j: int) -> tuple[int, int]:
    """pmf(m+j)/pmf(m) for Poisson(lam) as an unreduced (num, den) pair of ints."""
    a, b = lam.numerator, lam.denominator
    if j >= 0:  # prod_{i=1..j} lam/(m+i)
        return a**j, b**j * ex.prod_range(m + 1, m + j + 1)
    jj = -j  # prod_{i=0..jj-1} (m-i)/lam
    return b**jj * ex.prod_range(m - jj + 1, m + 1), a**jj


def _window(center: float, lo: int, hi: int | None) -> list[int]:
    c = int(math.floor(center)) if math.isfinite(center) else lo
    out = [v for v in range(c - 4, c + 5) if v >= lo and (hi is None or v <= hi)]
    return out + [lo] if hi is None else out + [lo, hi]


def _sup(points: list[int], logr_fn: LogRatio, t: int) -> float:
    """An upper bound on sup_j log R(j) + |j|/t, given points that include both maxima.

    log R is concave (the pmf is log-concave), so on each side of 0 the maximum sits where
    the increments change sign; the callers pass a window of +-4 around both crossings.
    """
    j = np.array(sorted(set(points)), dtype=np.int64)
    val, err = logr_fn(j)
    g = val + np.abs(j) / t
    return float(np.max(g + 4.0 * err)) + 1e-9


def poisson(prg: Prg, lam: Fraction, n: int) -> np.ndarray:
    """``n`` i.i.d. Poisson(lam), exact, for rational lam > 0."""
    if lam < 1:
        return _poisson_small(prg, lam, n)
    m = lam.numerator // lam.denominator
    t = math.isqrt(m) + 1
    lam_f = float(lam)

    def logr(j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return poisson_logr(lam, m, j)

    phi = float(lam - m)  # the crossings lam e^(+-1/t) - m, computed without cancellation
    right = _window(lam_f * math.expm1(1.0 / t) + phi, 0, None)
    left = _window(lam_f * math.expm1(-1.0 / t) + phi, -m, 0)
    sup = _sup(right + left, logr, t)
    sup_frac = Fraction(sup)

    def ratio(j: int) -> tuple[int, int]:
        return poisson_ratio(lam, m, j)

    return _envelope(prg, n, m=m, t=t, lo=-m, hi=None, sup=sup, sup_frac=sup_frac, logr=logr, ratio=ratio)


def _poisson_small(prg: Prg, lam: Fraction, n: int) -> np.ndarray:
    """Poisson(lam) for lam < 1 as the sum of pieces Poisson(lam') with lam' <= 1/2.

    Each piece: K geometric with P(K = k) = (1 - lam') lam'^k (Bernoulli(lam') trials),
    accepted with probability 1/K! (AND of Bernoulli(1/i), i = 2..K); then P(K = k | acc)
    is proportional to lam'^k / k!. Acceptance (1 - lam') e^lam' >= 0.82.
    """
    pieces = 1 if lam <= Fraction(1, 2) else 2
    piece = lam / pieces
    total = np.zeros(n, dtype=np.int64)
    for _ in range(pieces):
        out = np.empty(n, dtype=np.int64)
        todo = np.arange(n)
        while todo.size:
            k = np.zeros(todo.size, dtype=np.int64)
            act = np.arange(todo.size)
            while act.size:
                hit = ex.bern_const(prg, piece, act.size)
                act = act[hit]
                k[act] += 1
            ok = np.ones(todo.size, dtype=bool)
            i = 2
            while True:
                idx = np.nonzero(ok & (k >= i))[0]
                if idx.size == 0:
                    break
                ok[idx] = ex.below(prg, i, idx.size) == 0
                i += 1
            out[todo[ok]] = k[ok]
            todo = todo[~ok]
        total += out
    return total


def _envelope(
    prg: Prg,
    n: int,
    *,
    m: int,
    t: int,
    lo: int,
    hi: int | None,
    sup: float,
    sup_frac: Fraction,
    logr: LogRatio,
    ratio: ExactRatio,
) -> np.ndarray:
    """Rejection from m + DiscreteLaplace(t) with acceptance R(j) exp(|j|/t - sup)."""
    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        j = ex.discrete_laplace_ts(prg, t, 1, todo.size)
        valid = (j >= lo) if hi is None else (j >= lo) & (j <= hi)
        log_a = np.full(j.shape, -np.inf)
        margin = np.full(j.shape, _FLOOR)
        if valid.any():
            jv = j[valid]
            val, err = logr(jv)
            log_a[valid] = val + np.abs(jv) / t - sup
            margin[valid] = 4.0 * err + _FLOOR + _REL * (sup + np.abs(jv) / t)

        def exact(i: int, j: np.ndarray = j) -> tuple[int, int, Fraction]:
            num, den = ratio(int(j[i]))
            return num, den, Fraction(abs(int(j[i])), t) - sup_frac

        ok = ex.accept_filtered(prg, log_a, margin, exact) & valid
        out[todo[ok]] = m + j[ok]
        todo = todo[~ok]
    return out


# --------------------------------------------------------------------------- binomial


def binomial_logr(n: int, p: Fraction, m: int, j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log(pmf(m+j)/pmf(m)) for Binomial(n, p), 0 <= m+j <= n, and an error bound.

    With k = m+j, k' = n-k, m' = n-m, phi = np - m, accurate form (all of k, k', m, m' >= 16):
    -m l(j/m) - log1p(j/m)/2 - m' l(-j/m') - log1p(-j/m')/2 - j log1p((j-phi)/(k' p))
    - S(k) + S(m) - S(k') + S(m'), l(x) = log1p(x) - x; else the direct lnfact form.
    """
    j = np.asarray(j, dtype=np.int64)
    k = m + j
    kp = n - k
    mp = n - m
    pf = float(p)
    val = np.empty(j.shape, dtype=np.float64)
    err = np.empty(j.shape, dtype=np.float64)
    acc = (k >= 16) & (kp >= 16) if (m >= 16 and mp >= 16) else np.zeros(j.shape, dtype=bool)
    if acc.any():
        jj, kk, kkp = j[acc].astype(np.float64), k[acc].astype(np.float64), kp[acc].astype(np.float64)
        t1 = -float(m) * log1pmx(jj / m)
        t2 = -float(mp) * log1pmx(-jj / mp)
        t3 = -0.5 * (np.log1p(jj / m) + np.log1p(-jj / mp))
        t4 = -jj * np.log1p((jj - float(n * p - m)) / (kkp * pf))
        t5 = _stirling_tail(float(m)) + _stirling_tail(float(mp)) - _stirling_tail(kk) - _stirling_tail(kkp)
        val[acc] = t1 + t2 + t3 + t4 + t5
        err[acc] = 2 * _STIRLING + _REL * (1.0 + np.abs(t1) + np.abs(t2) + np.abs(t3) + np.abs(t4))
    d = ~acc
    if d.any():
        jj = j[d].astype(np.float64)
        lk, lkp = lnfact(k[d]), lnfact(kp[d])
        lm, lmp = (float(v) for v in lnfact(np.array([m, mp])))
        t = jj * (math.log(p) - math.log(1 - p))
        val[d] = t - lk - lkp + lm + lmp
        err[d] = 4 * _STIRLING + _REL * (1.0 + np.abs(t) + np.abs(lk) + np.abs(lkp) + abs(lm) + abs(lmp))
    return val, err


def binomial_ratio(n: int, p: Fraction, m: int, j: int) -> tuple[int, int]:
    """pmf(m+j)/pmf(m) for Binomial(n, p) as an unreduced (num, den) pair of ints."""
    pa, qa = p.numerator, p.denominator - p.numerator
    if j >= 0:
        return ex.prod_range(n - m - j + 1, n - m + 1) * pa**j, ex.prod_range(m + 1, m + j + 1) * qa**j
    jj = -j
    return ex.prod_range(m - jj + 1, m + 1) * qa**jj, ex.prod_range(n - m + 1, n - m + jj + 1) * pa**jj


def binomial(prg: Prg, trials: int, p: Fraction, n: int) -> np.ndarray:
    """``n`` i.i.d. Binomial(trials, p), exact, for rational 0 <= p <= 1."""
    if p == 0 or trials == 0:
        return np.zeros(n, dtype=np.int64)
    if p == 1:
        return np.full(n, trials, dtype=np.int64)
    if p > Fraction(1, 2):
        return trials - binomial(prg, trials, 1 - p, n)
    if trials <= 8:
        total = np.zeros(n, dtype=np.int64)
        for _ in range(trials):
            total += ex.bern_const(prg, p, n)
        return total
    m = ((trials + 1) * p.numerator) // p.denominator
    m = min(max(m, 0), trials)
    var = trials * p * (1 - p)
    t = math.isqrt(var.numerator // var.denominator) + 1
    pf, qf = float(p), float(1 - p)
    e1, em1 = math.exp(1.0 / t), math.expm1(1.0 / t)
    npq, phi = float(trials * p * (1 - p)), float(trials * p - m)

    def logr(j: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return binomial_logr(trials, p, m, j)

    # the crossings k_right = (n p e - q)/(p e + q), k_left = (n+1) p/(q e + p), relative to m
    j_right = (npq * em1 - qf) / (pf * e1 + qf) + phi
    j_left = (pf - npq * em1) / (qf * e1 + pf) + phi
    pts = _window(j_right, 0, trials - m) + _window(j_left, -m, 0)
    sup = _sup(pts, logr, t)

    def ratio(j: int) -> tuple[int, int]:
        return binomial_ratio(trials, p, m, j)

    return _envelope(
        prg, n, m=m, t=t, lo=-m, hi=trials - m, sup=sup, sup_frac=Fraction(sup), logr=logr, ratio=ratio
    )


# --------------------------------------------------------------------------- negative binomial


def nb_logf(r: Fraction, scale: Fraction, k: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """log f(k), f(k) = Gamma(k+r)/(Gamma(r) k!) exp(-k/scale) (f(0) = 1), and an error bound.

    For k >= 16, with w = k+1 and d = r-1:
    ln Gamma(w+d) - ln Gamma(w) = (w+d-1/2) log1p(d/w) + d ln w - d + S(w+d) - S(w).
    """
    k = np.asarray(k, dtype=np.int64)
    rf, sf = float(r), float(scale)
    lg_r = math.lgamma(rf)
    val = np.empty(k.shape, dtype=np.float64)
    err = np.empty(k.shape, dtype=np.float64)
    small = k < 16
    if small.any():
        table = np.array([math.lgamma(i + rf) - math.lgamma(i + 1.0) for i in range(16)])
        ks = k[small]
        tk = ks / sf
        val[small] = table[ks] - lg_r - tk
        err[small] = _REL * (1.0 + np.abs(table[ks]) + abs(lg_r) + tk)
    big = ~small
    if big.any():
        w = k[big].astype(np.float64) + 1.0
        dd = rf - 1.0
        t1 = (w + dd - 0.5) * np.log1p(dd / w)
        t2 = dd * np.log(w)
        t3 = _stirling_tail(w + dd) - _stirling_tail(w)
        tk = (w - 1.0) / sf
        val[big] = t1 + t2 - dd + t3 - lg_r - tk
        err[big] = _STIRLING + _REL * (1.0 + np.abs(t1) + np.abs(t2) + abs(lg_r) + tk)
    return val, err


def nb_coeff(r: Fraction, k: int) -> tuple[int, int]:
    """Gamma(k+r)/(Gamma(r) k!) = prod_{i<k} (i+r)/(i+1) as an unreduced (num, den)."""
    rn, rd = r.numerator, r.denominator
    return ex.prod([i * rd + rn for i in range(k)]), rd**k * ex.prod_range(1, k + 1)


def negative_binomial(prg: Prg, r: Fraction, scale: Fraction, n: int) -> np.ndarray:
    """``n`` i.i.d. NB(r, q = exp(-1/scale)): P(k) = Gamma(k+r)/(Gamma(r) k!) (1-q)^r q^k.

    r = whole + frac: ``whole`` geometric variables (CKS20 Algorithm 2 magnitudes) plus,
    if frac > 0, one NB(frac) from the banded envelope (module docstring).
    """
    whole = r.numerator // r.denominator
    frac = r - whole
    total = np.zeros(n, dtype=np.int64)
    for _ in range(whole):
        total += ex.geometric_scaled(prg, scale.numerator, scale.denominator, n)
    if frac:
        total += _nb_fractional(prg, frac, scale, n)
    return total


def _nb_fractional(prg: Prg, r: Fraction, scale: Fraction, n: int) -> np.ndarray:
    """NB(r, exp(-1/scale)) for 0 < r < 1 by rejection from a banded envelope."""
    big_b = 1
    while (1 << big_b) < 128 * scale:
        big_b += 1
    starts = np.array([0] + [1 << (b - 1) for b in range(1, big_b + 1)], dtype=np.int64)
    sizes = np.array([1] + [1 << (b - 1) for b in range(1, big_b + 1)], dtype=np.int64)
    val, err = nb_logf(r, scale, starts)  # f is decreasing: its band maximum is at the start
    heights = np.exp(val + 4.0 * err + 1e-9)  # > f(start), by the stated error bound
    mass = float(np.sum(sizes * heights))
    prec = 60 - max(0, math.ceil(math.log2(mass * 1.01 + 1.0)))
    weights = [int(math.ceil(float(sz) * h * 2.0**prec)) for sz, h in zip(sizes, heights)]
    e_beyond = big_b + 1 - math.floor((1 << big_b) / scale) + prec
    w_beyond = 1 << e_beyond if e_beyond >= 0 else 1
    cum = np.cumsum(np.array(weights + [w_beyond], dtype=np.int64))
    total_w = int(cum[-1])
    log_w = np.log(np.array(weights, dtype=np.float64))
    nb = len(weights)

    out = np.empty(n, dtype=np.int64)
    todo = np.arange(n)
    while todo.size:
        band = np.searchsorted(cum, ex.below(prg, total_w, todo.size), side="right")
        core = band < nb
        ok = np.zeros(todo.size, dtype=bool)
        ks = np.zeros(todo.size, dtype=np.int64)
        ci = np.nonzero(core)[0]
        if ci.size:
            b = band[ci]
            offs = (prg.uint64(ci.size) & (sizes[b] - 1).astype(np.uint64)).astype(np.int64)
            k = starts[b] + offs
            lv, le = nb_logf(r, scale, k)
            log_a = lv + np.log(sizes[b].astype(np.float64)) + prec * math.log(2.0) - log_w[b]
            margin = 4.0 * le + _FLOOR + _REL * (prec + log_w[b])

            def exact(i: int, k: np.ndarray = k, b: np.ndarray = b) -> tuple[int, int, Fraction]:
                num, den = nb_coeff(r, int(k[i]))
                bi = int(b[i])
                return num * int(sizes[bi]) << prec, den * weights[bi], Fraction(-int(k[i])) / scale

            ok[ci] = ex.accept_filtered(prg, log_a, margin, exact)
            ks[ci] = k
        for i in np.nonzero(~core)[0]:
            got = _nb_beyond_one(prg, r, scale, big_b, prec, w_beyond)
            if got is not None:
                ok[i], ks[i] = True, got
        out[todo[ok]] = ks[ok]
        todo = todo[~ok]
    return out


def _nb_beyond_one(prg: Prg, r: Fraction, scale: Fraction, big_b: int, prec: int, w_beyond: int) -> int | None:
    """One proposal from the bands b > big_b (reached with probability < e^-100).

    Band b = big_b + 1 + G, G ~ Geometric(1/2); band height h_b = 2^-floor(start/scale)
    bounds f there (Gamma ratio <= 1, e^-x <= 2^-floor(x)); the band is kept with
    probability size_b h_b 2^(G+1) 2^prec / w_beyond <= 1, then k uniform in the band is
    kept with probability f(k)/h_b. Pure Python: correctness over speed.
    """
    g = 0
    while int(prg.bits(1)[0]):
        g += 1
    b = big_b + 1 + g
    start = 1 << (b - 1)
    fl = math.floor(start / scale)
    e = (b - 1) - fl + (g + 1) + prec
    num, den = (1 << e, w_beyond) if e >= 0 else (1, w_beyond << -e)
    if ex.below_big(prg, den) >= num:
        return None
    k = start + ex.below_big(prg, start)
    cn, cd = nb_coeff(r, k)
    v = int(prg.uint64(1)[0] >> np.uint64(2))
    return k if ex.exact_less(prg, v, cn << fl, cd, Fraction(-k) / scale) else None
