"""Watermark verification of a deployed, secret-shared model inside the MPC.

**Who chooses what.** The auditor reveals the owner's signed certificate and the watermark
key (seed, nonce) to every party. Each party checks them itself
(:func:`check_audit_request`: Ed25519 signature, key bound to the owner and opening the
commitment, layer and shape equal to the deployment's, an honest threshold whose
false-positive rate is at most the party's limit) and only then *derives* the ±1
projection ``S`` (T x d), the bits ``b`` and the threshold ``k`` from the key and the
certificate. ``S``, ``b`` and ``k`` are public among the parties; nothing the auditor
sends is used as a number in the computation. (An earlier design let the auditor send
secret-shared ``S``, ``b`` and ``k``: rows ``2^(52-j) e_i`` turned each sign gate into a
bit of a weight, and 4 audits recovered 4 weights exactly. With ``S`` and ``b`` expanded
from a hash, an auditor can no longer aim the projection.)

The parties hold shares of the quantized layer ``q`` (d) — the fixed-weight operand
``q = E + B`` of the deployment. The protocol:

1. ``[y] = S [q]`` — a public ±1 matrix times shares: local, exact in Z_2^64. 0 rounds.
2. ``[c_i] = [y_i >= 0]`` — the extracted bits; an exact sign gate (integers, no cut).
   1 round.
3. ``[H] = sum_i (b_i ? 1 - [c_i] : [c_i])`` — the Hamming distance; ``b`` is public, so
   this is local. 0 rounds.
4. ``[v] = [k - H >= 0]`` — the verdict. 1 round.
5. only if the auditor asks for the distance: ``[v * H]`` (one Beaver product). 1 round.

Only shares of ``v`` (and of ``v * H``) are returned to the auditor: a failing audit
reveals no distance at all, a passing one the distance of a model that carries this
watermark. **What an auditor learns:** one bit per audit (pass/fail), and for a model
that does not carry the watermark the bit is "fail" except with probability at most the
certificate's false-positive rate (``S`` and ``b`` are pseudo-random and independent of
the weights), so the audit reveals nothing else about the weights. Audits are
rate-limited per auditor and model and logged by every party.

Extraction is on exactly the integers the deployment holds, so the verdict equals the
plaintext verification of the same model at the deployment's precision.

Cost: ``T·d`` PRG signs and a local ``T x d`` ring product per party; online 2 rounds
(3 with the distance), ``8·(T + 1)`` bytes per peer (FSS) plus 16 bytes for the
distance; dealer material: ``T + 1`` comparison keys and one scalar triple.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from secureinfer import ring
from secureinfer.dealer.material import BundleBuilder, PartyBundle, gate_material, triple_material
from secureinfer.errors import InvalidArgumentError
from secureinfer.protocols.arith import beaver_mul
from secureinfer.protocols.compare import default_method, gate, gate_params
from secureinfer.prg import SEED_BYTES
from secureinfer.protocols.session import Session
from secureinfer.watermark.certificate import Certificate
from secureinfer.watermark.keys import WatermarkKey
from secureinfer.watermark.scheme import DEFAULT_FPR, sign_blocks, watermark_bits

__all__ = [
    "AUDIT_PREFIX",
    "AuditSpec",
    "audit_material",
    "check_audit_request",
    "parse_purpose",
    "purpose",
    "run_audit",
    "torch_layout",
]

AUDIT_PREFIX = "audit:"
#: |y| <= d * max|q| < 2^52 for any layer the ring encodes (|q| < 2^31 and d < 2^21)
_Y_INT_BITS = 52
_H_INT_BITS = 16
#: the largest watermark a party audits (bits); the certificate format allows more
MAX_AUDIT_BITS = 4096


def purpose(layer: str, bits: int) -> str:
    return f"{AUDIT_PREFIX}{bits}:{layer}"


def parse_purpose(text: str) -> tuple[str, int]:
    """(layer, bits) of an audit purpose string; ValueError if malformed."""
    if not text.startswith(AUDIT_PREFIX):
        raise ValueError("not an audit purpose")
    bits, _, layer = text[len(AUDIT_PREFIX):].partition(":")
    if not layer or not bits.isdigit() or not 1 <= int(bits) <= MAX_AUDIT_BITS:
        raise ValueError(f"malformed audit purpose {text!r}")
    return layer, int(bits)


def torch_layout(op: str, t: torch.Tensor) -> torch.Tensor:
    """A fixed operand in PyTorch's parameter layout (the engine stores Linear as W^T)."""
    return t.t() if op == "linear" else t


@dataclass(frozen=True)
class AuditSpec:
    """What a party derived from a verified certificate and key: all public among parties."""

    seed: bytes
    bits: int
    threshold: int
    layer: str


def check_audit_request(
    *, certificate: bytes, seed: bytes, nonce: bytes, layer: str, layer_shape: tuple[int, ...],
    max_fpr: float = DEFAULT_FPR,
) -> AuditSpec:
    """Verify what an auditor revealed; the spec of the audit, or ``InvalidArgumentError``.

    Checks (every failing one is listed): the certificate parses and its signature
    verifies; the key belongs to the certificate's owner and opens its commitment; the
    threshold is honest and its false-positive rate is at most ``max_fpr``; the
    certificate's layer is ``layer`` with the deployed parameter's shape; at most
    :data:`MAX_AUDIT_BITS` bits.
    """
    from secureinfer.errors import SecureInferError
    from secureinfer.watermark.verify import check_certificate

    try:
        cert = Certificate.from_json(certificate)
    except SecureInferError as exc:
        raise InvalidArgumentError(f"audit refused: certificate rejected: {exc}") from None
    if len(seed) != SEED_BYTES or len(nonce) != SEED_BYTES:
        raise InvalidArgumentError(f"audit refused: the watermark seed and nonce must be {SEED_BYTES} bytes each")
    key = WatermarkKey(seed=bytes(seed), nonce=bytes(nonce))
    problems = check_certificate(cert, key, max_fpr=max_fpr)
    if cert.layer != layer:
        problems.append(f"the certificate is for layer {cert.layer!r}, the audit names {layer!r}")
    if tuple(cert.layer_shape) != tuple(layer_shape):
        problems.append(f"the certificate says {cert.layer!r} has shape {tuple(cert.layer_shape)}, "
                        f"the deployed parameter has {tuple(layer_shape)}")
    if cert.bits > MAX_AUDIT_BITS:
        problems.append(f"the certificate has {cert.bits} bits; parties audit at most {MAX_AUDIT_BITS}")
    if problems:
        raise InvalidArgumentError("audit refused: " + "; ".join(problems))
    return AuditSpec(seed=key.seed, bits=cert.bits, threshold=cert.threshold, layer=cert.layer)


def audit_material(b: BundleBuilder, *, bits: int) -> None:
    """Dealer side: the two sign gates and the scalar triple of the distance release."""
    method = default_method(b.n_parties)
    ell, cut = gate_params(0, int_bits=_Y_INT_BITS)
    gate_material(b, "audit/sign", shape=(bits,), ell=ell, cut=cut, payload="sign", frac=0, method=method)
    ell, cut = gate_params(0, int_bits=_H_INT_BITS)
    gate_material(b, "audit/verdict", shape=(1,), ell=ell, cut=cut, payload="sign", frac=0, method=method)
    triple_material(b, "audit/vh", a_shape=(1,), b_shape=(1,))


def project_shares(seed: bytes, q_share: torch.Tensor, *, bits: int, chunk_elems: int = 1 << 22) -> torch.Tensor:
    """This party's share of ``S q``: the public signs of ``seed`` times its share of ``q``.

    Exact in Z_2^64 (``ring.matmul``); ``S`` is expanded block by block, so memory stays
    ``O(chunk_elems)``.
    """
    q = q_share.reshape(-1, 1).to(torch.int64)
    blocks = sign_blocks(seed, bits=bits, dim=q.shape[0], chunk_elems=chunk_elems)
    return torch.cat([ring.matmul(blk.to(torch.int64), q) for blk in blocks]).reshape(-1)


def run_audit(
    s: Session, bundle: PartyBundle, *, spec: AuditSpec, q_share: torch.Tensor, reveal_distance: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Party side: shares of (verdict, verdict * distance or None). Cost: 2-3 rounds (FSS)."""
    y = project_shares(spec.seed, q_share, bits=spec.bits)
    c = gate(s, y, bundle=bundle, name="audit/sign", payload="sign", scale=0, int_bits=_Y_INT_BITS)
    b = watermark_bits(spec.seed, bits=spec.bits).to(torch.bool)
    one = 1 if s.party_id == 0 else 0
    distance = torch.where(b, one - c, c).sum().reshape(1)
    thr = spec.threshold if s.party_id == 0 else 0
    verdict = gate(s, thr - distance, bundle=bundle, name="audit/verdict", payload="sign", scale=0,
                   int_bits=_H_INT_BITS)
    released = beaver_mul(s, verdict, distance, bundle, "audit/vh") if reveal_distance else None
    return verdict, released
