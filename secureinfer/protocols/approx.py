"""Secure nonlinear functions: products, exp, reciprocal, rsqrt, sigmoid, tanh, GELU,
softmax, LayerNorm, LeakyReLU and secret x secret MatMul.

**Masked evaluation: one round per multiplicative level.** The dealer-assisted truncation
(:func:`secureinfer.protocols.arith.truncate`) opens ``c = z + 2^62 + r``; its result is
``T = P + A + w B`` with ``P`` and the wrap bit ``w`` public and ``A = -(r >> f)``,
``B = 2^(64-f) r_63`` known to the dealer. The opening is therefore also a Beaver
opening of ``T``: for masked values ``T_i = P_i + a_i (A_i + w_i B_i)`` (public integer
``a_i``)

    prod_i T_i = sum_S (prod_{i not in S} P_i) (prod_{i in S} a_i) [prod_{i in S} (A_i + w_i B_i)]

and the dealer supplies shares of every ``prod_{i in U} B_i prod_{i in S-U} A_i``
(|S| >= 2; products of B's that reach 2^64 vanish). So products of any k masked values
are local, and each multiplicative level costs exactly one opening that truncates *and*
masks for the next level — instead of a Beaver round plus a truncation round. This is
Beaver's circuit randomization (CRYPTO 1991) with the masks of opened values reused as
in ABY2.0 (Patra et al., USENIX Security 2021), on top of the wrap-aware truncation. All
openings are of uniformly masked values, one fresh mask each.

Each function is written once as a *program* over an evaluator: the party evaluator runs
it on shares, the dealer evaluator generates exactly the material it consumes (same item
names, party 0 gets every correction, the others seeds only) and counts its rounds
(:func:`describe`).

Online rounds are for n = 2 (FSS comparison, 1 round per gate); the bitwise comparison
for n >= 3 costs 7 rounds per gate, given in parentheses. Errors are the measured max
|secure - torch(float64)| over dense grids of fixed-point inputs (f = 16) in the range
(tests/unit/test_approx.py; the same for n = 2 and 3). Inputs must also satisfy the
ring's input range |x| < 2^15.

==========  ========================================================  =======  =================  =============
function    method                                                    rounds   range              max error
==========  ========================================================  =======  =================  =============
mul/square  masked product; ``frac`` truncates in one more round      1 (+1)   |xy| < 2^62 ulp    exact/+1 ulp
exp         (1 + t + t^2/2)^256, t = x/256: 8 squarings (CrypTen's    10       x in [-384, 4]     3.6e-6 (x<=0),
            limit method (1 + x/2^n)^(2^n), second-order base)                                    rel 1.6e-4
reciprocal  octave gate x = 2^j m, m in [1, 2) (Catrina-Saxena FC'10  5 (11)   [2^-8, 2^15)       rel 1.4e-5
            normalization); y0 = (24 - 8m)/17; 2 Newton steps
            y' = 2y - m y^2 (one 3-input product each)
rsqrt       octave gate; y0 = 1.2638 - 0.2863 m; 2 Newton steps       7 (13)   [2^-8, 2^15)       rel 2.7e-6
            t = m y^2, y' = y (3 - t) / 2
tanh        2 gates [x >= -5], [x >= 5]; Chebyshev interpolant deg    7 (13)   all x (saturates)  9.1e-5
            31 of tanh on [-5, 5] (odd terms); +-1 outside
sigmoid     as tanh: Chebyshev deg 31 on [-10, 10]; 0 / 1 outside     7 (13)   all x (saturates)  4.6e-5
gelu        as tanh: Chebyshev deg 16 of x Phi(x) on [-4, 4];         6 (12)   all x              1.3e-4
            0 / x outside (exact erf GELU)
softmax     max tree of ReLU gates, clamp x - max >= -256, exp,       16 +     |x| < 2^15         5.2e-5
            sum, reciprocal of the sum, product                       log2 K   (K <= 1024 tested)
layernorm   mean (local), variance (masked squares), octave gate,     8 (15)   var in [0, 2^16],  1.3e-4
            rsqrt, product; no affine (a following channel_affine)             N <= 4096
leaky_relu  a x + (1 - a) ReLU(x); a with ``slope_bits`` bits         1 (7)    |x| < 2^15         2^-17|x|
matmul      Beaver matrix triple (A, B, C = A @ B), SecureML-style    1        |XY| < 2^62 ulp    exact
==========  ========================================================  =======  =================  =============

Outputs have more fractional bits than inputs (28 for the piecewise functions and exp,
32 for softmax and LayerNorm, ``s_x + s_y`` for products; see :func:`describe`); the
engine's planner truncates where a following op needs fewer.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from numpy.polynomial import chebyshev as cheb

from secureinfer import ring
from secureinfer.dealer.material import BundleBuilder, PartyBundle, gate_material
from secureinfer.errors import RangeError
from secureinfer.protocols.arith import TRUNC_ELL
from secureinfer.protocols.compare import DIFF_INT_BITS, default_method, gate, gate_params, gate_rounds
from secureinfer.protocols.session import Session

__all__ = [
    "KINDS", "Masked", "Spec", "describe", "run", "material", "matmul", "matmul_material", "matmul_shape", "leaky_relu",
    "leaky_relu_material", "mul", "mul_material", "square", "square_material", "exp", "exp_material",
    "reciprocal", "reciprocal_material", "rsqrt", "rsqrt_material", "sigmoid", "sigmoid_material", "tanh",
    "tanh_material", "gelu", "gelu_material", "softmax", "softmax_material", "layernorm", "layernorm_material",
]

Shape = tuple[int, ...]

_S = 28  # scale of exp, of the Chebyshev terms and of the piecewise outputs
_SLO_CHEB = 18  # scale of the factors of the top Chebyshev level (its products are not truncated)
_SX, _SLO = 20, 10  # Newton: scale of m and y, and of the copy of m the first guess is made from
_SC = 16  # scale of the parity factor 2^(-(j mod 2)/2) of the square root
# Newton–Raphson on m in [1, 2): (a, b) of the linear first guess y0 = a - b m
_RECIP_GUESS = (24.0 / 17.0, 8.0 / 17.0)  # max |1 - m y0| = 1/17
_RSQRT_GUESS = (1.26380117, 0.28630268)  # max |1 - m y0^2| = 0.0445 (minimax)


# ============================================================================ evaluators


@dataclass
class _Base:
    """The secret part ``A + w B`` of one opened value (party: shares; dealer: values)."""

    a: torch.Tensor
    b: torch.Tensor | None  # None when the opening did not truncate (B = 0)
    kbits: int  # B = 2^kbits * r_63 (64: B vanishes)
    w: torch.Tensor | None = None  # public wrap bit (party side)


@dataclass
class Masked:
    """``T = P + alpha (A + w B)``: public ``P`` and integer ``alpha``, dealer-known mask."""

    pub: torch.Tensor
    alpha: int
    base: _Base

    def affine(self, mul: int = 1, add: int | torch.Tensor = 0) -> "Masked":
        """``mul * T + add`` for public integers (local, still masked)."""
        return Masked(self.pub * mul + add, self.alpha * mul, self.base)


def _subsets(mask: int) -> list[int]:
    """Every subset of the bit set ``mask`` (including 0 and itself)."""
    out, u = [], mask
    while True:
        out.append(u)
        if u == 0:
            return out
        u = (u - 1) & mask


class _Eval:
    """Operations shared by both sides; subclasses implement the protocol steps."""

    def __init__(self, name: str, method: str, device: torch.device | str) -> None:
        self.name, self.method, self.device = name, method, torch.device(device)
        self._n = 0

    def fresh(self, tag: str) -> str:
        self._n += 1
        return f"{self.name}/{tag}{self._n}"

    @staticmethod
    def _valid(fs: Sequence[Masked], u: int) -> bool:
        """Whether ``prod_{i in U} B_i`` can be non-zero mod 2^64."""
        ks = [fs[i].base for i in range(len(fs)) if u >> i & 1]
        return all(k.b is not None for k in ks) and (len(ks) <= 1 or sum(k.kbits for k in ks) < 64)

    def gate_round_count(self, scale: int, int_bits: int) -> int:
        """Online rounds of one comparison gate (see protocols.compare)."""
        return gate_rounds(self.method, scale, int_bits=int_bits)


class _PartyEval(_Eval):
    """Party side: runs the program on shares (one :meth:`trunc` = one round)."""

    def __init__(self, session: Session, bundle: PartyBundle, name: str, method: str) -> None:
        super().__init__(name, method, session.device)
        self.s, self.bundle, self.pid = session, bundle, session.party_id

    def pub(self, x: torch.Tensor, v: int | torch.Tensor) -> torch.Tensor:
        return x + v if self.pid == 0 else x

    def plain(self, m: Masked) -> torch.Tensor:
        sec = m.base.a if m.base.b is None else m.base.a + m.base.w * m.base.b
        return self.pub(m.alpha * sec, m.pub)

    def trunc(self, items: Sequence[tuple[torch.Tensor, int]]) -> list[Masked]:
        """One round: open every ``z + 2^62 + r``; returns masked ``z >> frac``."""
        names = [self.fresh("t") for _ in items]
        rs = [self.bundle.share(f"{n}/r", z.shape) for n, (z, _) in zip(names, items)]
        cs = self.s.open([self.pub(z, 1 << TRUNC_ELL) + r for (z, _), r in zip(items, rs)])
        out = []
        for n, (z, frac), r, c in zip(names, items, rs, cs):
            if frac == 0:
                out.append(Masked(c - (1 << TRUNC_ELL), 1, _Base(-r, None, 64)))
                continue
            r_hi = self.bundle.share(f"{n}/r_hi", z.shape)
            b = self.bundle.share(f"{n}/r_63", z.shape) << (64 - frac)
            p = ring.logical_rshift(c, frac) - (1 << (TRUNC_ELL - frac))
            out.append(Masked(p, 1, _Base(-r_hi, b, 64 - frac, 1 - ring.bit(c, 63))))
        return out

    def mul(self, *fs: Masked) -> torch.Tensor:
        """Shares of the product of masked values (local; dealer items ``<p>/<S>_<U>``)."""
        pname, k = self.fresh("p"), len(fs)
        total = None
        for s in range(1 << k):
            idx = [i for i in range(k) if s >> i & 1]
            pubs = [fs[i].pub for i in range(k) if not s >> i & 1]
            if not idx:
                if self.pid != 0:
                    continue
                term = math.prod(pubs[1:], start=pubs[0])
            else:
                alpha = math.prod(fs[i].alpha for i in idx)
                if len(idx) == 1:
                    b = fs[idx[0]].base
                    sec = b.a if b.b is None else b.a + b.w * b.b
                else:
                    shape = torch.broadcast_shapes(*(fs[i].pub.shape for i in idx))
                    sec = 0
                    for u in _subsets(s):
                        if self._valid(fs, u):
                            item = self.bundle.share(f"{pname}/{s:x}_{u:x}", shape)
                            ws = [fs[i].base.w for i in range(k) if u >> i & 1]
                            sec = sec + (math.prod(ws[1:], start=ws[0]) * item if ws else item)
                term = alpha * sec
                if pubs:
                    term = term * math.prod(pubs[1:], start=pubs[0])
            total = term if total is None else total + term
        return total

    def gate(self, x: torch.Tensor, *, payload: str, scale: int, int_bits: int = 15) -> torch.Tensor:
        return gate(self.s, x, bundle=self.bundle, name=self.fresh("g"), payload=payload, scale=scale,
                    method=self.method, int_bits=int_bits)


class _DealerEval(_Eval):
    """Dealer side (``builder``) or round counting only (``builder=None``).

    Plain values are ``meta`` tensors (shapes only); masks are real values when building.
    """

    def __init__(self, builder: BundleBuilder | None, name: str, method: str) -> None:
        super().__init__(name, method, "meta")
        self.b = builder
        self.rounds = 0

    def input(self, shape: Sequence[int]) -> torch.Tensor:
        return torch.zeros(tuple(shape), dtype=torch.int64, device="meta")

    def pub(self, x: torch.Tensor, v: int | torch.Tensor) -> torch.Tensor:
        return x + v

    def plain(self, m: Masked) -> torch.Tensor:
        return torch.zeros(m.pub.shape, dtype=torch.int64, device="meta")

    def trunc(self, items: Sequence[tuple[torch.Tensor, int]]) -> list[Masked]:
        self.rounds += 1
        out = []
        for z, frac in items:
            n, shape = self.fresh("t"), tuple(z.shape)
            meta = torch.zeros(shape, dtype=torch.int64, device="meta")
            if self.b is None:
                a = b = meta
            else:
                r = self.b.random(f"{n}/r", shape)
                a, b = -r, None
                if frac:
                    r_hi, r_63 = ring.logical_rshift(r, frac), ring.bit(r, 63)
                    self.b.shared(f"{n}/r_hi", r_hi)
                    self.b.shared(f"{n}/r_63", r_63)
                    a, b = -r_hi, r_63 << (64 - frac)
            out.append(Masked(meta, 1, _Base(a, b if frac else None, 64 - frac)))
        return out

    def mul(self, *fs: Masked) -> torch.Tensor:
        pname, k = self.fresh("p"), len(fs)
        shape = torch.broadcast_shapes(*(f.pub.shape for f in fs))
        if self.b is not None:
            for s in range(1 << k):
                if bin(s).count("1") < 2:
                    continue
                for u in _subsets(s):
                    if self._valid(fs, u):
                        vals = [fs[i].base.b if u >> i & 1 else fs[i].base.a for i in range(k) if s >> i & 1]
                        self.b.shared(f"{pname}/{s:x}_{u:x}", math.prod(vals[1:], start=vals[0]))
        return torch.zeros(shape, dtype=torch.int64, device="meta")

    def gate(self, x: torch.Tensor, *, payload: str, scale: int, int_bits: int = 15) -> torch.Tensor:
        name = self.fresh("g")
        self.rounds += self.gate_round_count(scale, int_bits)
        if self.b is not None:
            ell, cut = gate_params(scale, int_bits=int_bits)
            gate_material(self.b, name, shape=tuple(x.shape), ell=ell, cut=cut, payload=payload, frac=0,
                          method=self.method)
        return torch.zeros(x.shape, dtype=torch.int64, device="meta")


Ev = _PartyEval | _DealerEval


# ============================================================================ building blocks


def _rescale(z: torch.Tensor, s_in: int, s_out: int, *, factor: float = 1.0,
             bound_bits: int = 1) -> tuple[torch.Tensor, int, int]:
    """``(z', frac, alpha)``: truncating ``z'`` by ``frac`` then scaling by ``alpha`` gives
    ``factor * z`` at scale ``s_out``. Non-power-of-two factors are applied as a public
    integer ``round(factor 2^Q)`` before the truncation, with ``Q`` as large as the value
    bound ``|factor z| < 2^bound_bits`` allows (``z'`` stays below 2^61)."""
    m, e = math.frexp(factor)
    if m == 0.5:  # factor = 2^(e-1): exact reinterpretation of the scale
        s_in = s_in - (e - 1)
    else:
        q = 61 - s_in - bound_bits
        if abs(factor) * 2.0**q < 2.0**16:
            raise RangeError(f"input scale {s_in} leaves too few bits to multiply by {factor:g}")
        z, s_in = z * round(factor * 2.0**q), s_in + q
    if s_in >= s_out:
        return z, s_in - s_out, 1
    return z, 0, 1 << (s_out - s_in)


def _masked(ev: Ev, specs: Sequence[tuple]) -> list[Masked]:
    """One round: masked values from specs ``(z, s_in, s_out[, factor[, bound_bits]])``."""
    plans = []
    for z, s_in, s_out, *opt in specs:
        factor = opt[0] if opt else 1.0
        bound = opt[1] if len(opt) > 1 else 1
        plans.append(_rescale(z, s_in, s_out, factor=factor, bound_bits=bound))
    outs = ev.trunc([(z, frac) for z, frac, _ in plans])
    return [m.affine(alpha) if alpha != 1 else m for m, (_, _, alpha) in zip(outs, plans)]


def _octave_bits(ev: Ev, x: torch.Tensor, scale: int, j_lo: int, j_hi: int) -> torch.Tensor:
    """Bits ``[x >= 2^j]`` for ``j = j_lo+1 .. j_hi`` (one gate); x assumed ``>= 2^j_lo``.

    The comparison is exact to 2^-9 of the smallest threshold, so a misread only moves
    ``x`` to a neighbouring octave."""
    n_j = j_hi - j_lo
    ell = scale + j_hi + 2
    if ell > 62:
        raise RangeError(f"octave range 2^{j_hi} at scale {scale} exceeds the ring")
    cut = max(0, scale + j_lo - 10)
    thr = torch.tensor([round(2.0 ** (j + scale)) for j in range(j_lo + 1, j_hi + 1)], device=ev.device)
    stacked = ev.pub(x.unsqueeze(-1).repeat(*([1] * x.dim()), n_j), -thr)
    return ev.gate(stacked, payload="sign", scale=cut + 12, int_bits=ell - cut - 12)


def _octave_value(ev: Ev, bits: torch.Tensor, values: Sequence[float], scale: int) -> torch.Tensor:
    """Shares of ``values[j*]`` (encoded at ``scale``) for the octave j* the bits select."""
    enc = [round(v * 2.0**scale) for v in values]
    steps = torch.tensor([enc[i + 1] - enc[i] for i in range(len(enc) - 1)], device=ev.device)
    return ev.pub((bits * steps).sum(-1), enc[0])


def _guess(mlo: Masked, ab: tuple[float, float]) -> Masked:
    """``y0 = a - b m`` at scale ``_SX`` from ``m`` at scale ``_SLO`` (local)."""
    return mlo.affine(-round(ab[1] * 2**_SLO), round(ab[0] * 2 ** (2 * _SLO)))


def _newton_recip(ev: Ev, m: Masked, mlo: Masked, iters: int, s_out: int) -> Masked:
    """``1/m`` for m in [1, 2): y' = 2y - m y^2, one 3-input product and one round each."""
    y = _guess(mlo, _RECIP_GUESS)
    for i in range(iters):
        z = ev.plain(y) * (1 << (2 * _SX + 1)) - ev.mul(m, y, y)  # scale 3 * _SX
        y = ev.trunc([(z, 3 * _SX - (s_out if i == iters - 1 else _SX))])[0]
    return y


def _newton_rsqrt(ev: Ev, m: Masked, mlo: Masked, iters: int, s_out: int) -> Masked:
    """``1/sqrt(m)`` for m in [1, 2): t = m y^2; y' = y (3 - t) / 2; two rounds each."""
    y = _guess(mlo, _RSQRT_GUESS)
    for i in range(iters):
        t = ev.trunc([(ev.mul(m, y, y), 2 * _SX)])[0]
        z = ev.mul(y, t.affine(-1, 3 << _SX))
        y = ev.trunc([(z, 2 * _SX + 1 - (s_out if i == iters - 1 else _SX))])[0]
    return y


@dataclass
class _Normalized:
    m: Masked  # x 2^-j in [1, 2) at scale _SX
    mlo: Masked  # the same at scale _SLO
    facs: list[Masked]  # [2^-j] (root 1) or [2^-floor(j/2), 2^(-(j mod 2)/2)] (root 2)
    fac_scale: int  # total scale of the factors
    other: Masked | None  # other * prod(facs), if asked for


def _normalize(ev: Ev, x: torch.Tensor, scale: int, j_lo: int, j_hi: int, *, root: int, fac: float = 1.0,
               other: tuple[Masked, int, int] | None = None) -> _Normalized:
    """Octave normalization of ``x`` in [2^j_lo, 2^(j_hi+1)): ``m = x 2^-j`` in [1, 2).

    ``x^(-1/root) = F m^(-1/root)`` with ``F = 2^-j`` or ``F = 2^-floor(j/2) c 2^(-(j mod 2)/2)``
    (``c = fac``): powers of two are exact at their scale, so ``F`` loses no precision
    over the whole range. Also returns ``other * F`` when ``other = (v, s_v, s_out)``. 3 rounds: the
    octave gate, one masking round, one product round."""
    bits = _octave_bits(ev, x, scale, j_lo, j_hi)
    js = range(j_lo, j_hi + 1)
    s_g = max(0, j_hi)  # 2^-j is exact at this scale for every j <= j_hi
    s_x = min(scale, 60 - s_g)
    specs = [(x, scale, s_x), (_octave_value(ev, bits, [2.0**-j for j in js], s_g), s_g, s_g)]
    if root == 2:
        s_q = max(0, j_hi // 2)
        specs.append((_octave_value(ev, bits, [2.0 ** -(j // 2) for j in js], s_q), s_q, s_q))
        specs.append((_octave_value(ev, bits, [fac * 2.0 ** -((j % 2) / 2) for j in js], _SC), _SC, _SC))
    xm, gm, *hm = _masked(ev, specs)
    facs, s_f = ([gm], s_g) if root == 1 else (hm, s_q + _SC)
    xg = ev.mul(xm, gm)  # scale s_x + s_g, value in [1, 2)
    items = [(xg, s_x + s_g - _SX), (xg, s_x + s_g - _SLO)]
    if other is not None:
        v, s_v, s_out = other
        items.append((ev.mul(v, *facs), s_v + s_f - s_out))
    m, mlo, *rest = ev.trunc(items)
    return _Normalized(m, mlo, facs, s_f, rest[0] if rest else None)


def _cheb_piece(ev: Ev, u: list[Masked], coeffs: np.ndarray, s: int, s_sum: int) -> torch.Tensor:
    """Shares of ``sum_k c_k T_k(u)`` at scale ``s_sum`` (Chebyshev basis, Clenshaw-free).

    ``T_k`` of level ``ceil(log2 k)`` is ``2 T_m T_i - T_{m-i}`` (m = 2^(level-1), i = k-m),
    one round per level; the top level is never truncated: its products go straight into
    the sum, from copies of their factors at scale 18 (``u = [u at s, u at 18]``).
    """
    s_lo = _SLO_CHEB
    need = {k for k in range(1, len(coeffs)) if coeffs[k] != 0}

    def split(k: int) -> tuple[int, int, int]:
        m = 1 << ((k - 1).bit_length() - 1)
        return m, k - m, 2 * m - k  # T_k = 2 T_m T_i - T_{m-i}; m - i = 2m - k

    todo = sorted(need)
    while todo:
        k = todo.pop()
        if k > 1:
            for d in split(k):
                if d and d not in need:
                    need.add(d)
                    todo.append(d)
    level = {k: (k - 1).bit_length() for k in need}
    top = max(level.values())
    top_ks = [k for k in sorted(need) if level[k] == top] if top else []
    lo_needed = {d for k in top_ks for d in split(k)[:2]}
    t_hi: dict[int, Masked] = {1: u[0]}
    t_lo: dict[int, Masked] = {1: u[1]}

    def recur(k: int, ts: dict[int, Masked], sc: int) -> torch.Tensor:
        m, i, d = split(k)
        prev = ev.pub(torch.zeros_like(ev.plain(u[0])), 1 << (2 * sc)) if d == 0 else ev.plain(t_hi[d]) << (2 * sc - s)
        return 2 * ev.mul(ts[m], ts[i]) - prev

    for lvl in range(1, top):
        ks = [k for k in sorted(need) if level[k] == lvl]
        zs = {k: recur(k, t_hi, s) for k in ks}
        items = [(zs[k], s) for k in ks] + [(zs[k], 2 * s - s_lo) for k in ks if k in lo_needed]
        outs = ev.trunc(items)
        t_hi.update(zip(ks, outs[: len(ks)]))
        t_lo.update(zip([k for k in ks if k in lo_needed], outs[len(ks):]))
    p = ev.pub(torch.zeros_like(ev.plain(u[0])), round(coeffs[0] * 2.0**s_sum))
    for k in sorted(need):
        if coeffs[k] == 0:
            continue
        if level[k] == top and top:
            p = p + round(coeffs[k] * 2.0 ** (s_sum - 2 * s_lo)) * recur(k, t_lo, s_lo)
        else:
            p = p + round(coeffs[k] * 2.0 ** (s_sum - s)) * ev.plain(t_hi[k])
    return p


@dataclass(frozen=True)
class _Piecewise:
    """``f`` on [-B, B] as a Chebyshev series; constant or identity tails outside."""

    fn: Callable[[np.ndarray], np.ndarray]
    bound: float
    degree: int
    parity: str  # "odd", "odd+const" or "any"
    left: str  # value for x < -B: "0" or "-1"
    right: str  # value for x >= B: "1" or "x"

    def coeffs(self) -> np.ndarray:
        c = cheb.chebinterpolate(lambda u: self.fn(u * self.bound), self.degree)
        if self.parity != "any":
            keep0 = self.parity == "odd+const"
            c = np.array([v if (k % 2 == 1 or (k == 0 and keep0)) else 0.0 for k, v in enumerate(c)])
        return c


def _erf(v: np.ndarray) -> np.ndarray:
    return np.vectorize(math.erf)(v)


_PIECES = {
    "tanh": _Piecewise(np.tanh, 5.0, 31, "odd", "-1", "1"),
    "sigmoid": _Piecewise(lambda v: 0.5 + 0.5 * np.tanh(0.5 * v), 10.0, 31, "odd+const", "0", "1"),
    "gelu": _Piecewise(lambda v: 0.5 * v * (1.0 + _erf(v / math.sqrt(2.0))), 4.0, 16, "any", "0", "x"),
}


# ============================================================================ programs


def _p_piecewise(ev: Ev, x: torch.Tensor, scale: int, *, kind: str) -> tuple[torch.Tensor, int]:
    """Piecewise sigmoid / tanh / GELU (see :data:`_PIECES`).

    One gate gives ``lo = [x >= -B]`` and ``hi = [x >= B]``; one round masks ``u = x/B``
    (folding the input's truncation); the Chebyshev series of ``f(B u)`` takes
    ceil(log2 deg) - 1 rounds; a last round masks the series and the bits, and
    ``out = (lo - hi) p(u) + tails`` is local. Rounds: ceil(log2 deg) + 2 (+ 6 for a
    bitwise gate). Chebyshev interpolation at first-kind points (Trefethen, ATAP ch. 8);
    CrypTen evaluates tanh by a Chebyshev series as well, without the piecewise tails.
    """
    pw = _PIECES[kind]
    c = pw.coeffs()
    thr = round(pw.bound * 2.0**scale)
    bits = ev.gate(torch.stack([ev.pub(x, thr), ev.pub(x, -thr)], -1), payload="sign", scale=scale)
    lo, hi = bits[..., 0], bits[..., 1]
    u = _masked(ev, [(x, scale, _S, 1.0 / pw.bound, 0), (x, scale, _SLO_CHEB, 1.0 / pw.bound, 0)])
    s_sum = 59 - max(0, math.ceil(math.log2(float(np.abs(c).sum()))))
    p = _cheb_piece(ev, u, c, _S, s_sum)
    specs = [(p, s_sum, _S), (lo - hi, 0, 0)] + ([(hi, 0, 0)] if pw.right == "x" else [])
    pm, ind, *hm = _masked(ev, specs)
    out = ev.mul(ind, pm)
    if pw.right == "1":
        out = out + (hi << _S)
    else:  # identity tail: hi * x = B * hi * u
        out = out + ev.mul(hm[0], u[0]) * int(pw.bound)  # B is an integer for identity tails
    if pw.left == "-1":
        out = ev.pub(out + (lo << _S), -(1 << _S))
    return out, _S


def _exp_masked(ev: Ev, x: torch.Tensor, scale: int, iters: int) -> Masked:
    """``e^x = p(t)^(2^n)``, ``t = x / 2^n``, ``p(t) = 1 + t + t^2/2`` (scaling and squaring).

    One round masks t (at scale 30: x is exact), one computes p, then n squarings of one
    round each: n + 2 rounds. The error of the base, ``~ 2^n t^3 / 6``, is below 3.5e-6
    for x <= 0 with n = 8 (CrypTen's first-order base needs n = 12 for 6.6e-5).
    ``p(t) < 1`` for t in (-2, 0), so the result is right for x > -2^(n+1) · 0.75; the
    softmax clamps its input to stay there."""
    st = 30
    (t,) = _masked(ev, [(x, scale, st - iters)])  # x at scale st - n is t at scale st
    z = ev.mul(t, t) + (ev.plain(t) << (st + 1))
    (y,) = ev.trunc([(ev.pub(z, 1 << (2 * st + 1)), 2 * st + 1 - _S)])
    for _ in range(iters):
        (y,) = ev.trunc([(ev.mul(y, y), _S)])
    return y


def _p_exp(ev: Ev, x: torch.Tensor, scale: int, *, iters: int = 8) -> tuple[Masked, int]:
    return _exp_masked(ev, x, scale, iters), _S


def _p_recip(ev: Ev, x: torch.Tensor, scale: int, *, lo: int = -8, hi: int = 14,
             iters: int = 2) -> tuple[torch.Tensor, int]:
    """``1/x`` for x in [2^lo, 2^(hi+1)): normalization (3 rounds) + ``iters`` Newton rounds."""
    nz = _normalize(ev, x, scale, lo, hi, root=1)
    y = _newton_recip(ev, nz.m, nz.mlo, iters, _SX)
    return ev.mul(*nz.facs, y), nz.fac_scale + _SX


def _p_rsqrt(ev: Ev, x: torch.Tensor, scale: int, *, lo: int = -8, hi: int = 14,
             iters: int = 2) -> tuple[torch.Tensor, int]:
    """``x^-1/2`` for x in [2^lo, 2^(hi+1)): normalization (3 rounds) + 2 rounds per Newton step."""
    nz = _normalize(ev, x, scale, lo, hi, root=2)
    y = _newton_rsqrt(ev, nz.m, nz.mlo, iters, _SX)
    return ev.mul(*nz.facs, y), nz.fac_scale + _SX


def _p_softmax(ev: Ev, x: torch.Tensor, scale: int, *, axis: int = -1, clamp: float = 256.0,
               iters: int = 8) -> tuple[torch.Tensor, int]:
    """Softmax over ``axis``: ``e_i = exp(max(x_i - max, -clamp))``, ``e_i / sum e``.

    Max: a tournament of ``max(a, b) = b + ReLU(a - b)`` gates (ceil(log2 K) gates, on
    differences, so with :data:`~secureinfer.protocols.compare.DIFF_INT_BITS`). The
    sum lies in [1, K]; its reciprocal comes from the octave normalization, whose product
    round also computes ``e_i 2^-j``, and 2 Newton steps. Rounds: ceil(log2 K) + 16."""
    v = x.movedim(axis, -1)
    k = v.shape[-1]
    if k == 1:
        return ev.pub(torch.zeros_like(x), 1 << 32), 32
    mx = v
    while mx.shape[-1] > 1:  # tournament of max gates: max(a, b) = b + ReLU(a - b)
        half = mx.shape[-1] // 2
        a, b = mx[..., :half], mx[..., half : 2 * half]
        mx = torch.cat([b + ev.gate(a - b, payload="relu", scale=scale, int_bits=DIFF_INT_BITS),
                        mx[..., 2 * half :]], -1)
    cl = round(clamp * 2.0**scale)
    # max(x - max, -clamp); x - max is in (-2^16, 0] for inputs in range
    d = ev.pub(ev.gate(ev.pub(v - mx, cl), payload="relu", scale=scale, int_bits=DIFF_INT_BITS), -cl)
    e = _exp_masked(ev, d, scale, iters)
    total = ev.plain(e).sum(-1, keepdim=True)  # in [1, k]
    nz = _normalize(ev, total, _S, 0, k.bit_length() - 1, root=1, other=(e, _S, 16))
    y = _newton_recip(ev, nz.m, nz.mlo, 2, 16)
    return ev.mul(nz.other, y).movedim(-1, axis), 32


def _p_layernorm(ev: Ev, x: torch.Tensor, scale: int, *, eps: float = 1e-5,
                 var_range: tuple[int, int] = (-20, 16)) -> tuple[torch.Tensor, int]:
    """``(x - mean) / sqrt(var + eps)`` over the last axis (input scale <= 16).

    ``N (x - mean)`` is exact and local; one round masks ``d = x - mean`` twice (a copy
    for the variance, a finer one for the output); ``W = N (var + eps)`` is a local sum of
    masked squares; its octave normalization (3 rounds) yields ``m`` and
    ``d sqrt(N) 2^-floor(j/2) 2^(-(j mod 2)/2)``; 2 Newton steps for ``m^-1/2`` (4
    rounds); the final product is local. Rounds: 8. Valid for var + eps in
    [2^var_range[0], 2^var_range[1]] (rows with var + eps below it are normalized less
    accurately; above it the result is wrong) and N <= 4096. Measured max error 1.3e-4."""
    n = x.shape[-1]
    if n < 2:
        return torch.zeros_like(x), 32
    nd = x * n - x.sum(-1, keepdim=True)  # N (x - mean), exact
    lg = math.ceil(math.log2(n))
    j_hi = lg + var_range[1]  # octaves of W = N (var + eps)
    j_lo = math.floor(math.log2(n * max(eps, 2.0 ** var_range[0])))
    s_v = min(20, (60 - j_hi) // 2)
    # the output product d_o 2^-floor(j/2) sqrt(N) 2^(-(j mod 2)/2) is at most sqrt(2N)
    s_o = min(28, 60 - j_hi // 2 - _SC - (lg + 2) // 2)
    if s_v < 8 or s_o < 8:
        raise RangeError(f"layernorm over {n} features exceeds the ring's range")
    dv, do = _masked(ev, [(nd, scale, s_v, 1.0 / n, 16), (nd, scale, s_o, 1.0 / n, 16)])
    w = ev.pub(ev.mul(dv, dv).sum(-1, keepdim=True), round(n * eps * 2.0 ** (2 * s_v)))  # N (var + eps)
    # out = d / sqrt(W / N) = d F / sqrt(m): m = W 2^-j in [1, 2), F = sqrt(N) 2^(-j/2)
    nz = _normalize(ev, w, 2 * s_v, j_lo, j_hi, root=2, fac=math.sqrt(n), other=(do, s_o, 16))
    y = _newton_rsqrt(ev, nz.m, nz.mlo, 2, 16)
    return ev.mul(nz.other, y), 32


def _p_mul(ev: Ev, xy: tuple[torch.Tensor, torch.Tensor], scale: int, *, frac: int = 0,
           square: bool = False) -> tuple[torch.Tensor | Masked, int]:
    """``x*y`` (or ``x^2``): mask both in one round, multiply locally; ``frac`` adds a round.

    ``scale`` is the sum of the input scales (the product's scale before ``frac``)."""
    x, y = xy
    if square:
        (xm,) = ev.trunc([(x, 0)])
        z = ev.mul(xm, xm)
    else:
        xm, ym = ev.trunc([(x, 0), (y, 0)])
        z = ev.mul(xm, ym)
    if frac:
        return ev.trunc([(z, frac)])[0], scale - frac
    return z, scale


_PROGRAMS: dict[str, Callable[..., tuple[torch.Tensor | Masked, int]]] = {
    "mul": _p_mul, "exp": _p_exp, "reciprocal": _p_recip, "rsqrt": _p_rsqrt, "softmax": _p_softmax,
    "layernorm": _p_layernorm,
    "tanh": lambda ev, x, s: _p_piecewise(ev, x, s, kind="tanh"),
    "sigmoid": lambda ev, x, s: _p_piecewise(ev, x, s, kind="sigmoid"),
    "gelu": lambda ev, x, s: _p_piecewise(ev, x, s, kind="gelu"),
}
KINDS = tuple(_PROGRAMS)


# ============================================================================ entry points


@dataclass(frozen=True)
class Spec:
    """Public description of one call: output shape and scale, online rounds."""

    shape: Shape
    scale: int
    rounds: int


def run(kind: str, session: Session, x: torch.Tensor | tuple[torch.Tensor, torch.Tensor], bundle: PartyBundle,
        name: str, *, scale: int, method: str | None = None, **kw: object) -> torch.Tensor:
    """Party side of program ``kind`` on shares ``x`` at ``scale`` (see :func:`describe`)."""
    ev = _PartyEval(session, bundle, name, method or default_method(session.n_parties))
    out, _ = _PROGRAMS[kind](ev, x, scale, **kw)
    return ev.plain(out) if isinstance(out, Masked) else out


def _meta_input(ev: _DealerEval, shape: Shape | tuple[Shape, Shape]) -> torch.Tensor | tuple[torch.Tensor, ...]:
    if shape and isinstance(shape[0], (tuple, list, torch.Size)):
        return tuple(ev.input(s) for s in shape)  # type: ignore[arg-type]
    return ev.input(shape)  # type: ignore[arg-type]


def material(kind: str, builder: BundleBuilder, name: str, *, shape: Shape | tuple[Shape, Shape], scale: int,
             method: str | None = None, **kw: object) -> None:
    """Dealer side of program ``kind`` for an input of ``shape`` (a pair for ``mul``)."""
    ev = _DealerEval(builder, name, method or default_method(builder.n_parties))
    _PROGRAMS[kind](ev, _meta_input(ev, shape), scale, **kw)


def describe(kind: str, shape: Shape | tuple[Shape, Shape], *, scale: int, method: str,
             **kw: object) -> Spec:
    """Output shape, output scale and online rounds of program ``kind`` (no material)."""
    ev = _DealerEval(None, "describe", method)
    out, out_scale = _PROGRAMS[kind](ev, _meta_input(ev, shape), scale, **kw)
    return Spec(tuple(out.pub.shape if isinstance(out, Masked) else out.shape), out_scale, ev.rounds)


def mul(session: Session, x: torch.Tensor, y: torch.Tensor, bundle: PartyBundle, name: str, *,
        frac: int = 0) -> torch.Tensor:
    """``[(x*y) >> frac]`` (broadcasting). Masked product: 1 round, +1 if ``frac > 0``;
    8 bytes per element of x and y per peer (+8 per output element with ``frac``)."""
    return run("mul", session, (x, y), bundle, name, scale=0, frac=frac)


def mul_material(builder: BundleBuilder, name: str, *, x_shape: Shape, y_shape: Shape, frac: int = 0) -> None:
    material("mul", builder, name, shape=(tuple(x_shape), tuple(y_shape)), scale=0, frac=frac)


def square(session: Session, x: torch.Tensor, bundle: PartyBundle, name: str, *, frac: int = 0) -> torch.Tensor:
    """``[(x*x) >> frac]``: 1 round (+1 with ``frac``), 8 bytes per element per peer."""
    return run("mul", session, (x, x), bundle, name, scale=0, frac=frac, square=True)


def square_material(builder: BundleBuilder, name: str, *, shape: Shape, frac: int = 0) -> None:
    material("mul", builder, name, shape=(tuple(shape), tuple(shape)), scale=0, frac=frac, square=True)


def _bind(kind: str, doc: str) -> tuple[Callable[..., torch.Tensor], Callable[..., None]]:
    """Named party / dealer functions for program ``kind`` (options as its ``_p_*``)."""

    def party(session: Session, x: torch.Tensor, bundle: PartyBundle, name: str, *, scale: int,
              method: str | None = None, **kw: object) -> torch.Tensor:
        return run(kind, session, x, bundle, name, scale=scale, method=method, **kw)

    def dealer(builder: BundleBuilder, name: str, *, shape: Shape, scale: int, method: str | None = None,
               **kw: object) -> None:
        material(kind, builder, name, shape=tuple(shape), scale=scale, method=method, **kw)

    party.__name__, dealer.__name__ = kind, f"{kind}_material"
    party.__doc__ = f"Shares of {doc} from shares ``x`` at ``scale`` (method, rounds, error: module table)."
    dealer.__doc__ = f"Dealer material of :func:`{kind}` for an input of ``shape`` at ``scale``."
    return party, dealer


exp, exp_material = _bind("exp", "e^x")
reciprocal, reciprocal_material = _bind("reciprocal", "1/x")
rsqrt, rsqrt_material = _bind("rsqrt", "1/sqrt(x)")
sigmoid, sigmoid_material = _bind("sigmoid", "sigmoid(x)")
tanh, tanh_material = _bind("tanh", "tanh(x)")
gelu, gelu_material = _bind("gelu", "GELU(x)")
softmax, softmax_material = _bind("softmax", "softmax(x, axis)")
layernorm, layernorm_material = _bind("layernorm", "LayerNorm(x) over the last axis (no affine)")


def leaky_relu(session: Session, x: torch.Tensor, bundle: PartyBundle, name: str, *, scale: int, slope: float,
               slope_bits: int = 16, method: str | None = None) -> torch.Tensor:
    """``a x + (1 - a) ReLU(x)`` at scale ``scale + slope_bits`` (a public, ``slope_bits`` bits).

    One ReLU gate (:func:`secureinfer.protocols.compare.gate`, payload ``relu``): 1 round
    with FSS; the rest is local."""
    r = gate(session, x, bundle=bundle, name=name, payload="relu", scale=scale, method=method)
    a = round(slope * 2**slope_bits)
    return a * x + ((1 << slope_bits) - a) * r


def leaky_relu_material(builder: BundleBuilder, name: str, *, shape: Shape, scale: int,
                        method: str | None = None) -> None:
    ell, cut = gate_params(scale)
    gate_material(builder, name, shape=tuple(shape), ell=ell, cut=cut, payload="relu", frac=0,
                  method=method or default_method(builder.n_parties))


def matmul_shape(x_shape: Shape, y_shape: Shape) -> Shape:
    """``torch.matmul`` output shape (raises RuntimeError if the shapes do not match)."""
    a = torch.empty(tuple(x_shape), device="meta")
    return tuple(torch.matmul(a, torch.empty(tuple(y_shape), device="meta")).shape)


def matmul(session: Session, x: torch.Tensor, y: torch.Tensor, bundle: PartyBundle, name: str) -> torch.Tensor:
    """``[X @ Y]`` for two secret tensors (Beaver 1991, matrix triples as in SecureML).

    The dealer gives ``[A]``, ``[B]`` (seed-only) and ``[C] = [A @ B]``; the parties open
    ``D = X - A`` and ``E = Y - B`` in one message and compute
    ``[XY] = [C] + D @ ([B] + E) + [A] @ E`` (``E`` in the middle term at party 0 only).
    Exact ring products (:func:`secureinfer.ring.matmul`); the output scale is the sum of
    the input scales. Cost: 1 round; 8 bytes per element of X and of Y per peer.
    """
    a = bundle.share(f"{name}/a", x.shape)
    b = bundle.share(f"{name}/b", y.shape)
    c = bundle.share(f"{name}/c", matmul_shape(x.shape, y.shape))
    d, e = session.open([x - a, y - b])
    return c + ring.matmul(d, b + e if session.party_id == 0 else b) + ring.matmul(a, e)


def matmul_material(builder: BundleBuilder, name: str, *, x_shape: Shape, y_shape: Shape) -> None:
    a = builder.random(f"{name}/a", tuple(x_shape))
    b = builder.random(f"{name}/b", tuple(y_shape))
    builder.shared(f"{name}/c", ring.matmul(a, b))
