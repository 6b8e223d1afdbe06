"""Serialization of one party's dealer material (:class:`PartyBundle`) — no pickle.

Layout (version 1, all integers little-endian)::

    b"SIMB" | u8 version=1 | u32 n_entries | 32-byte seed
    entry := u8 kind | u16 name_len | name (UTF-8) | body
    kind 0 (blob):   u64 len | bytes
    kind 1 (tensor): u8 ndim | ndim x u64 dims | int64 data (prod(dims) x 8 bytes)

Why not the ``secureinfer.v1.Bundle`` protobuf used before: a LeNet batch-32 set is
~330 MB per party, and upb's ``SerializeToString`` of a ``map<string, bytes>`` plus the
copy into the map took 2.9 s per part, more than generating the material. The framed
layout is written with one ``b"".join`` over memoryviews (one copy of the payload) and
parsed with bounds checks on every length, so a malformed or truncated message gets a
:class:`ProtocolError`, never an over-read or a huge allocation. Data that starts with
anything but the magic is parsed as the legacy protobuf ``Bundle`` (model files written
by earlier versions stay readable).

Cost: serialize O(payload) with one copy; parse O(payload) with one copy per tensor
(so the tensors are writable and do not pin the message).
"""

from __future__ import annotations

import struct

import numpy as np
import torch

from secureinfer.dealer.material import PartyBundle
from secureinfer.errors import ProtocolError
from secureinfer.transport.codec import tensor_from_proto
from secureinfer.v1 import dealer_pb2

__all__ = ["bundle_from_bytes", "bundle_to_bytes"]

_MAGIC = b"SIMB"
_VERSION = 1
_SEED_LEN = 32
_KIND_BLOB = 0
_KIND_TENSOR = 1
_MAX_NDIM = 16
_HEAD = struct.Struct("<4sBI")
_ENTRY = struct.Struct("<BH")
_U64 = struct.Struct("<Q")
_LEGACY_SEED_KEY = "__seed__"


def bundle_to_bytes(bundle: PartyBundle) -> bytes:
    """Frame ``bundle`` (seed, blobs, int64 tensors) as described in the module doc."""
    if len(bundle.seed) != _SEED_LEN:
        raise ProtocolError(f"bundle seed must be {_SEED_LEN} bytes, got {len(bundle.seed)}")
    parts: list[bytes | memoryview] = [
        _HEAD.pack(_MAGIC, _VERSION, len(bundle.blobs) + len(bundle.tensors)),
        bytes(bundle.seed),
    ]
    for name, blob in bundle.blobs.items():
        parts += [_name(_KIND_BLOB, name), _U64.pack(len(blob)), blob]
    for name, t in bundle.tensors.items():
        if t.dtype != torch.int64:
            raise ProtocolError(f"bundle tensor {name!r} must be int64, got {t.dtype}")
        arr = t.detach().cpu().contiguous().numpy().astype("<i8", copy=False)  # keeps 0-d shapes
        if arr.ndim > _MAX_NDIM:
            raise ProtocolError(f"bundle tensor {name!r} has {arr.ndim} dims (at most {_MAX_NDIM})")
        dims = struct.pack(f"<B{arr.ndim}Q", arr.ndim, *arr.shape)
        parts += [_name(_KIND_TENSOR, name), dims, memoryview(arr.reshape(-1).view(np.uint8))]
    return b"".join(parts)


def bundle_from_bytes(data: bytes, *, party_id: int) -> PartyBundle:
    """Parse what :func:`bundle_to_bytes` wrote (or a legacy protobuf ``Bundle``)."""
    if data[:4] != _MAGIC:
        return _legacy_from_bytes(data, party_id=party_id)
    r = _Reader(memoryview(data))
    _, version, n_entries = _HEAD.unpack(r.take(_HEAD.size))
    if version != _VERSION:
        raise ProtocolError(f"dealer bundle version {version} is not supported (this build reads {_VERSION})")
    seed = bytes(r.take(_SEED_LEN))
    tensors: dict[str, torch.Tensor] = {}
    blobs: dict[str, bytes] = {}
    for _ in range(n_entries):
        kind, name_len = _ENTRY.unpack(r.take(_ENTRY.size))
        try:
            name = str(r.take(name_len), "utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("dealer bundle entry name is not UTF-8") from None
        if name in tensors or name in blobs:
            raise ProtocolError(f"dealer bundle repeats entry {name!r}")
        if kind == _KIND_BLOB:
            blobs[name] = bytes(r.take(r.u64()))
        elif kind == _KIND_TENSOR:
            (ndim,) = r.take(1)
            if ndim > _MAX_NDIM:
                raise ProtocolError(f"dealer bundle tensor {name!r} has {ndim} dims (at most {_MAX_NDIM})")
            shape = struct.unpack(f"<{ndim}Q", r.take(8 * ndim))
            count = 1
            for d in shape:
                count *= d
            raw = r.take(8 * count)  # bounds-checked before anything is allocated
            arr = np.frombuffer(raw, dtype="<i8").astype(np.int64, copy=True).reshape(shape)
            tensors[name] = torch.from_numpy(arr)
        else:
            raise ProtocolError(f"dealer bundle entry {name!r} has unknown kind {kind}")
    if r.remaining:
        raise ProtocolError(f"dealer bundle has {r.remaining} trailing bytes")
    return PartyBundle(party_id, seed, tensors, blobs)


def _name(kind: int, name: str) -> bytes:
    raw = name.encode("utf-8")
    if len(raw) > 0xFFFF:
        raise ProtocolError(f"bundle entry name longer than 65535 bytes: {name[:40]!r}...")
    return _ENTRY.pack(kind, len(raw)) + raw


class _Reader:
    """Cursor over a memoryview; every read checks the remaining length first."""

    def __init__(self, view: memoryview) -> None:
        self._view = view
        self._pos = 0

    @property
    def remaining(self) -> int:
        return len(self._view) - self._pos

    def take(self, n: int) -> memoryview:
        if n > self.remaining:
            raise ProtocolError(f"truncated dealer bundle: need {n} bytes at offset {self._pos}, {self.remaining} left")
        out = self._view[self._pos : self._pos + n]
        self._pos += n
        return out

    def u64(self) -> int:
        (v,) = _U64.unpack(self.take(_U64.size))
        return int(v)


def _legacy_from_bytes(data: bytes, *, party_id: int) -> PartyBundle:
    msg = dealer_pb2.Bundle()
    try:
        msg.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError
        raise ProtocolError(f"malformed dealer bundle: {exc}") from exc
    blobs = dict(msg.blobs)
    seed = blobs.pop(_LEGACY_SEED_KEY, b"")
    if len(seed) != _SEED_LEN:
        raise ProtocolError("dealer bundle has no valid seed")
    tensors = {k: torch.from_numpy(tensor_from_proto(v, expect_dtype="int64")) for k, v in msg.tensors.items()}
    return PartyBundle(party_id, seed, tensors, blobs)
