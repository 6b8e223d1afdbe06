"""Serialization of a party's bundle as a ``secureinfer.v1.Bundle`` message (no pickle)."""

from __future__ import annotations

import torch

from secureinfer.dealer.material import PartyBundle
from secureinfer.errors import ProtocolError
from secureinfer.transport.codec import tensor_from_proto, tensor_to_proto
from secureinfer.v1 import dealer_pb2

__all__ = ["bundle_from_bytes", "bundle_to_bytes"]

_SEED_KEY = "__seed__"


def bundle_to_bytes(bundle: PartyBundle) -> bytes:
    msg = dealer_pb2.Bundle()
    msg.blobs[_SEED_KEY] = bundle.seed
    for k, v in bundle.blobs.items():
        msg.blobs[k] = v
    for k, t in bundle.tensors.items():
        msg.tensors[k].CopyFrom(tensor_to_proto(t.cpu()))
    return msg.SerializeToString()


def bundle_from_bytes(data: bytes, *, party_id: int) -> PartyBundle:
    msg = dealer_pb2.Bundle()
    try:
        msg.ParseFromString(data)
    except Exception as exc:  # protobuf raises DecodeError
        raise ProtocolError(f"malformed dealer bundle: {exc}") from exc
    blobs = dict(msg.blobs)
    seed = blobs.pop(_SEED_KEY, b"")
    if len(seed) != 32:
        raise ProtocolError("dealer bundle has no valid seed")
    tensors = {k: torch.from_numpy(tensor_from_proto(v, expect_dtype="int64")) for k, v in msg.tensors.items()}
    return PartyBundle(party_id, seed, tensors, blobs)
