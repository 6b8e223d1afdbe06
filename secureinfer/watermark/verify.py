"""Auditor-side verification of a watermark certificate against a model.

Checks, each with its own reason on failure (all are evaluated, so a verdict lists every
problem at once):

1. the certificate is well formed and its Ed25519 signature verifies under the owner key
   it names (an altered field or a forged certificate fails here), and, if the auditor
   expects a particular owner, that it is that owner;
2. the decision threshold is honest: ``P[Bin(T, 1/2) ≤ threshold]`` is recomputed
   exactly, must equal the stated false-positive rate and must not exceed the auditor's
   limit (default 10^-9);
3. the key file belongs to the owner (``seed = H(owner ‖ nonce)``) and opens the
   commitment;
4. if the suspect model's registration time is given, the certificate predates it;
5. the watermark: the layer exists with the certified shape; the bits are extracted from
   the fixed-point weights exactly as the MPC verifier does
   (:func:`~secureinfer.watermark.scheme.project_fixed_point`, sign test) and the model
   passes iff the Hamming distance to the key's bits is at most the threshold. The p-value
   ``P[Bin(T, 1/2) ≤ errors]`` is the chance that a model unrelated to the key matches at
   least this well.

The MPC verifier of a deployed model reuses 1–4 (:func:`check_certificate`) and
:func:`make_verdict`, and replaces 5 with the same computation on secret shares.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

import torch

from secureinfer.errors import InvalidArgumentError, SecureInferError
from secureinfer.watermark.certificate import Certificate, check_key, check_signature, load_certificate
from secureinfer.watermark.keys import WatermarkKey, load_watermark_key
from secureinfer.watermark.modelio import load_state_dict, weights_digest
from secureinfer.watermark.scheme import (
    DEFAULT_FPR,
    binomial_cdf,
    bit_errors,
    extract_bits,
    p_value,
    project_fixed_point,
    quantize_weights,
    watermark_bits,
)

__all__ = [
    "MAX_BITS",
    "Verdict",
    "check_certificate",
    "count_bit_errors",
    "make_verdict",
    "verify_files",
    "verify_state_dict",
]

MAX_BITS = 1 << 14  # refuse absurd certificates before doing T-sized exact arithmetic


@dataclass(frozen=True)
class Verdict:
    """The outcome of an audit. ``reasons`` is empty iff ``passed``."""

    passed: bool
    reasons: tuple[str, ...]
    bits: int | None = None
    bit_errors: int | None = None
    threshold: int | None = None
    p_value: float | None = None
    false_positive_rate: float | None = None
    weights_identical: bool | None = None
    owner_public_key: str | None = None
    layer: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        d = asdict(self)
        d["reasons"] = list(self.reasons)
        return d


def check_certificate(
    cert: Certificate,
    key: WatermarkKey,
    *,
    registered_at: datetime | None = None,
    max_fpr: float = DEFAULT_FPR,
    expected_owner: bytes | None = None,
) -> list[str]:
    """Checks 1–4 of the module docstring; returns the reasons for failure (empty = fine)."""
    reasons: list[str] = []
    try:
        check_signature(cert)
    except SecureInferError as exc:
        reasons.append(str(exc))
    if expected_owner is not None and cert.owner_public_key != expected_owner.hex():
        reasons.append(
            f"certificate names owner {cert.owner_public_key[:16]}…, not the expected owner {expected_owner.hex()[:16]}…"
        )
    if not 1 <= cert.bits <= MAX_BITS or not 0 <= cert.threshold < cert.bits:
        reasons.append(f"certificate has an invalid bit count {cert.bits} or threshold {cert.threshold}")
    else:
        fpr = float(binomial_cdf(cert.threshold, cert.bits))
        if fpr != cert.false_positive_rate:
            reasons.append(f"certificate states FPR {cert.false_positive_rate:.3g}, but its threshold gives {fpr:.3g}")
        if fpr > max_fpr:
            reasons.append(
                f"certificate threshold {cert.threshold}/{cert.bits} has FPR {fpr:.3g}, above the auditor's limit {max_fpr:.3g}"
            )
    try:
        check_key(cert, key)
    except SecureInferError as exc:
        reasons.append(str(exc))
    if registered_at is not None:
        try:
            created = cert.created_at()
            if not created < registered_at:
                reasons.append(
                    f"late certificate: created {cert.created}, not before the suspect model's "
                    f"registration {registered_at.isoformat()}"
                )
        except SecureInferError as exc:
            reasons.append(str(exc))
    return reasons


def count_bit_errors(
    state: Mapping[str, torch.Tensor], cert: Certificate, key: WatermarkKey, *, frac_bits: int | None = None
) -> int:
    """Hamming distance between the bits extracted from the model and the key's bits.

    Extraction is on ``round(w · 2^f)`` with exact integers, ``f`` = ``frac_bits`` or the
    certificate's; give the precision of a deployment to reproduce an MPC audit of it
    exactly (any ``f ≥`` the certificate's keeps every embedded bit). Raises
    :class:`InvalidArgumentError` when the layer is missing or has the wrong shape.
    """
    if cert.layer not in state:
        raise InvalidArgumentError(f"model has no parameter {cert.layer!r} named in the certificate")
    w = state[cert.layer]
    if tuple(w.shape) != tuple(cert.layer_shape):
        raise InvalidArgumentError(
            f"parameter {cert.layer!r} has shape {tuple(w.shape)}, the certificate says {tuple(cert.layer_shape)}"
        )
    if not w.is_floating_point():
        raise InvalidArgumentError(f"parameter {cert.layer!r} is not a floating-point tensor")
    q = quantize_weights(w, frac_bits=cert.frac_bits if frac_bits is None else frac_bits)
    extracted = extract_bits(project_fixed_point(key.seed, q, bits=cert.bits))
    return bit_errors(extracted, watermark_bits(key.seed, bits=cert.bits))


def make_verdict(
    cert: Certificate,
    *,
    reasons: list[str],
    errors: int | None = None,
    below_threshold: bool | None = None,
    weights_identical: bool | None = None,
) -> Verdict:
    """Combine the checks into a verdict.

    Give ``errors`` (the Hamming distance) when it is known; an MPC audit that reveals only
    the comparison gives ``below_threshold`` instead.
    """
    reasons = list(reasons)
    pval: float | None = None
    sane = 1 <= cert.bits <= MAX_BITS
    if errors is not None:
        below_threshold = errors <= cert.threshold
        pval = p_value(errors, cert.bits) if sane else None
    if below_threshold is None:
        if not reasons:
            reasons.append("the watermark was not measured")
    elif not below_threshold:
        shown = f"{errors} of {cert.bits}" if errors is not None else "the number"
        reasons.append(f"too many bit errors: {shown} bits differ, threshold {cert.threshold}")
    return Verdict(
        passed=not reasons,
        reasons=tuple(reasons),
        bits=cert.bits,
        bit_errors=errors,
        threshold=cert.threshold,
        p_value=pval,
        false_positive_rate=float(binomial_cdf(cert.threshold, cert.bits)) if sane else None,
        weights_identical=weights_identical,
        owner_public_key=cert.owner_public_key,
        layer=cert.layer,
    )


def verify_state_dict(
    state: Mapping[str, torch.Tensor],
    cert: Certificate,
    key: WatermarkKey,
    *,
    registered_at: datetime | None = None,
    max_fpr: float = DEFAULT_FPR,
    expected_owner: bytes | None = None,
) -> Verdict:
    """Full plaintext verification of a model's weights (checks 1–5)."""
    reasons = check_certificate(
        cert, key, registered_at=registered_at, max_fpr=max_fpr, expected_owner=expected_owner
    )
    errors: int | None = None
    if 1 <= cert.bits <= MAX_BITS and 0 < math.prod(cert.layer_shape) < 1 << 34:
        try:
            errors = count_bit_errors(state, cert, key)
        except SecureInferError as exc:
            reasons.append(str(exc))
    identical: bool | None
    try:
        identical = weights_digest(state, frac_bits=cert.frac_bits) == cert.weights_sha256
    except SecureInferError:
        identical = None
    return make_verdict(cert, reasons=reasons, errors=errors, weights_identical=identical)


def verify_files(
    model_path: str | os.PathLike[str],
    cert_path: str | os.PathLike[str],
    key_path: str | os.PathLike[str],
    *,
    registered_at: datetime | None = None,
    max_fpr: float = DEFAULT_FPR,
    expected_owner: bytes | None = None,
) -> Verdict:
    """Verify files; unreadable or malformed inputs give a failing verdict with the reason."""
    try:
        cert = load_certificate(cert_path)
    except SecureInferError as exc:
        return Verdict(passed=False, reasons=(f"certificate rejected: {exc}",))
    try:
        key = load_watermark_key(key_path)
    except SecureInferError as exc:
        return make_verdict(cert, reasons=[f"key file rejected: {exc}"])
    try:
        state = load_state_dict(model_path)
    except SecureInferError as exc:
        return make_verdict(cert, reasons=[f"model rejected: {exc}"])
    return verify_state_dict(
        state, cert, key, registered_at=registered_at, max_fpr=max_fpr, expected_owner=expected_owner
    )
