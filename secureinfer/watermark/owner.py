"""Owner workflow: embed a fresh watermark into a model and issue its signed certificate.

Steps: derive a new key from the owner's public key (:meth:`WatermarkKey.generate`, nonce
from ``os.urandom``), embed it (:func:`~secureinfer.watermark.embed.embed_watermark`),
hash the fixed-point weights, and sign the certificate
(:func:`~secureinfer.watermark.certificate.issue_certificate`). The caller stores the
model, publishes or registers the certificate, and keeps the key file secret.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from secureinfer.watermark.certificate import Certificate, issue_certificate
from secureinfer.watermark.embed import EmbedResult, embed_watermark
from secureinfer.watermark.keys import WatermarkKey, public_key_bytes
from secureinfer.watermark.modelio import weights_digest
from secureinfer.watermark.scheme import DEFAULT_BITS, DEFAULT_FPR, DEFAULT_FRAC_BITS, threshold_for_fpr

__all__ = ["Watermarked", "watermark_model"]


@dataclass(frozen=True)
class Watermarked:
    """Result of :func:`watermark_model`: the certificate, the secret key, embedding stats."""

    certificate: Certificate
    key: WatermarkKey
    embedding: EmbedResult


def watermark_model(
    model: nn.Module,
    *,
    owner_key: Ed25519PrivateKey,
    x: torch.Tensor,
    y: torch.Tensor,
    layer: str,
    bits: int = DEFAULT_BITS,
    frac_bits: int = DEFAULT_FRAC_BITS,
    target_fpr: float = DEFAULT_FPR,
    key: WatermarkKey | None = None,
    created: datetime | None = None,
    shuffle_seed: int = 0,
) -> Watermarked:
    """Embed a watermark into ``model`` (in place) and sign its certificate.

    ``key`` defaults to a fresh one; pass one only to reproduce a run in tests.
    """
    threshold_for_fpr(bits, target_fpr)  # fail before training if T cannot reach the FPR
    key = key or WatermarkKey.generate(public_key_bytes(owner_key))
    result = embed_watermark(
        model, key.seed, x=x, y=y, layer=layer, bits=bits, frac_bits=frac_bits, shuffle_seed=shuffle_seed
    )
    cert = issue_certificate(
        owner_key=owner_key,
        key=key,
        layer=layer,
        layer_shape=result.layer_shape,
        bits=bits,
        frac_bits=frac_bits,
        target_fpr=target_fpr,
        weights_sha256=weights_digest(model.state_dict(), frac_bits=frac_bits),
        created=created,
    )
    return Watermarked(certificate=cert, key=key, embedding=result)
