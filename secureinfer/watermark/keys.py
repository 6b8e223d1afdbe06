"""Owner signing keys (Ed25519, PEM) and watermark key material (seed + nonce).

* The **owner key** signs certificates. :func:`generate_owner_key` writes the private key
  as unencrypted PKCS#8 PEM with mode 0600 and the public key next to it
  (``<path>.pub``, SubjectPublicKeyInfo PEM). Certificates carry the raw 32-byte public key.
* The **watermark key** (:class:`WatermarkKey`) is the secret that generates the
  projection and the bits: a 32-byte nonce from ``os.urandom`` and the seed
  ``SHA-256(tag ‖ owner_public_key ‖ nonce)`` (:func:`~secureinfer.watermark.scheme.seed_from`).
  It is stored in its own JSON file (mode 0600), kept by the owner and handed to an auditor
  only at verification; the certificate holds only a commitment to it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from secureinfer.errors import AlreadyExistsError, InvalidArgumentError, NotFoundError
from secureinfer.prg import SEED_BYTES, fresh_seed
from secureinfer.watermark.scheme import SCHEME, seed_from

__all__ = [
    "WatermarkKey",
    "generate_owner_key",
    "load_owner_private_key",
    "load_owner_public_key",
    "load_watermark_key",
    "public_key_bytes",
    "save_watermark_key",
    "write_private_file",
]


def write_private_file(path: str | os.PathLike[str], data: bytes, *, overwrite: bool = False) -> None:
    """Write ``data`` to a new file created with mode 0600 (never world-readable)."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_TRUNC if overwrite else os.O_EXCL)
    try:
        fd = os.open(os.fspath(path), flags, 0o600)
    except FileExistsError:
        raise AlreadyExistsError(f"{path} exists; refusing to overwrite a key file") from None
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.chmod(path, 0o600)  # O_CREAT's mode is filtered by the umask; an existing file keeps its own


def public_key_bytes(key: Ed25519PublicKey | Ed25519PrivateKey) -> bytes:
    """The raw 32-byte Ed25519 public key."""
    pub = key.public_key() if isinstance(key, Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def generate_owner_key(path: str | os.PathLike[str], *, overwrite: bool = False) -> Ed25519PrivateKey:
    """Create an Ed25519 owner key: private PEM at ``path`` (0600), public PEM at ``path.pub``."""
    key = Ed25519PrivateKey.generate()
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_private_file(path, pem, overwrite=overwrite)
    pub_pem = key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    Path(os.fspath(path) + ".pub").write_bytes(pub_pem)
    return key


def _read(path: str | os.PathLike[str], what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise NotFoundError(f"{what} {path} not found") from None
    except OSError as exc:
        raise InvalidArgumentError(f"cannot read {what} {path}: {exc.strerror}") from None


def load_owner_private_key(path: str | os.PathLike[str]) -> Ed25519PrivateKey:
    """Load an unencrypted Ed25519 private key from PEM."""
    data = _read(path, "owner key")
    try:
        key = serialization.load_pem_private_key(data, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidArgumentError(f"{path} is not an unencrypted PEM private key: {exc}") from None
    if not isinstance(key, Ed25519PrivateKey):
        raise InvalidArgumentError(f"{path} is not an Ed25519 key")
    return key


def load_owner_public_key(path: str | os.PathLike[str]) -> Ed25519PublicKey:
    """Load an Ed25519 public key from a public or private PEM file."""
    data = _read(path, "owner key")
    if b"PRIVATE KEY" in data:
        return load_owner_private_key(path).public_key()
    try:
        key = serialization.load_pem_public_key(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise InvalidArgumentError(f"{path} is not a PEM public key: {exc}") from None
    if not isinstance(key, Ed25519PublicKey):
        raise InvalidArgumentError(f"{path} is not an Ed25519 key")
    return key


@dataclass(frozen=True, repr=False)
class WatermarkKey:
    """Secret watermark key material: ``seed = SHA-256(tag ‖ owner_pk ‖ nonce)``.

    ``repr`` hides the secret so that logging a key by accident leaks nothing.
    """

    seed: bytes
    nonce: bytes

    @classmethod
    def generate(cls, owner_public_key: bytes) -> "WatermarkKey":
        """A fresh key for the owner whose raw public key is given (nonce from os.urandom)."""
        nonce = fresh_seed()
        return cls(seed=seed_from(owner_public_key, nonce), nonce=nonce)

    def belongs_to(self, owner_public_key: bytes) -> bool:
        """True iff ``seed`` was derived from this owner's public key and the nonce."""
        return seed_from(owner_public_key, self.nonce) == self.seed

    def __repr__(self) -> str:
        return "WatermarkKey(<secret>)"

    def to_json(self) -> str:
        """The key file's contents."""
        return json.dumps(
            {"scheme": SCHEME, "seed": self.seed.hex(), "nonce": self.nonce.hex()}, indent=2, sort_keys=True
        )

    @classmethod
    def from_json(cls, text: str | bytes) -> "WatermarkKey":
        """Parse a key file; :class:`InvalidArgumentError` if it is malformed."""
        try:
            obj = json.loads(text)
            seed, nonce = bytes.fromhex(obj["seed"]), bytes.fromhex(obj["nonce"])
            scheme = obj.get("scheme", SCHEME)
        except (ValueError, KeyError, TypeError, AttributeError):
            raise InvalidArgumentError("watermark key file is not valid JSON with hex 'seed' and 'nonce'") from None
        if scheme != SCHEME:
            raise InvalidArgumentError(f"watermark key is for scheme {scheme!r}, expected {SCHEME!r}")
        if len(seed) != SEED_BYTES or len(nonce) != SEED_BYTES:
            raise InvalidArgumentError(f"watermark seed and nonce must be {SEED_BYTES} bytes each")
        return cls(seed=seed, nonce=nonce)


def save_watermark_key(key: WatermarkKey, path: str | os.PathLike[str], *, overwrite: bool = False) -> None:
    """Write the key file with mode 0600."""
    write_private_file(path, (key.to_json() + "\n").encode(), overwrite=overwrite)


def load_watermark_key(path: str | os.PathLike[str]) -> WatermarkKey:
    """Read a key file written by :func:`save_watermark_key`."""
    return WatermarkKey.from_json(_read(path, "watermark key"))
