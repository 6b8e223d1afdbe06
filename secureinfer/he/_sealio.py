"""Bytes <-> SEAL objects (ciphertexts, Galois keys) for TenSEAL's ``sealapi`` bindings.

TenSEAL's low-level SEAL bindings serialise only to and from file paths, so this module
moves bytes through a private temporary directory (mode 0700, on ``/dev/shm`` where it
exists so nothing touches a disk). Only public material passes through it: ciphertexts
and evaluation keys — never a secret key. The format is SEAL's own serialisation (header,
zstd-compressed body; a fresh symmetric ciphertext carries a seed instead of its random
half), and :meth:`SealIO.load_ciphertext` runs SEAL's validity checks against the
context (parameter id, coefficient ranges), so a ciphertext made under other parameters
is an InvalidArgumentError, never a crash.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
import weakref
from pathlib import Path
from typing import Any

from secureinfer.errors import InvalidArgumentError

__all__ = ["SealIO"]


class SealIO:
    """A private scratch directory for SEAL (de)serialisation; close() removes it."""

    def __init__(self) -> None:
        base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
        self._dir = Path(tempfile.mkdtemp(prefix="secureinfer-he-", dir=base))
        os.chmod(self._dir, 0o700)
        # removed at close(), or when this object is collected / the interpreter exits
        self._finalizer = weakref.finalize(self, shutil.rmtree, str(self._dir), True)

    def _path(self) -> str:
        # uuid4 only names a scratch file (not a secret)
        return str(self._dir / uuid.uuid4().hex)

    def dump(self, obj: Any) -> bytes:
        """Serialise any object with a ``save(path)`` method (Ciphertext, Serializable, keys)."""
        path = self._path()
        try:
            obj.save(path)
            with open(path, "rb") as fh:
                return fh.read()
        finally:
            _unlink(path)

    def _load(self, obj: Any, seal_context: Any, data: bytes, what: str) -> Any:
        if not isinstance(data, (bytes, bytearray, memoryview)) or len(data) == 0:
            raise InvalidArgumentError(f"empty {what}")
        path = self._path()
        try:
            with open(path, "wb") as fh:
                fh.write(data)
            obj.load(seal_context, path)
        except (ValueError, RuntimeError, TypeError) as exc:
            raise InvalidArgumentError(
                f"{what} is not valid for this session's CKKS context (made under another context, "
                f"or corrupted): {exc}"
            ) from None
        finally:
            _unlink(path)
        return obj

    def load_ciphertext(self, seal_context: Any, data: bytes) -> Any:
        import tenseal.sealapi as sa

        return self._load(sa.Ciphertext(), seal_context, data, "ciphertext")

    def load_galois_keys(self, seal_context: Any, data: bytes) -> Any:
        import tenseal.sealapi as sa

        return self._load(sa.GaloisKeys(), seal_context, data, "Galois keys")

    def close(self) -> None:
        self._finalizer()

    def __enter__(self) -> SealIO:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
