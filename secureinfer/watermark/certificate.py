"""Signed watermark certificates: what the owner registers, and what an auditor checks.

A certificate is a JSON object (fields of :class:`Certificate`) signed with the owner's
Ed25519 key (RFC 8032). The signature covers the *canonical* JSON of every field except
``signature``: keys sorted, no whitespace, ASCII only, no NaN (:func:`canonical_json`), so
re-serialising a parsed certificate reproduces the signed bytes exactly.

The certificate does not contain the watermark key. It commits to it:

    commitment = SHA-256(tag ‖ seed ‖ len(params) ‖ params ‖ nonce)

with ``params`` the canonical JSON of ``{scheme, layer, layer_shape, bits, frac_bits}``
(``seed`` and ``nonce`` are 32 bytes each, ``len`` a 4-byte little-endian integer, ``tag``
a fixed domain-separation string). The commitment hides the key (the 32-byte nonce is
secret until verification) and binds it: a key file that opens the commitment is the one
the owner registered, for exactly these parameters. Because the seed is
``SHA-256(tag ‖ owner_public_key ‖ nonce)``, the key is also bound to the signer.

``created`` is the owner's own UTC timestamp. It is only as trustworthy as the place the
certificate was registered (a transparency log, a notary, a timestamping authority):
checking that it predates a suspect model's registration is meaningful against a
registry, not against a certificate produced after the fact by the same owner.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import asdict, dataclass, fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from secureinfer.errors import IntegrityError, InvalidArgumentError, NotFoundError
from secureinfer.watermark.keys import WatermarkKey, public_key_bytes
from secureinfer.watermark.scheme import SCHEME, binomial_cdf, threshold_for_fpr

__all__ = [
    "CERT_VERSION",
    "Certificate",
    "canonical_json",
    "check_key",
    "check_signature",
    "commitment",
    "format_time",
    "issue_certificate",
    "load_certificate",
    "parse_time",
    "save_certificate",
]

CERT_VERSION = 1
_COMMIT_TAG = b"secureinfer/watermark/v1/commit\x00"


def canonical_json(obj: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace, ASCII, NaN refused."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def format_time(t: datetime) -> str:
    """UTC timestamp as ``YYYY-MM-DDTHH:MM:SSZ``."""
    if t.tzinfo is None:
        raise InvalidArgumentError("timestamps must carry a time zone")
    return t.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(text: str) -> datetime:
    """Parse an ISO 8601 timestamp; one without a time zone is taken as UTC."""
    try:
        t = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except (ValueError, AttributeError):
        raise InvalidArgumentError(f"not an ISO 8601 timestamp: {text!r}") from None
    return t if t.tzinfo is not None else t.replace(tzinfo=timezone.utc)


def commitment(seed: bytes, params: dict[str, Any], nonce: bytes) -> str:
    """Hex ``SHA-256(tag ‖ seed ‖ len(params) ‖ params ‖ nonce)`` (see module docstring)."""
    if len(seed) != 32 or len(nonce) != 32:
        raise InvalidArgumentError("seed and nonce must be 32 bytes each")
    p = canonical_json(params)
    return hashlib.sha256(_COMMIT_TAG + seed + struct.pack("<I", len(p)) + p + nonce).hexdigest()


@dataclass(frozen=True)
class Certificate:
    """A watermark certificate. ``signature`` is hex Ed25519 over :meth:`signed_bytes`."""

    version: int
    scheme: str
    layer: str
    layer_shape: tuple[int, ...]
    bits: int
    frac_bits: int
    threshold: int
    target_fpr: float
    false_positive_rate: float
    commitment: str
    weights_sha256: str
    owner_public_key: str
    created: str
    signature: str = ""

    def params(self) -> dict[str, Any]:
        """The parameters the commitment binds."""
        return {
            "scheme": self.scheme,
            "layer": self.layer,
            "layer_shape": list(self.layer_shape),
            "bits": self.bits,
            "frac_bits": self.frac_bits,
        }

    def body(self) -> dict[str, Any]:
        """Every field except the signature, as JSON-ready values."""
        d = asdict(self)
        del d["signature"]
        d["layer_shape"] = list(self.layer_shape)
        return d

    def signed_bytes(self) -> bytes:
        """The bytes the owner signs: canonical JSON of :meth:`body`."""
        return canonical_json(self.body())

    def dim(self) -> int:
        """Number of weights in the watermarked layer."""
        return math.prod(self.layer_shape)

    def owner_key_bytes(self) -> bytes:
        """The raw owner public key (``IntegrityError`` if the field is not 32 hex bytes)."""
        try:
            raw = bytes.fromhex(self.owner_public_key)
        except ValueError:
            raise IntegrityError("certificate owner_public_key is not hex") from None
        if len(raw) != 32:
            raise IntegrityError("certificate owner_public_key is not a 32-byte Ed25519 key")
        return raw

    def created_at(self) -> datetime:
        """``created`` as an aware datetime."""
        try:
            return parse_time(self.created)
        except InvalidArgumentError:
            raise IntegrityError(f"certificate timestamp {self.created!r} is malformed") from None

    def to_json(self) -> str:
        """Readable JSON (any key order parses back to the same signed bytes)."""
        return json.dumps({**self.body(), "signature": self.signature}, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> "Certificate":
        """Parse and type-check; :class:`IntegrityError` says what is wrong."""
        try:
            obj = json.loads(text)
        except (ValueError, UnicodeDecodeError) as exc:
            raise IntegrityError(f"certificate is not valid JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise IntegrityError("certificate is not a JSON object")
        names = {f.name for f in fields(cls)}
        missing, extra = sorted(names - obj.keys()), sorted(obj.keys() - names)
        if missing or extra:
            raise IntegrityError(f"certificate fields wrong: missing {missing}, unexpected {extra}")
        ints = ("version", "bits", "frac_bits", "threshold")
        strs = ("scheme", "layer", "commitment", "weights_sha256", "owner_public_key", "created", "signature")
        for n in ints:
            if type(obj[n]) is not int:
                raise IntegrityError(f"certificate field {n!r} must be an integer")
        for n in strs:
            if not isinstance(obj[n], str):
                raise IntegrityError(f"certificate field {n!r} must be a string")
        for n in ("target_fpr", "false_positive_rate"):
            if type(obj[n]) not in (int, float):
                raise IntegrityError(f"certificate field {n!r} must be a number")
        shape = obj["layer_shape"]
        if not isinstance(shape, list) or not all(type(s) is int and s > 0 for s in shape):
            raise IntegrityError("certificate field 'layer_shape' must be a list of positive integers")
        obj["layer_shape"] = tuple(shape)
        if obj["version"] != CERT_VERSION:
            raise IntegrityError(f"certificate version {obj['version']} is not supported (expected {CERT_VERSION})")
        if obj["scheme"] != SCHEME:
            raise IntegrityError(f"certificate scheme {obj['scheme']!r} is not {SCHEME!r}")
        return cls(**obj)


def issue_certificate(
    *,
    owner_key: Ed25519PrivateKey,
    key: WatermarkKey,
    layer: str,
    layer_shape: tuple[int, ...],
    bits: int,
    frac_bits: int,
    target_fpr: float,
    weights_sha256: str,
    created: datetime | None = None,
) -> Certificate:
    """Build and sign the certificate for a watermark embedded with ``key``."""
    pub = public_key_bytes(owner_key)
    if not key.belongs_to(pub):
        raise InvalidArgumentError("watermark key was not derived from this owner's public key")
    threshold = threshold_for_fpr(bits, target_fpr)
    unsigned = Certificate(
        version=CERT_VERSION,
        scheme=SCHEME,
        layer=layer,
        layer_shape=tuple(int(s) for s in layer_shape),
        bits=bits,
        frac_bits=frac_bits,
        threshold=threshold,
        target_fpr=float(target_fpr),
        false_positive_rate=float(binomial_cdf(threshold, bits)),
        commitment="",
        weights_sha256=weights_sha256,
        owner_public_key=pub.hex(),
        created=format_time(created or datetime.now(timezone.utc)),
    )
    cert = _replace(unsigned, commitment=commitment(key.seed, unsigned.params(), key.nonce))
    return _replace(cert, signature=owner_key.sign(cert.signed_bytes()).hex())


def _replace(cert: Certificate, **changes: Any) -> Certificate:
    return Certificate(**{**{f.name: getattr(cert, f.name) for f in fields(cert)}, **changes})


def check_signature(cert: Certificate) -> None:
    """Verify the Ed25519 signature against the public key the certificate names."""
    try:
        pub = Ed25519PublicKey.from_public_bytes(cert.owner_key_bytes())
        pub.verify(bytes.fromhex(cert.signature), cert.signed_bytes())
    except (InvalidSignature, ValueError):
        raise IntegrityError(
            "certificate signature is invalid: a field was altered after signing, or it was not "
            "signed by the owner key it names"
        ) from None


def check_key(cert: Certificate, key: WatermarkKey) -> None:
    """Check that ``key`` belongs to the certificate's owner and opens its commitment."""
    if not key.belongs_to(cert.owner_key_bytes()):
        raise IntegrityError("watermark key does not belong to the certificate's owner (seed ≠ H(owner ‖ nonce))")
    if commitment(key.seed, cert.params(), key.nonce) != cert.commitment:
        raise IntegrityError("watermark key does not match the certificate's commitment")


def save_certificate(cert: Certificate, path: str | os.PathLike[str]) -> None:
    """Write the certificate as JSON."""
    Path(path).write_text(cert.to_json() + "\n")


def load_certificate(path: str | os.PathLike[str]) -> Certificate:
    """Read a certificate file (parsed and type-checked, signature *not* yet verified)."""
    try:
        text = Path(path).read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"certificate {path} not found") from None
    return Certificate.from_json(text)
