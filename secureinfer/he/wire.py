"""Chunking of serialised ciphertexts into ``CiphertextChunk`` messages, both directions.

A ciphertext larger than ``cluster.chunk_bytes`` travels as consecutive chunks with the
same index; the receiver checks order, announced lengths and count, so a malformed or
truncated stream is an error, never a partial result.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from secureinfer.errors import InvalidArgumentError, ProtocolError
from secureinfer.v1 import common_pb2, he_pb2

__all__ = ["chunk_blobs", "collect_blobs"]


def chunk_blobs(blobs: Sequence[bytes], chunk_bytes: int) -> Iterator[he_pb2.CiphertextChunk]:
    """Split serialised ciphertexts into CiphertextChunk messages of <= chunk_bytes data."""
    step = max(1, int(chunk_bytes))
    for i, b in enumerate(blobs):
        for off in range(0, max(len(b), 1), step):
            part = b[off:off + step]
            yield he_pb2.CiphertextChunk(
                index=i, total_bytes=len(b),
                data=common_pb2.Tensor(dtype=common_pb2.DTYPE_UINT8, shape=[len(part)], data=part,
                                       encoding=common_pb2.ENCODING_CKKS))


def collect_blobs(chunks: Iterator[he_pb2.CiphertextChunk], *, count: int, max_bytes: int) -> list[bytes]:
    """Reassemble ``count`` ciphertexts from consecutive chunks; ProtocolError if malformed."""
    out: list[bytearray] = []
    totals: list[int] = []
    for ch in chunks:
        if ch.data.encoding != common_pb2.ENCODING_CKKS:
            raise InvalidArgumentError("ciphertext chunk without ENCODING_CKKS")
        if ch.index == len(out):
            if ch.total_bytes > max_bytes or ch.total_bytes == 0:
                raise InvalidArgumentError(f"ciphertext {ch.index} of {ch.total_bytes} bytes (limit {max_bytes})")
            out.append(bytearray())
            totals.append(ch.total_bytes)
        elif ch.index != len(out) - 1 or len(out[-1]) >= totals[-1]:
            raise ProtocolError(f"ciphertext chunk {ch.index} out of order")
        out[-1] += ch.data.data
        if len(out[-1]) > totals[-1]:
            raise ProtocolError(f"ciphertext {ch.index} longer than announced")
        if len(out) > count:
            raise InvalidArgumentError(f"more than the announced {count} ciphertexts")
    if len(out) != count or (out and len(out[-1]) != totals[-1]):
        raise ProtocolError(f"received {len(out)} of {count} ciphertexts (stream ended early)")
    return [bytes(b) for b in out]
