"""The client's CKKS context: keys stay here; only public material is serialised.

:class:`ClientContext` creates a TenSEAL CKKS context for given
:class:`~secureinfer.he.params.CkksParams` with *symmetric* encryption: the client is the
only party that encrypts, so no public key is needed, and a fresh symmetric SEAL
ciphertext is serialised with a seed in place of its uniformly random half (about half
the bytes on the wire). What leaves the client:

* :meth:`public_context_bytes` — ``Context.serialize(save_secret_key=False,
  save_public_key=False, save_galois_keys=False, save_relin_keys=True)``: parameters and
  relinearisation keys;
* :meth:`galois_key_bytes` — SEAL Galois keys for exactly the rotation steps the layout
  plan needs (two per linear layer), not TenSEAL's default all-powers-of-two set;
* ciphertexts (:meth:`encrypt`).

Randomness: the secret key, the keys derived from it and the encryption noise come from
SEAL's own CSPRNG (Blake2xb seeded from the operating system), inside TenSEAL; nothing
here draws secret randomness itself.

:func:`context_has_secret_key` parses TenSEAL's ``TenSEALContextProto`` wire bytes
(field 3 ``private_context``, sub-field 1 ``secret_key``) without deserialising: the
server refuses any context that carries one, and the tests check the bytes a server
receives with it.

Cost (N = 8192, 6 primes, one core): encode + encrypt ≈ 3-10 ms and serialisation ≈ 5-13
ms per ciphertext; one Galois key ≈ 1.7 MB, relinearisation keys ≈ 1.7 MB.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import numpy as np

from secureinfer.errors import InvalidArgumentError, RangeError
from secureinfer.he._sealio import SealIO
from secureinfer.he.params import CkksParams

__all__ = ["ClientContext", "context_fingerprint", "context_has_secret_key", "params_of_context"]


def context_fingerprint(public_context: bytes) -> str:
    """Identifier of a public context (SHA-256, hex, 32 chars) that ciphertexts are bound to."""
    return hashlib.sha256(public_context).hexdigest()[:32]


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = result = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise InvalidArgumentError("malformed context bytes (bad varint)")
        b = buf[i]
        i += 1
        result |= (b & 0x7F) << shift
        if not b & 0x80:
            return result, i
        shift += 7


def _fields(buf: bytes) -> list[tuple[int, int, Any]]:
    """Top-level fields of a protobuf message: (number, wire type, value or bytes)."""
    out = []
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        num, wt = key >> 3, key & 7
        if wt == 0:
            val, i = _varint(buf, i)
        elif wt == 1:
            val, i = buf[i:i + 8], i + 8
        elif wt == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise InvalidArgumentError("malformed context bytes (truncated field)")
            val, i = buf[i:i + n], i + n
        elif wt == 5:
            val, i = buf[i:i + 4], i + 4
        else:
            raise InvalidArgumentError(f"malformed context bytes (wire type {wt})")
        out.append((num, wt, val))
    return out


def context_has_secret_key(data: bytes) -> bool:
    """True if serialised TenSEAL context bytes carry a non-empty secret key."""
    for num, wt, val in _fields(bytes(data)):
        if num == 3 and wt == 2:  # TenSEALContextProto.private_context
            for sub, swt, sval in _fields(val):
                if sub == 1 and swt == 2 and len(sval) > 0:  # TenSEALPrivateProto.secret_key
                    return True
    return False


def params_of_context(seal_context: Any, scale_bits: int) -> CkksParams:
    """The :class:`CkksParams` of a SEAL context (bit sizes of its primes)."""
    import tenseal.sealapi  # noqa: F401 - registers SEAL's Modulus/EncryptionParameters types with pybind
    parms = seal_context.key_context_data().parms()
    bits = tuple(int(m.bit_count()) for m in parms.coeff_modulus())
    return CkksParams(int(parms.poly_modulus_degree()), bits, int(scale_bits))


class ClientContext:
    """A CKKS key set for one client session; holds the secret key, never exports it."""

    def __init__(self, params: CkksParams) -> None:
        import tenseal as ts
        import tenseal.sealapi as sa

        try:
            ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree,
                             coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes),
                             encryption_type=ts.ENCRYPTION_TYPE.SYMMETRIC)
        except ValueError as exc:
            raise InvalidArgumentError(f"SEAL rejects CKKS parameters {params.describe()}: {exc}") from None
        ctx.global_scale = float(2 ** params.scale_bits)
        if params.depth > 0:
            ctx.generate_relin_keys()
        self.params = params
        self._ctx = ctx
        self._seal = ctx.data.seal_context()
        self._encoder = sa.CKKSEncoder(self._seal)
        self._encryptor = sa.Encryptor(self._seal, ctx.data.secret_key())
        self._decryptor = sa.Decryptor(self._seal, ctx.data.secret_key())
        self._io = SealIO()
        self._public: bytes | None = None

    @property
    def slots(self) -> int:
        return int(self._encoder.slot_count())

    @property
    def seal_context(self) -> Any:
        return self._seal

    def public_context_bytes(self) -> bytes:
        """Parameters + relinearisation keys; no secret key, no public key, no Galois keys."""
        if self._public is None:
            data = self._ctx.serialize(save_public_key=False, save_secret_key=False,
                                       save_galois_keys=False, save_relin_keys=True)
            if context_has_secret_key(data):  # defence in depth: never let it out
                raise InvalidArgumentError("refusing to export a context that holds a secret key")
            self._public = bytes(data)
        return self._public

    def fingerprint(self) -> str:
        return context_fingerprint(self.public_context_bytes())

    def galois_key_bytes(self, steps: Sequence[int]) -> bytes:
        """Seed-compressed SEAL Galois keys for exactly these rotation steps."""
        import tenseal.sealapi as sa

        if not steps:
            return b""
        kg = sa.KeyGenerator(self._seal, self._ctx.data.secret_key())
        elts = self._seal.key_context_data().galois_tool().get_elts_from_steps([int(s) for s in steps])
        return self._io.dump(kg.create_galois_keys(elts))

    def encrypt(self, slot_vectors: Sequence[np.ndarray]) -> list[bytes]:
        """Encrypt each real vector (length <= slots) at scale 2^scale_bits; serialised."""
        import tenseal.sealapi as sa

        out = []
        scale = float(2 ** self.params.scale_bits)
        for v in slot_vectors:
            arr = np.asarray(v, dtype=np.float64)
            if arr.ndim != 1 or arr.size > self.slots:
                raise InvalidArgumentError(f"slot vector of shape {arr.shape}; at most {self.slots} slots")
            if not np.all(np.isfinite(arr)):
                raise RangeError("input contains NaN or infinity")
            pt = sa.Plaintext()
            self._encoder.encode(arr.tolist(), scale, pt)
            out.append(self._io.dump(self._encryptor.encrypt_symmetric(pt)))
        return out

    def decrypt(self, blobs: Sequence[bytes]) -> list[np.ndarray]:
        """Load (with SEAL's validity checks), decrypt and decode each ciphertext."""
        import tenseal.sealapi as sa

        out = []
        for b in blobs:
            ct = self._io.load_ciphertext(self._seal, b)
            pt = sa.Plaintext()
            self._decryptor.decrypt(ct, pt)
            out.append(np.asarray(self._encoder.decode_double(pt), dtype=np.float64))
        return out

    def close(self) -> None:
        self._io.close()

    def __enter__(self) -> ClientContext:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
