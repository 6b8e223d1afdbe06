"""Framed dealer-material layout (secureinfer.dealer.wire): round trip, legacy, hostile input."""

from __future__ import annotations

import os
import struct

import pytest
import torch

from secureinfer.dealer.material import PartyBundle
from secureinfer.dealer.wire import bundle_from_bytes, bundle_to_bytes
from secureinfer.errors import ProtocolError
from secureinfer.transport.codec import tensor_to_proto
from secureinfer.v1 import dealer_pb2


def _bundle() -> PartyBundle:
    g = torch.Generator().manual_seed(1)
    tensors = {
        "t/a": torch.randint(-(2**62), 2**62, (3, 4), generator=g, dtype=torch.int64),
        "t/scalar": torch.tensor(7, dtype=torch.int64),
        "t/empty": torch.zeros(0, 5, dtype=torch.int64),
        "t/ü": torch.arange(10, dtype=torch.int64).reshape(2, 5).t(),  # non-contiguous
    }
    return PartyBundle(1, os.urandom(32), tensors, {"dcf/0": os.urandom(100), "empty": b""})


def test_roundtrip_keeps_every_entry_exactly() -> None:
    b = _bundle()
    data = bundle_to_bytes(b)
    assert data[:4] == b"SIMB"
    back = bundle_from_bytes(data, party_id=1)
    assert back.party_id == 1 and back.seed == b.seed and back.blobs == b.blobs
    assert back.tensors.keys() == b.tensors.keys()
    for k, v in b.tensors.items():
        assert back.tensors[k].shape == v.shape and torch.equal(back.tensors[k], v)
    back.tensors["t/a"] += 1  # parsed tensors are writable, not views of the message
    assert bundle_from_bytes(data, party_id=1).tensors["t/a"].equal(b.tensors["t/a"])


def test_legacy_protobuf_bundle_still_parses() -> None:
    b = _bundle()
    msg = dealer_pb2.Bundle()
    msg.blobs["__seed__"] = b.seed
    for k, v in b.blobs.items():
        msg.blobs[k] = v
    for k, t in b.tensors.items():
        msg.tensors[k].CopyFrom(tensor_to_proto(t.contiguous()))
    back = bundle_from_bytes(msg.SerializeToString(), party_id=0)
    assert back.seed == b.seed and back.blobs == b.blobs
    assert all(torch.equal(back.tensors[k], v) for k, v in b.tensors.items())


def test_every_truncation_is_a_protocol_error() -> None:
    data = bundle_to_bytes(_bundle())
    for n in range(4, len(data)):
        with pytest.raises(ProtocolError):
            bundle_from_bytes(data[:n], party_id=0)


def test_hostile_headers_are_refused_without_allocating() -> None:
    seed = b"s" * 32
    head = b"SIMB" + struct.pack("<BI", 1, 1) + seed
    name = struct.pack("<BH", 1, 1) + b"x"
    cases = {
        "huge dims": head + name + struct.pack("<B2Q", 2, 2**40, 2**40),
        "too many dims": head + name + struct.pack("<B", 200),
        "huge blob": head + struct.pack("<BH", 0, 1) + b"x" + struct.pack("<Q", 2**62),
        "unknown kind": head + struct.pack("<BH", 9, 1) + b"x",
        "bad utf-8 name": head + struct.pack("<BH", 0, 1) + b"\xff" + struct.pack("<Q", 0),
        "bad version": b"SIMB" + struct.pack("<BI", 2, 0) + seed,
        "more entries than data": b"SIMB" + struct.pack("<BI", 1, 5) + seed,
        "trailing bytes": b"SIMB" + struct.pack("<BI", 1, 0) + seed + b"junk",
        "repeated name": b"SIMB" + struct.pack("<BI", 1, 2) + seed
        + (struct.pack("<BH", 0, 1) + b"x" + struct.pack("<Q", 0)) * 2,
        "legacy garbage": b"\x08garbage",
    }
    for label, data in cases.items():
        with pytest.raises(ProtocolError):
            bundle_from_bytes(data, party_id=0)
            pytest.fail(label)


def test_writer_refuses_what_the_reader_would() -> None:
    with pytest.raises(ProtocolError):
        bundle_to_bytes(PartyBundle(0, b"short", {}, {}))
    with pytest.raises(ProtocolError):
        bundle_to_bytes(PartyBundle(0, b"s" * 32, {"f": torch.ones(2)}, {}))


def test_shares_expanded_ahead_equal_those_expanded_on_demand() -> None:
    import torch

    from secureinfer.dealer.material import BundleBuilder

    b = BundleBuilder(2)
    b.random("r", (3, 4))
    b.shared("c", torch.arange(6, dtype=torch.int64).reshape(2, 3))
    p0, p1 = b.party_bundle(0), b.party_bundle(1)
    on_demand = {n: p1.share(n, s) for n, s in (("r", (3, 4)), ("c", (2, 3)))}
    ahead = b.party_bundle(1)
    ahead.expand_ahead([("r", (3, 4)), ("c", (2, 3))])
    assert ahead.memory_bytes == ahead.nbytes + 8 * (12 + (0 if "c" in ahead.tensors else 6))
    for n, s in (("r", (3, 4)), ("c", (2, 3))):
        assert torch.equal(ahead.share(n, s), on_demand[n])
    assert not ahead.expanded  # each expanded share is handed out once
    rec = b.party_bundle(0)
    rec.expansions = []
    rec.share("r", (3, 4))
    rec.share("c", (2, 3))  # party 0 holds c's correction: not an expansion
    assert rec.expansions == [("r", (3, 4))] and torch.equal(rec.share("c", (2, 3)), p0.share("c", (2, 3)))
