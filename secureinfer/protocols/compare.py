"""Secure comparison, ReLU, max and argmax.

All of them are built on one *comparison gate* (:func:`gate`). For a shared ``[x]`` with
``|x| < 2^ell`` the gate returns shares of ``b * v`` where ``b = [x >= 0]`` and ``v`` is
a short vector of values the dealer knows (the payload, see
:data:`secureinfer.dealer.material.GATE_PAYLOADS`):

* ``sign``: v = (1,)                 -> [b]
* ``relu``: v = (1, r)               -> [b * x]                     (ReLU, no truncation)
* ``relu_trunc``: v = (1, r>>f, r_63) -> [b * (x >> f)]             (ReLU fused with truncation)

Gate (masked-input comparison): the dealer draws ``r`` uniform in Z_2^64. The parties
open ``c = x + 2^ell + r`` (uniform, so it reveals nothing). With ``u = x + 2^ell`` in
``[0, 2^(ell+1))``, ``b`` is bit ``ell`` of ``u = c - r``, i.e.

    b = c_ell XOR r_ell XOR [c mod 2^ell < r mod 2^ell]

and the last comparison is approximated on bits ``[cut, ell)`` only:
``d = [c[cut:ell] < r[cut:ell]]``. Dropping the low ``cut`` bits can only misclassify
``x`` in ``[-2^cut, 0)`` as non-negative, an error below 2^cut units (2^-12 in real value
by default) — the same tolerance as fixed point itself — and shortens the comparison from
62 to ``ell - cut`` bits. With ``beta = (1 - 2 r_ell) v`` and ``[r_ell v]`` from the
dealer, ``b v = c_ell v + (1 - 2 c_ell) ([r_ell v] + d beta)``, linear in the shares of
``d * beta``, which are obtained either

* ``method="fss"`` (two parties): each party evaluates its key of a distributed
  comparison function (Boyle et al., EUROCRYPT 2021) with payload ``beta`` at the public
  point ``c[cut:ell]``. **Cost: 1 round**, 8 bytes per element per peer; dealer keys of
  about ``16 + n(16 + 8k) + 8k`` bytes per element, n = ell - cut.
* ``method="bitwise"`` (any number of parties): the dealer shares the bits of
  ``alpha = r[cut:ell]``; ``d = sum_i (1 - c_i) (P_i - P_{i+1})`` where ``P_i`` is the
  product of the "bits equal" indicators above position i (MSB first), computed by a
  Hillis–Steele prefix product with Beaver triples (Damgård et al., TCC 2006 give the
  classic comparison circuits); then one Beaver product ``d * beta``.
  **Cost: 2 + ceil(log2 n) rounds** (7 for n = 27).

Range: exact for ``-2^ell <= x < 2^ell - 2^cut``; ``ell = scale + int_bits`` where
``int_bits`` (default 15) bounds the real magnitude to < 32768. Values are in range when
``|v| < 2^15`` (:data:`DEFAULT_INT_BITS`); a *difference* of two such values needs one bit
more, so :func:`max_pair`, :func:`argmax_onehot` and the max tournaments gate with
:data:`DIFF_INT_BITS` = 16. With ``ell = 63`` (:func:`full_range_int_bits`) the gate is exact
for *every* ring element: ``u = x + 2^63`` is then any 64-bit word and its top bit is the
sign, and the comparison keeps all 63 low bits (``cut = 0``: a cut would misread the top
``2^cut`` values as negative), so nothing a client can put in its shares leaves the gate's
range. :func:`clip` uses it: the DP release clips whatever ring value reaches it. Cost of
the full range: the comparison runs on 63 bits instead of ``ell - cut`` (27 at scale 16):
DCF keys about 2.3 times as long, one more round with ``bitwise``.
"""

from __future__ import annotations

import torch

from secureinfer import ring
from secureinfer.dealer.material import GATE_PAYLOADS, BundleBuilder, PartyBundle, gate_material
from secureinfer.errors import ProtocolError
from secureinfer.protocols.arith import beaver_mul
from secureinfer.protocols.session import Session

__all__ = [
    "DEFAULT_INT_BITS",
    "DIFF_INT_BITS",
    "PRECISION_BITS",
    "argmax_material",
    "argmax_onehot",
    "argmax_rounds",
    "clip",
    "clip_material",
    "clip_rounds",
    "full_range_int_bits",
    "gate",
    "gate_params",
    "gate_rounds",
    "max_pair",
    "max_pair_material",
    "max_pair_rounds",
]

DEFAULT_INT_BITS = 15
#: integer bits of a difference ``a - b`` of two values in the default range
DIFF_INT_BITS = DEFAULT_INT_BITS + 1
PRECISION_BITS = 12
_RING_SIGN_BIT = 63


def full_range_int_bits(scale: int) -> int:
    """``int_bits`` that makes the gate exact for every ring element (``ell = 63``)."""
    return _RING_SIGN_BIT - scale


def gate_params(scale: int, *, int_bits: int = DEFAULT_INT_BITS) -> tuple[int, int]:
    """``(ell, cut)`` of the gate for an input with ``scale`` fractional bits."""
    ell = scale + int_bits
    if ell > _RING_SIGN_BIT:
        raise ValueError(f"comparison range 2^{ell} exceeds the ring's signed range 2^63")
    if ell == _RING_SIGN_BIT:
        # full range: compare all 63 bits. With a cut, x in [2^63 - 2^cut, 2^63) would
        # read as negative, and a client choosing its shares could put a value there.
        return ell, 0
    return ell, max(0, scale - PRECISION_BITS)


def gate_rounds(method: str, scale: int, *, int_bits: int = DEFAULT_INT_BITS) -> int:
    """Online rounds of one gate: 1 with FSS, ``2 + ceil(log2 n)`` bitwise (n = ell - cut)."""
    if method == "fss":
        return 1
    ell, cut = gate_params(scale, int_bits=int_bits)
    return 2 + max(0, (ell - cut - 1).bit_length())


def _pow2(ell: int) -> int:
    """``2^ell`` as the int64 with the same bits (``2^63`` is ``-2^63`` in the ring)."""
    return -(1 << 63) if ell == _RING_SIGN_BIT else 1 << ell


def default_method(n_parties: int) -> str:
    return "fss" if n_parties == 2 else "bitwise"


def gate(
    session: Session,
    x: torch.Tensor,
    *,
    bundle: PartyBundle,
    name: str,
    payload: str,
    scale: int,
    frac: int = 0,
    method: str | None = None,
    int_bits: int = DEFAULT_INT_BITS,
) -> torch.Tensor:
    """Shares of ``[x >= 0] * v`` combined per ``payload`` (see the module docstring).

    ``scale`` is the number of fractional bits of ``x``; ``frac`` the truncation of the
    ``relu_trunc`` payload.
    """
    method = method or default_method(session.n_parties)
    ell, cut = gate_params(scale, int_bits=int_bits)
    n_bits = ell - cut
    pid = session.party_id
    kinds = GATE_PAYLOADS[payload]
    k = len(kinds)
    if payload == "relu_trunc" and ell > 62:
        raise ValueError("the relu_trunc payload needs ell <= 62 (its wrap term reads bit 63)")
    r = bundle.share(f"{name}/r", x.shape)
    xp = x + _pow2(ell) if pid == 0 else x
    c = session.open_one(xp + r)

    cbits = ring.logical_rshift(c, cut) & ((1 << n_bits) - 1)
    if method == "fss":
        y = _dcf_eval(session, bundle, name, cbits, k)
    elif method == "bitwise":
        y = _bitwise_dbeta(session, bundle, name, cbits, n_bits=n_bits, k=k)
    else:
        raise ValueError(f"unknown comparison method {method!r}")

    # shares of the payload vector v and of r_ell * v
    vs = []
    for j, kind in enumerate(kinds):
        if kind == "one":
            vs.append(torch.ones_like(x) if pid == 0 else torch.zeros_like(x))
        elif kind == "r":
            vs.append(r)
        else:
            vs.append(bundle.share(f"{name}/v{j}", x.shape))
    v = torch.stack(vs, dim=-1)
    rl_v = bundle.share(f"{name}/rl_v", (*x.shape, k))
    c_ell = ring.bit(c, ell).unsqueeze(-1)
    bv = c_ell * v + (1 - 2 * c_ell) * (rl_v + y)  # shares of b * v_j

    if payload == "sign":
        return bv[..., 0]
    if payload == "relu":
        coef = c - _pow2(ell)
        return coef * bv[..., 0] - bv[..., 1]
    if payload == "relu_trunc":
        coef = ring.logical_rshift(c, frac) - (1 << (ell - frac))
        wrap = (1 - ring.bit(c, 63)) * (1 << (64 - frac))
        return coef * bv[..., 0] - bv[..., 1] + wrap * bv[..., 2]
    raise ValueError(f"unknown payload {payload!r}")


def _dcf_eval(session: Session, bundle: PartyBundle, name: str, cbits: torch.Tensor, k: int) -> torch.Tensor:
    from secureinfer.fss import DcfKey, dcf_eval

    if session.n_parties != 2:
        raise ProtocolError("the FSS comparison runs between exactly two parties")
    key = DcfKey.from_bytes(bundle.blob(f"{name}/dcf"))
    n = cbits.numel()
    if key.seed.shape[0] != n or key.k != k:
        raise ProtocolError(f"dealer key for {name!r} covers {key.seed.shape[0]}x{key.k}, need {n}x{k}")
    out = dcf_eval(key, ring.to_numpy_u64(cbits.reshape(-1).contiguous()))
    return ring.from_numpy_u64(out).reshape(*cbits.shape, k).to(cbits.device)


def _bitwise_dbeta(
    session: Session, bundle: PartyBundle, name: str, cbits: torch.Tensor, *, n_bits: int, k: int
) -> torch.Tensor:
    """Shares of ``[cbits < alpha] * beta`` with a prefix-product circuit (any n)."""
    pid = session.party_id
    shape = tuple(cbits.shape)
    shifts = torch.arange(n_bits - 1, -1, -1, dtype=torch.int64, device=cbits.device)
    xb = (cbits.unsqueeze(-1) >> shifts) & 1  # public bits, MSB first
    ab = bundle.share(f"{name}/alpha_bits", (*shape, n_bits))
    one = 1 if pid == 0 else 0
    # e_j = [x_j == alpha_j] = x_j ? alpha_j : 1 - alpha_j
    e = torch.where(xb == 1, ab, one - ab)
    # inclusive prefix products Q_i = prod_{j<=i} e_j (Hillis–Steele, ceil(log2 n) rounds)
    q = e
    s, level = 1, 0
    while s < n_bits:
        prod = beaver_mul(session, q[..., s:], q[..., :-s], bundle, f"{name}/pre{level}")
        q = torch.cat([q[..., :s], prod], dim=-1)
        s *= 2
        level += 1
    # P_i = Q_{i-1} (P_1 = 1); first differing bit indicator P_i - P_{i+1} = P_i - Q_i
    ones = torch.full((*shape, 1), one, dtype=torch.int64, device=cbits.device)
    p = torch.cat([ones, q[..., :-1]], dim=-1)
    d = ((1 - xb) * (p - q)).sum(dim=-1, keepdim=True)
    beta = bundle.share(f"{name}/beta", (*shape, k))
    return beaver_mul(session, d, beta, bundle, f"{name}/dbeta")


def max_pair(
    session: Session, a: torch.Tensor, b: torch.Tensor, *, bundle: PartyBundle, name: str, scale: int,
    method: str | None = None, int_bits: int = DIFF_INT_BITS,
) -> torch.Tensor:
    """``[max(a, b)] = [b] + ReLU([a - b])``. Cost: one gate (1 round with FSS).

    ``int_bits`` bounds the *difference*: exact for ``|a|, |b| < 2^(int_bits - 1)`` (real);
    the default :data:`DIFF_INT_BITS` admits the default range ``|v| < 2^15``."""
    return b + gate(session, a - b, bundle=bundle, name=name, payload="relu", scale=scale, method=method,
                    int_bits=int_bits)


def max_pair_material(builder: BundleBuilder, name: str, *, shape: tuple[int, ...], scale: int, method: str,
                      int_bits: int = DIFF_INT_BITS) -> None:
    """Dealer side of :func:`max_pair` for operands of ``shape``."""
    ell, cut = gate_params(scale, int_bits=int_bits)
    gate_material(builder, name, shape=shape, ell=ell, cut=cut, payload="relu", frac=0, method=method)


def max_pair_rounds(method: str, scale: int, *, int_bits: int = DIFF_INT_BITS) -> int:
    """Online rounds of :func:`max_pair`."""
    return gate_rounds(method, scale, int_bits=int_bits)


def argmax_onehot(
    session: Session, x: torch.Tensor, *, bundle: PartyBundle, name: str, scale: int, method: str | None = None
) -> torch.Tensor:
    """One-hot shares of the argmax over the last axis (ties go to the lower index).

    Round 1: the signs ``b_ij = [x_i >= x_j]`` of all ``K(K-1)/2`` pairwise differences
    (one gate, :data:`DIFF_INT_BITS`, so exact for ``|x| < 2^15``); ``b_ji = 1 - b_ij``.
    Then ``count_i = sum_j b_ij`` equals ``K - 1`` exactly for the maximum, so round 2 is
    one gate on ``count_i - (K - 1)`` at scale 0.
    Cost: 2 gates (2 rounds with FSS); ``K(K-1)/2 + K`` comparisons per row.
    """
    kdim = x.shape[-1]
    iu, ju = torch.triu_indices(kdim, kdim, offset=1)
    diffs = x[..., iu] - x[..., ju]
    b = gate(session, diffs, bundle=bundle, name=f"{name}/pairs", payload="sign", scale=scale, method=method,
             int_bits=DIFF_INT_BITS)
    pid = session.party_id
    one = 1 if pid == 0 else 0
    counts = torch.zeros_like(x)
    counts.index_add_(x.dim() - 1, iu, b)
    counts.index_add_(x.dim() - 1, ju, one - b)
    shifted = counts - ((kdim - 1) if pid == 0 else 0)
    return gate(session, shifted, bundle=bundle, name=f"{name}/top", payload="sign", scale=0, method=method)


def argmax_material(
    builder: BundleBuilder, name: str, *, batch_shape: tuple[int, ...], kdim: int, scale: int, method: str
) -> None:
    """Dealer side of :func:`argmax_onehot` for rows of ``kdim`` values."""
    ell, cut = gate_params(scale, int_bits=DIFF_INT_BITS)
    gate_material(builder, f"{name}/pairs", shape=(*batch_shape, kdim * (kdim - 1) // 2), ell=ell, cut=cut,
                  payload="sign", frac=0, method=method)
    ell, cut = gate_params(0)
    gate_material(builder, f"{name}/top", shape=(*batch_shape, kdim), ell=ell, cut=cut, payload="sign", frac=0,
                  method=method)


def argmax_rounds(method: str, scale: int) -> int:
    """Online rounds of :func:`argmax_onehot`."""
    return gate_rounds(method, scale, int_bits=DIFF_INT_BITS) + gate_rounds(method, 0)


def clip(
    session: Session, x: torch.Tensor, *, bound: int, bundle: PartyBundle, name: str, scale: int,
    method: str | None = None,
) -> torch.Tensor:
    """``[clip(x, -C, C)]`` for any ring value ``x`` (``C = bound`` in fixed point, > 0).

    ``y = x - ReLU(x - C)``, then ``y + ReLU(-C - y)``: two full-range gates
    (``ell = 63``, ``cut = 0``, see :func:`full_range_int_bits`). Each gate returns ``b * z``
    with ``b`` the sign of the ring value ``z`` read as a signed 64-bit integer, exact for
    every ``z``. Hence
    ``y`` is ``C`` or ``x`` and the result is ``-C``, ``C`` or ``y``; it is ``y = x`` only
    when ``x - C < 0`` and ``-C - x < 0`` as signed ring values, i.e. ``-C < x < C``.
    The output is in ``[-C, C]`` whatever the shares of ``x`` hold: the sensitivity
    bound of the DP release does not rest on the client's input being in range.
    Cost: 2 gates (2 rounds with FSS; 2 x 8 with ``bitwise``), each comparing 63 bits.
    """
    if bound <= 0:
        raise ValueError(f"clip bound must be positive, got {bound}")
    pub = bound if session.party_id == 0 else 0
    ib = full_range_int_bits(scale)
    y = x - gate(session, x - pub, bundle=bundle, name=f"{name}/hi", payload="relu", scale=scale, method=method,
                 int_bits=ib)
    return y + gate(session, -pub - y, bundle=bundle, name=f"{name}/lo", payload="relu", scale=scale, method=method,
                    int_bits=ib)


def clip_material(builder: BundleBuilder, name: str, *, shape: tuple[int, ...], scale: int, method: str) -> None:
    """Dealer side of :func:`clip`."""
    ell, cut = gate_params(scale, int_bits=full_range_int_bits(scale))
    for k in ("hi", "lo"):
        gate_material(builder, f"{name}/{k}", shape=shape, ell=ell, cut=cut, payload="relu", frac=0, method=method)


def clip_rounds(method: str, scale: int) -> int:
    """Online rounds of :func:`clip`."""
    return 2 * gate_rounds(method, scale, int_bits=full_range_int_bits(scale))
