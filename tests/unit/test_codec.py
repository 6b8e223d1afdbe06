"""Tensor codec: round trips, validation of untrusted messages, ring payloads, chunks."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from secureinfer.errors import InvalidArgumentError, ProtocolError, ShapeError
from secureinfer.prg import Prg
from secureinfer.sharing import expand_share, reconstruct, share_seeded
from secureinfer.transport.codec import (
    Reassembler,
    pack_ring,
    seeded_share_to_proto,
    share_from_proto,
    split_chunks,
    tensor_from_proto,
    tensor_to_proto,
    unpack_ring,
)
from secureinfer.v1 import common_pb2

DTYPES = ["float32", "float64", "int64", "uint64", "uint8", "int32"]


@pytest.mark.parametrize("dtype", DTYPES)
def test_numpy_round_trip(dtype: str) -> None:
    # test data, not secret: a deterministic ramp
    a = (np.arange(24) * 7 - 40).astype(dtype).reshape(2, 3, 4)
    msg = tensor_to_proto(a)
    assert list(msg.shape) == [2, 3, 4]
    assert len(msg.data) == a.nbytes
    back = tensor_from_proto(common_pb2.Tensor.FromString(msg.SerializeToString()))
    assert back.dtype == a.dtype and back.shape == a.shape
    np.testing.assert_array_equal(back, a)
    assert back.flags.writeable


def test_bytes_are_little_endian_row_major() -> None:
    a = np.array([[1, 2], [3, 258]], dtype=">i4")  # big-endian input, transposed view
    msg = tensor_to_proto(a.T)
    assert msg.dtype == common_pb2.DTYPE_INT32
    assert msg.data == np.array([[1, 3], [2, 258]], dtype="<i4").tobytes()
    assert msg.data[12:16] == b"\x02\x01\x00\x00"


def test_torch_share_round_trip() -> None:
    t = Prg(b"\x07" * 32).ring((3, 5))
    msg = tensor_to_proto(t, encoding=common_pb2.ENCODING_ADDITIVE_SHARE, frac_bits=16)
    assert msg.encoding == common_pb2.ENCODING_ADDITIVE_SHARE and msg.frac_bits == 16
    back = share_from_proto(msg, expect_frac_bits=16)
    assert back.dtype == torch.int64 and torch.equal(back, t)
    u = tensor_to_proto(t.numpy().view(np.uint64), encoding=common_pb2.ENCODING_ADDITIVE_SHARE)
    assert torch.equal(share_from_proto(u), t)
    with pytest.raises(InvalidArgumentError, match="fractional bits"):
        share_from_proto(msg, expect_frac_bits=20)
    with pytest.raises(InvalidArgumentError, match="ENCODING_ADDITIVE_SHARE"):
        share_from_proto(tensor_to_proto(t))


def test_seeded_share_round_trip_and_limits() -> None:
    x = Prg(b"\x03" * 32).ring((4, 7))
    first, seeds = share_seeded(x, 3, prg=Prg(b"\x09" * 32))
    assert len(seeds) == 2 and all(len(s) == 32 for s in seeds) and seeds[0] != seeds[1]
    msgs = [seeded_share_to_proto(s, x.shape, frac_bits=16) for s in seeds]
    assert all(m.encoding == common_pb2.ENCODING_SEEDED_SHARE and len(m.SerializeToString()) < 64 for m in msgs)
    parts = [first, *(share_from_proto(m, expect_frac_bits=16) for m in msgs)]
    assert torch.equal(parts[1], expand_share(seeds[0], (4, 7)))
    assert torch.equal(reconstruct(parts), x)
    assert not torch.equal(parts[1], parts[2])  # independent seeds, independent shares
    bad = common_pb2.Tensor()
    bad.CopyFrom(msgs[0])
    bad.data = bytes(31)
    with pytest.raises(ShapeError, match="32-byte seed"):
        share_from_proto(bad)
    bad.data, bad.shape[:] = bytes(32), [1 << 20, 1 << 20]
    with pytest.raises(ShapeError, match="elements allowed"):  # never expanded
        share_from_proto(bad)
    with pytest.raises(InvalidArgumentError, match="32 bytes"):
        seeded_share_to_proto(b"short", (2,), frac_bits=16)


def test_encode_rejects_unsupported() -> None:
    with pytest.raises(InvalidArgumentError, match="cannot go on the wire"):
        tensor_to_proto(np.zeros(3, dtype=bool))
    with pytest.raises(InvalidArgumentError, match="cannot go on the wire"):
        tensor_to_proto(torch.zeros(3, dtype=torch.bfloat16))
    with pytest.raises(InvalidArgumentError, match="int64 or uint64"):
        tensor_to_proto(np.zeros(3, dtype=np.float32), encoding=common_pb2.ENCODING_ADDITIVE_SHARE)
    with pytest.raises(InvalidArgumentError, match="frac_bits"):
        tensor_to_proto(np.zeros(3, dtype=np.int64), frac_bits=63)
    with pytest.raises(InvalidArgumentError, match="encoding"):
        tensor_to_proto(np.zeros(3, dtype=np.int64), encoding=99)


def _msg(dtype: int, shape: list[int], data: bytes) -> common_pb2.Tensor:
    return common_pb2.Tensor(dtype=dtype, shape=shape, data=data, encoding=common_pb2.ENCODING_PLAIN)


@pytest.mark.parametrize(
    ("msg", "err", "text"),
    [
        (_msg(0, [1], b"\0" * 8), InvalidArgumentError, "unknown or unspecified"),
        (_msg(42, [1], b"\0" * 8), InvalidArgumentError, "unknown or unspecified"),
        (_msg(common_pb2.DTYPE_INT64, [-1, 2], b""), ShapeError, "negative"),
        (_msg(common_pb2.DTYPE_INT64, [2, 2], b"\0" * 31), ShapeError, "needs 32 bytes, got 31"),
        (_msg(common_pb2.DTYPE_INT64, [2, 2], b"\0" * 40), ShapeError, "needs 32 bytes, got 40"),
        (_msg(common_pb2.DTYPE_UINT8, [1 << 40, 1 << 40, 0], b""), ShapeError, "elements allowed"),
        (_msg(common_pb2.DTYPE_UINT8, [1] * 33, b"\0"), ShapeError, "rank"),
    ],
)
def test_decode_rejects_malformed(msg: common_pb2.Tensor, err: type[Exception], text: str) -> None:
    with pytest.raises(err, match=text):
        tensor_from_proto(msg)


def test_decode_limits_and_expectations() -> None:
    msg = tensor_to_proto(np.zeros((4, 4), dtype=np.float32))
    with pytest.raises(ShapeError, match="elements allowed"):
        tensor_from_proto(msg, max_elements=15)
    assert tensor_from_proto(msg, max_elements=16).shape == (4, 4)
    with pytest.raises(ShapeError, match="expected dtype DTYPE_FLOAT64"):
        tensor_from_proto(msg, expect_dtype=np.float64)
    with pytest.raises(ShapeError, match="expected dtype DTYPE_INT64"):
        tensor_from_proto(msg, expect_dtype=common_pb2.DTYPE_INT64)
    assert tensor_from_proto(msg, expect_dtype="float32").dtype == np.float32
    bad = common_pb2.Tensor()
    bad.CopyFrom(msg)
    bad.encoding = 17  # type: ignore[assignment]  # open enum: unknown values parse
    with pytest.raises(InvalidArgumentError, match="unknown tensor encoding"):
        tensor_from_proto(bad)
    empty = tensor_from_proto(tensor_to_proto(np.zeros((0, 3), dtype=np.int64)))
    assert empty.shape == (0, 3)
    scalar = tensor_from_proto(tensor_to_proto(np.array(2.5)))
    assert scalar.shape == () and scalar == 2.5


def test_pack_unpack_ring() -> None:
    prg = Prg(b"\x01" * 32)
    ts = [prg.ring((2, 3)), prg.ring(()), prg.ring((0, 4)), prg.ring((5,)).t()]
    data = pack_ring(ts)
    assert len(data) == 8 * (6 + 1 + 0 + 5)
    back = unpack_ring(data, [tuple(t.shape) for t in ts])
    assert all(torch.equal(a, b) for a, b in zip(ts, back, strict=True))
    assert all(b.dtype == torch.int64 for b in back)
    assert pack_ring([torch.tensor([1], dtype=torch.int64)]) == b"\x01" + b"\0" * 7
    back[0].add_(1)  # results are writable and independent of the input
    assert not torch.equal(back[0], ts[0])
    with pytest.raises(ProtocolError, match="expected 96"):
        unpack_ring(data[:-1], [tuple(t.shape) for t in ts])
    with pytest.raises(ProtocolError, match="expected 8"):
        unpack_ring(data, [(1,)])
    with pytest.raises(TypeError):
        pack_ring([torch.zeros(2, dtype=torch.float64)])


def test_split_chunks() -> None:
    data = bytes(range(256)) * 40  # 10240 bytes
    parts = split_chunks(data, 4096)
    assert [len(p) for p in parts] == [4096, 4096, 2048]
    assert b"".join(parts) == data
    assert split_chunks(b"", 10) == [b""]
    assert split_chunks(b"abc", 3) == [b"abc"]
    with pytest.raises(InvalidArgumentError):
        split_chunks(b"abc", 0)


def test_reassembler_out_of_order_and_interleaved() -> None:
    r = Reassembler()
    a = [b"a0", b"a1", b"a2"]
    b = [b"b0", b"b1"]
    assert r.add("A", 2, 3, a[2]) is None
    assert r.add("B", 1, 2, b[1]) is None
    assert r.add("A", 0, 3, a[0]) is None
    assert r.pending_bytes == 6
    assert r.add("B", 0, 2, b[0]) == b"b0b1"
    assert r.add("A", 1, 3, a[1]) == b"a0a1a2"
    assert r.pending_bytes == 0
    assert r.add("C", 0, 1, b"whole") == b"whole"


def test_reassembler_rejects_inconsistent() -> None:
    r = Reassembler(max_bytes=10, max_chunks=4)
    r.add("k", 0, 3, b"x")
    with pytest.raises(ProtocolError, match="count changed"):
        r.add("k", 1, 2, b"x")
    with pytest.raises(ProtocolError, match="duplicate"):
        r.add("k", 0, 3, b"x")
    with pytest.raises(ProtocolError, match="index 3"):
        r.add("k", 3, 3, b"x")
    with pytest.raises(ProtocolError, match="count 5"):
        r.add("j", 0, 5, b"x")
    with pytest.raises(ProtocolError, match="count 0"):
        r.add("j", 0, 0, b"")
    with pytest.raises(ProtocolError, match="buffer full"):
        r.add("j", 0, 2, b"0123456789")
    with pytest.raises(ProtocolError, match="pending"):
        r.add("k", 0, 1, b"x")
    assert r.discard(lambda key: key == "k") == 1
    assert r.pending_bytes == 0
    assert r.add("j", 0, 2, b"0123456789") is None


def test_reassembler_expires_old_partials() -> None:
    r = Reassembler(max_age_s=0.0)
    r.add("old", 0, 2, b"abc")
    r.add("new", 0, 2, b"de")  # expires "old" (age > 0) before buffering
    assert r.pending_bytes <= 2
