"""Statistical checks of integer samplers against exact pmfs (helper for test_dp_*).

A :class:`Law` is an exact (double precision) log-pmf on a finite window that holds all
but a negligible mass. :func:`run_suite` applies every check and returns the p-values;
a sampler passes when every p-value is >= ALPHA:

* ``chi2`` -- Pearson goodness of fit, adjacent values merged so each bin expects >=
  max(10, N/500) draws, tails pooled into the end bins;
* ``point`` -- the mass at 0 (symmetric laws) or at the mode, exact binomial test;
* ``moments`` -- sample mean and variance against the exact ones (z-tests using the
  exact 2nd and 4th central moments), the smaller p-value of the two;
* ``symmetry`` -- (symmetric laws) sign balance and the paired counts at k and -k;
* ``log_ratio`` -- for disjoint adjacent pairs (k, k+1) with the most mass, the count at k
  given the pair total is Binomial(n, p_k/(p_k + p_(k+1))): the privacy-loss ratio
  log(p_k/p_(k+1)) is what DP depends on. Sum of squared z-scores ~ chi2.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import special, stats

ALPHA = 1e-6


@dataclass(frozen=True)
class Law:
    name: str
    lo: int
    hi: int
    logpmf: np.ndarray  # log pmf at lo..hi (normalised over the window)
    symmetric: bool

    @property
    def values(self) -> np.ndarray:
        return np.arange(self.lo, self.hi + 1)

    @property
    def pmf(self) -> np.ndarray:
        return np.exp(self.logpmf)


def law_from_logpmf(name: str, lo: int, hi: int, fn: Callable[[np.ndarray], np.ndarray], *, symmetric: bool) -> Law:
    k = np.arange(lo, hi + 1)
    lp = np.asarray(fn(k), dtype=np.float64)
    lp = lp - special.logsumexp(lp)
    return Law(name, lo, hi, lp, symmetric)


def law_from_pmf(name: str, lo: int, pmf: np.ndarray, *, symmetric: bool) -> Law:
    keep = pmf > 1e-300
    first, last = int(np.argmax(keep)), len(pmf) - int(np.argmax(keep[::-1])) - 1
    p = pmf[first : last + 1] / pmf[first : last + 1].sum()
    with np.errstate(divide="ignore"):
        return Law(name, lo + first, lo + last, np.log(p), symmetric)


# ------------------------------------------------------------------ standard laws


def discrete_laplace(scale: float) -> Law:
    q = math.exp(-1 / scale)
    span = int(40 * scale) + 40
    c = math.log((1 - q) / (1 + q))
    return law_from_logpmf(f"DLap({scale:g})", -span, span, lambda k: c - np.abs(k) / scale, symmetric=True)


def discrete_gaussian(sigma2: float) -> Law:
    span = int(12 * math.sqrt(sigma2)) + 12
    return law_from_logpmf(f"DGauss({sigma2:g})", -span, span, lambda k: -(k.astype(float) ** 2) / (2 * sigma2), symmetric=True)


def poisson(lam: float) -> Law:
    sd = math.sqrt(lam)
    lo, hi = max(0, int(lam - 12 * sd) - 10), int(lam + 14 * sd) + 20
    return law_from_logpmf(f"Poisson({lam:g})", lo, hi, lambda k: stats.poisson.logpmf(k, lam), symmetric=False)


def skellam(mu: float) -> Law:
    span = int(13 * math.sqrt(2 * mu)) + 20
    return law_from_logpmf(f"Skellam({mu:g})", -span, span, lambda k: stats.skellam.logpmf(k, mu, mu), symmetric=True)


def binomial(n: int, p: float) -> Law:
    sd = math.sqrt(n * p * (1 - p))
    lo, hi = max(0, int(n * p - 13 * sd) - 10), min(n, int(n * p + 13 * sd) + 10)
    return law_from_logpmf(f"Bin({n},{p:g})", lo, hi, lambda k: stats.binom.logpmf(k, n, p), symmetric=False)


def negative_binomial(r: float, scale: float) -> Law:
    q = math.exp(-1 / scale)
    hi = int(60 * scale * max(1.0, r)) + 60
    return law_from_logpmf(f"NB({r:g},{scale:g})", 0, hi, lambda k: stats.nbinom.logpmf(k, r, 1 - q), symmetric=False)


def nb_difference(r: float, scale: float) -> Law:
    """NB(r) - NB(r) by exact convolution of the (double precision) pmfs."""
    q = math.exp(-1 / scale)
    k = np.arange(0, int(60 * scale * max(1.0, r)) + 60)
    pmf = stats.nbinom.pmf(k, r, 1 - q)
    diff = np.convolve(pmf, pmf[::-1])  # index i <-> d = i - (len(k) - 1)
    return law_from_pmf(f"NB({r:g})-NB({r:g}) scale {scale:g}", -(len(k) - 1), diff, symmetric=True)


# ------------------------------------------------------------------ checks


def _chi2(x: np.ndarray, law: Law) -> float:
    n = x.size
    counts = np.bincount(np.clip(x, law.lo - 1, law.hi + 1) - (law.lo - 1), minlength=law.hi - law.lo + 3)
    exp = np.concatenate([[0.0], law.pmf * n, [0.0]])  # the window holds all but ~1e-15 of the mass
    need = max(10.0, n / 500)
    obs_bins, exp_bins = [], []
    acc_o = acc_e = 0.0
    for o, e in zip(counts, exp):
        acc_o += o
        acc_e += e
        if acc_e >= need:
            obs_bins.append(acc_o)
            exp_bins.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_o or acc_e:
        obs_bins[-1] += acc_o
        exp_bins[-1] += acc_e
    o, e = np.array(obs_bins), np.array(exp_bins)
    e = e * (o.sum() / e.sum())
    if len(o) < 2:
        return 1.0
    return float(stats.chi2.sf(float(np.sum((o - e) ** 2 / e)), len(o) - 1))


def _point(x: np.ndarray, law: Law) -> float:
    k0 = 0 if law.symmetric else int(law.values[np.argmax(law.logpmf)])
    p0 = float(law.pmf[k0 - law.lo])
    return float(stats.binomtest(int(np.sum(x == k0)), x.size, p0).pvalue)


def _moments(x: np.ndarray, law: Law) -> float:
    k = law.values.astype(np.float64)
    p = law.pmf
    mean = float(np.sum(p * k))
    c = k - mean
    var, m4 = float(np.sum(p * c**2)), float(np.sum(p * c**4))
    n = x.size
    xm = x.astype(np.float64) - mean
    z_mean = float(np.mean(xm)) / math.sqrt(var / n)
    z_var = (float(np.mean(xm**2)) - var) / math.sqrt((m4 - var**2) / n)
    return float(min(2 * stats.norm.sf(abs(z_mean)), 2 * stats.norm.sf(abs(z_var))))


def _symmetry(x: np.ndarray, law: Law) -> float:
    pos, neg = int(np.sum(x > 0)), int(np.sum(x < 0))
    p_sign = float(stats.binomtest(pos, pos + neg, 0.5).pvalue) if pos + neg else 1.0
    m = int(np.abs(x).max()) if x.size else 0
    cp = np.bincount(x[x > 0], minlength=m + 1)[1:]
    cn = np.bincount(-x[x < 0], minlength=m + 1)[1:]
    tot = cp + cn
    keep = tot >= 20
    if keep.sum() < 1:
        return p_sign
    stat = float(np.sum((cp[keep] - cn[keep]) ** 2 / tot[keep]))
    return min(p_sign, float(stats.chi2.sf(stat, int(keep.sum()))))


def _log_ratio(x: np.ndarray, law: Law) -> float:
    order = np.argsort(law.logpmf)[::-1]
    used: set[int] = set()
    pairs = []
    for i in order:
        for a in (i, i - 1):  # pair (a, a+1)
            if 0 <= a and a + 1 < len(law.logpmf) and a not in used and a + 1 not in used:
                pairs.append(a)
                used.update((a, a + 1))
                break
        if len(pairs) >= 200:
            break
    lo = law.lo
    counts = np.bincount(np.clip(x, lo, law.hi) - lo, minlength=law.hi - lo + 1)
    z2, df = 0.0, 0
    for a in pairs:
        n_ab = counts[a] + counts[a + 1]
        if n_ab < 50:
            continue
        p = 1.0 / (1.0 + math.exp(law.logpmf[a + 1] - law.logpmf[a]))
        z2 += (counts[a] - n_ab * p) ** 2 / (n_ab * p * (1 - p))
        df += 1
    return float(stats.chi2.sf(z2, df)) if df else 1.0


def run_suite(x: np.ndarray, law: Law) -> dict[str, float]:
    """p-value of every check (see the module docstring)."""
    x = np.asarray(x, dtype=np.int64).ravel()
    out = {"chi2": _chi2(x, law), "point": _point(x, law), "moments": _moments(x, law), "log_ratio": _log_ratio(x, law)}
    if law.symmetric:
        out["symmetry"] = _symmetry(x, law)
    return out


def passes(pvalues: dict[str, float]) -> bool:
    return all(p >= ALPHA for p in pvalues.values())
