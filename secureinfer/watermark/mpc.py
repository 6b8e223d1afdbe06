"""Watermark verification of a deployed, secret-shared model inside the MPC.

The auditor secret-shares the ±1 projection matrix ``S`` (T x d) and the watermark bits
``b`` (T) derived from the revealed key; the parties hold shares of the quantized layer
``q`` (d) — as the fixed-weight operand ``q = E + B`` of the deployment. The protocol
(rounds with FSS comparisons):

1. ``[y] = [S] q`` — the fixed-weight product of :func:`protocols.arith.linear_fixed`
   with ``S`` as the input: the parties open only ``S - A`` (A a dealer mask). 1 round.
2. ``[c_i] = [y_i >= 0]`` — the extracted bits; an exact sign gate (integers, no cut). 1 round.
3. ``H = sum b_i + sum c_i - 2 sum c_i b_i`` — one Beaver product per bit. 1 round.
4. ``[v] = [threshold - H >= 0]`` — the verdict. 1 round.

Only shares of ``v`` (and of ``H`` when the auditor asks) are returned to the auditor;
the weights, ``S``, ``b``, the extracted bits and ``H`` are never opened to anyone else.
Extraction is on exactly the integers the deployment holds, so the verdict equals the
plaintext verification of the same model at the deployment's precision.
"""

from __future__ import annotations

import torch

from secureinfer import ring
from secureinfer.dealer.material import BundleBuilder, PartyBundle, gate_material, linear_material, triple_material
from secureinfer.protocols.arith import beaver_mul, linear_fixed
from secureinfer.protocols.compare import default_method, gate, gate_params
from secureinfer.protocols.session import Session

__all__ = ["AUDIT_PREFIX", "audit_material", "parse_purpose", "purpose", "run_audit", "torch_layout"]

AUDIT_PREFIX = "audit:"
#: |y| <= d * max|q| < 2^44 for any layer the ring encodes (|q| < 2^31, d < 2^13 ... 2^20)
_Y_INT_BITS = 52
_H_INT_BITS = 16


def purpose(layer: str, bits: int) -> str:
    return f"{AUDIT_PREFIX}{bits}:{layer}"


def parse_purpose(text: str) -> tuple[str, int]:
    """(layer, bits) of an audit purpose string; ValueError if malformed."""
    if not text.startswith(AUDIT_PREFIX):
        raise ValueError("not an audit purpose")
    bits, _, layer = text[len(AUDIT_PREFIX):].partition(":")
    if not layer or not bits.isdigit() or not 1 <= int(bits) <= 4096:
        raise ValueError(f"malformed audit purpose {text!r}")
    return layer, int(bits)


def torch_layout(op: str, t: torch.Tensor) -> torch.Tensor:
    """A fixed operand in PyTorch's parameter layout (the engine stores Linear as W^T)."""
    return t.t() if op == "linear" else t


def audit_material(b: BundleBuilder, *, mask_flat: torch.Tensor, bits: int) -> None:
    """Dealer side: masks for S, the two sign gates and the Beaver triple."""
    method = default_method(b.n_parties)
    d = mask_flat.shape[0]
    linear_material(b, "audit/proj", input_shape=(bits, d), mask=mask_flat, op=ring.matmul)
    ell, cut = gate_params(0, int_bits=_Y_INT_BITS)
    gate_material(b, "audit/sign", shape=(bits, 1), ell=ell, cut=cut, payload="sign", frac=0, method=method)
    triple_material(b, "audit/cb", a_shape=(bits, 1), b_shape=(bits, 1))
    ell, cut = gate_params(0, int_bits=_H_INT_BITS)
    gate_material(b, "audit/verdict", shape=(1,), ell=ell, cut=cut, payload="sign", frac=0, method=method)


def run_audit(
    s: Session, bundle: PartyBundle, *, projection: torch.Tensor, bits: torch.Tensor, public_flat: torch.Tensor,
    local_flat: torch.Tensor, threshold: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Party side: shares of (verdict, Hamming distance). Cost: 4 rounds (FSS)."""
    t = projection.shape[0]
    y = linear_fixed(s, projection, bundle=bundle, name="audit/proj", public_mask_diff=public_flat,
                     local_operand=local_flat, op=ring.matmul, out_shape=(t, 1))
    c = gate(s, y, bundle=bundle, name="audit/sign", payload="sign", scale=0, int_bits=_Y_INT_BITS)
    bcol = bits.reshape(t, 1)
    cb = beaver_mul(s, c, bcol, bundle, "audit/cb")
    distance = (bcol.sum() + c.sum() - 2 * cb.sum()).reshape(1)
    thr = threshold if s.party_id == 0 else 0
    verdict = gate(s, thr - distance, bundle=bundle, name="audit/verdict", payload="sign", scale=0,
                   int_bits=_H_INT_BITS)
    return verdict, distance
