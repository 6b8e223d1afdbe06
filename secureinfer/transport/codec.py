"""Byte encodings of tensors on the wire: the ``Tensor`` message, round payloads, chunks.

* :func:`tensor_to_proto` / :func:`tensor_from_proto` convert between numpy/torch arrays
  and ``secureinfer.v1.Tensor`` (raw little-endian row-major bytes, as ONNX ``raw_data``
  or KServe ``raw_input_contents``). Decoding parses network input and trusts nothing:
  the dtype must be known, every dimension non-negative, the element count bounded and
  ``prod(shape) * itemsize == len(data)`` exactly.
* :func:`seeded_share_to_proto` writes a share as its 32-byte seed
  (``ENCODING_SEEDED_SHARE``); :func:`share_from_proto` reads either form and expands a
  seed after checking its length and the shape bound.
* :func:`pack_ring` / :func:`unpack_ring` are the payload of one protocol round: several
  Z_2^64 tensors (``torch.int64``) concatenated raw, 8 bytes per element, no header —
  both sides know the shapes, so the only check (and the only one needed) is the length.
* :func:`split_chunks` and :class:`Reassembler` cut a payload into gRPC-sized chunks and
  put them back together, with bounds on count and buffered bytes.

Never pickle: every format here is raw fixed-width little-endian integers or floats.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
import torch

from secureinfer.errors import InvalidArgumentError, ProtocolError, ShapeError
from secureinfer.prg import SEED_BYTES
from secureinfer.sharing import expand_share
from secureinfer.v1 import common_pb2

__all__ = [
    "DEFAULT_MAX_ELEMENTS",
    "Reassembler",
    "dtype_of",
    "numpy_dtype",
    "pack_ring",
    "seeded_share_to_proto",
    "share_from_proto",
    "split_chunks",
    "tensor_from_proto",
    "tensor_to_proto",
    "unpack_ring",
]

#: Default bound on the elements of one decoded tensor (2^28 ≈ 268M, 2 GiB of int64).
DEFAULT_MAX_ELEMENTS = 1 << 28
#: Bound on the rank of a decoded tensor.
MAX_RANK = 32

_NP_BY_DTYPE: dict[int, np.dtype[Any]] = {
    common_pb2.DTYPE_FLOAT32: np.dtype("<f4"),
    common_pb2.DTYPE_FLOAT64: np.dtype("<f8"),
    common_pb2.DTYPE_INT64: np.dtype("<i8"),
    common_pb2.DTYPE_UINT64: np.dtype("<u8"),
    common_pb2.DTYPE_UINT8: np.dtype("u1"),
    common_pb2.DTYPE_INT32: np.dtype("<i4"),
}
_DTYPE_BY_KIND: dict[tuple[str, int], int] = {
    (dt.kind, dt.itemsize): code for code, dt in _NP_BY_DTYPE.items()
}
_DTYPE_BY_TORCH: dict[torch.dtype, int] = {
    torch.float32: common_pb2.DTYPE_FLOAT32,
    torch.float64: common_pb2.DTYPE_FLOAT64,
    torch.int64: common_pb2.DTYPE_INT64,
    torch.uint64: common_pb2.DTYPE_UINT64,
    torch.uint8: common_pb2.DTYPE_UINT8,
    torch.int32: common_pb2.DTYPE_INT32,
}
_ENCODINGS = frozenset(common_pb2.Encoding.values())


def numpy_dtype(dtype: int) -> np.dtype[Any]:
    """The little-endian numpy dtype of a ``DType`` value; InvalidArgumentError if unknown."""
    try:
        return _NP_BY_DTYPE[dtype]
    except KeyError:
        raise InvalidArgumentError(f"unknown or unspecified tensor dtype {dtype}") from None


def dtype_of(x: np.ndarray | torch.Tensor | np.dtype[Any] | torch.dtype) -> int:
    """The ``DType`` value of an array, a tensor or a dtype; InvalidArgumentError if none fits."""
    if isinstance(x, torch.Tensor):
        x = x.dtype
    if isinstance(x, torch.dtype):
        code_t = _DTYPE_BY_TORCH.get(x)
        if code_t is None:
            raise InvalidArgumentError(
                f"dtype {x} cannot go on the wire (float32/64, int32/64, uint8, uint64)"
            )
        return code_t
    dt = np.dtype(x.dtype if isinstance(x, np.ndarray) else x)
    code = _DTYPE_BY_KIND.get((dt.kind, dt.itemsize))
    if code is None:
        raise InvalidArgumentError(
            f"dtype {dt} cannot go on the wire (float32/64, int32/64, uint8, uint64)"
        )
    return code


def _as_numpy(x: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        dtype_of(x.dtype)  # refuse dtypes without a wire type before converting
        t = x.detach().cpu().contiguous()
        if t.dtype == torch.uint64:  # numpy() of uint64 is not supported on every build
            return t.view(torch.int64).numpy().view(np.uint64)
        return t.numpy()
    if isinstance(x, np.ndarray):
        return x
    raise InvalidArgumentError(f"expected a numpy array or torch tensor, got {type(x).__name__}")


def tensor_to_proto(
    x: np.ndarray | torch.Tensor,
    *,
    encoding: int = common_pb2.ENCODING_PLAIN,
    frac_bits: int = 0,
) -> common_pb2.Tensor:
    """Encode ``x`` as a ``Tensor`` message (raw little-endian row-major bytes).

    ``encoding`` is a ``secureinfer.v1.Encoding`` value; ``frac_bits`` (0..62) is the
    fixed-point precision of an additive share. Cost: one copy of the data.
    """
    if encoding not in _ENCODINGS:
        raise InvalidArgumentError(f"unknown tensor encoding {encoding}")
    if not 0 <= frac_bits <= 62:
        raise InvalidArgumentError(f"frac_bits must be in 0..62, got {frac_bits}")
    arr = _as_numpy(x)
    code = dtype_of(arr)
    if encoding == common_pb2.ENCODING_ADDITIVE_SHARE and code not in (
        common_pb2.DTYPE_INT64,
        common_pb2.DTYPE_UINT64,
    ):
        raise InvalidArgumentError(f"an additive share must be int64 or uint64, got {arr.dtype}")
    le = np.ascontiguousarray(arr, dtype=_NP_BY_DTYPE[code])
    return common_pb2.Tensor(
        dtype=code,  # type: ignore[arg-type]
        shape=list(arr.shape),
        data=le.tobytes(),
        encoding=encoding,  # type: ignore[arg-type]
        frac_bits=frac_bits,
    )


def _check_shape(shape: Sequence[int], max_elements: int, what: str) -> int:
    """Validate an untrusted shape; return its element count."""
    if len(shape) > MAX_RANK:
        raise ShapeError(f"{what}: rank {len(shape)} exceeds the limit of {MAX_RANK}")
    n = 1
    for d in shape:
        if d < 0:
            raise ShapeError(f"{what}: negative dimension in shape {list(shape)}")
        n *= int(d)
        if n > max_elements:  # checked as we go so a huge product is never formed
            raise ShapeError(
                f"{what}: shape {list(shape)} has more than the {max_elements} elements allowed"
            )
    return n


def tensor_from_proto(
    msg: common_pb2.Tensor,
    *,
    expect_dtype: int | np.dtype[Any] | type | str | None = None,
    expect_encoding: int | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
    copy: bool = True,
) -> np.ndarray:
    """Decode a ``Tensor`` message from the network into a native-endian numpy array.

    ``expect_dtype`` is a ``DType`` value or anything ``numpy.dtype`` accepts;
    ``expect_encoding`` an ``Encoding`` value. Raises :class:`ShapeError` for a bad or
    oversized shape, a length mismatch or the wrong dtype, :class:`InvalidArgumentError`
    for an unknown dtype or encoding. With ``copy=False`` the result may be a read-only
    view of the message bytes.
    """
    dt = numpy_dtype(msg.dtype)
    if expect_dtype is not None:
        want = expect_dtype if isinstance(expect_dtype, int) else dtype_of(np.dtype(expect_dtype))
        if msg.dtype != want:
            raise ShapeError(
                f"expected dtype {common_pb2.DType.Name(want)}, got {common_pb2.DType.Name(msg.dtype)}"
            )
    if msg.encoding not in _ENCODINGS:
        raise InvalidArgumentError(f"unknown tensor encoding {msg.encoding}")
    if expect_encoding is not None and msg.encoding != expect_encoding:
        raise InvalidArgumentError(
            f"expected encoding {common_pb2.Encoding.Name(expect_encoding)}, "
            f"got {common_pb2.Encoding.Name(msg.encoding)}"
        )
    shape = tuple(msg.shape)
    n = _check_shape(shape, max_elements, "tensor")
    if len(msg.data) != n * dt.itemsize:
        raise ShapeError(
            f"tensor of shape {list(shape)} and dtype {dt.name} needs {n * dt.itemsize} bytes, "
            f"got {len(msg.data)}"
        )
    arr = np.frombuffer(msg.data, dtype=dt).reshape(shape)
    native = arr.dtype.newbyteorder("=")
    if copy or arr.dtype != native:
        arr = arr.astype(native, copy=True)
    return arr


def seeded_share_to_proto(seed: bytes, shape: Sequence[int], *, frac_bits: int) -> common_pb2.Tensor:
    """An ``ENCODING_SEEDED_SHARE`` tensor: the share ``expand_share(seed, shape)`` as its seed."""
    if len(seed) != SEED_BYTES:
        raise InvalidArgumentError(f"a share seed is {SEED_BYTES} bytes, got {len(seed)}")
    if not 0 <= frac_bits <= 62:
        raise InvalidArgumentError(f"frac_bits must be in 0..62, got {frac_bits}")
    return common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64, shape=[int(d) for d in shape], data=bytes(seed),
                             encoding=common_pb2.ENCODING_SEEDED_SHARE, frac_bits=frac_bits)


_SHARE_ENCODINGS = (common_pb2.ENCODING_ADDITIVE_SHARE, common_pb2.ENCODING_SEEDED_SHARE)


def share_from_proto(
    msg: common_pb2.Tensor,
    *,
    expect_frac_bits: int | None = None,
    max_elements: int = DEFAULT_MAX_ELEMENTS,
) -> torch.Tensor:
    """Decode a share (``ENCODING_ADDITIVE_SHARE`` or ``ENCODING_SEEDED_SHARE``) into a
    ``torch.int64`` ring tensor.

    uint64 data is reinterpreted bit for bit (same element of Z_2^64); a seeded share is
    expanded with AES-256-CTR (``sharing.expand_share``) once its seed length and its shape
    (bounded by ``max_elements``) are checked. Raises :class:`InvalidArgumentError` on
    another encoding or a ``frac_bits`` mismatch, :class:`ShapeError` on a bad shape,
    dtype or length.
    """
    if msg.dtype not in (common_pb2.DTYPE_INT64, common_pb2.DTYPE_UINT64):
        raise ShapeError(
            f"an additive share must be INT64 or UINT64, got {common_pb2.DType.Name(msg.dtype)}"
            if msg.dtype in _NP_BY_DTYPE
            else f"unknown or unspecified tensor dtype {msg.dtype}"
        )
    if msg.encoding not in _SHARE_ENCODINGS:
        got = common_pb2.Encoding.Name(msg.encoding) if msg.encoding in _ENCODINGS else str(msg.encoding)
        raise InvalidArgumentError(f"expected ENCODING_ADDITIVE_SHARE or ENCODING_SEEDED_SHARE, got {got}")
    if expect_frac_bits is not None and msg.frac_bits != expect_frac_bits:
        raise InvalidArgumentError(
            f"share has {msg.frac_bits} fractional bits, expected {expect_frac_bits}"
        )
    if msg.encoding == common_pb2.ENCODING_SEEDED_SHARE:
        shape = tuple(msg.shape)
        _check_shape(shape, max_elements, "seeded share")
        if len(msg.data) != SEED_BYTES:
            raise ShapeError(f"a seeded share carries a {SEED_BYTES}-byte seed, got {len(msg.data)} bytes")
        return expand_share(bytes(msg.data), shape)
    arr = tensor_from_proto(
        msg, expect_encoding=common_pb2.ENCODING_ADDITIVE_SHARE, max_elements=max_elements
    )
    return torch.from_numpy(arr.view(np.int64))


def pack_ring(tensors: Sequence[torch.Tensor]) -> bytes:
    """Concatenate ``torch.int64`` tensors as raw little-endian bytes (8 bytes per element).

    The payload of one protocol round; there is no header, both sides know the shapes.
    """
    parts: list[bytes] = []
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64:
            raise TypeError(f"pack_ring takes torch.int64 tensors, got {getattr(t, 'dtype', type(t))}")
        arr = t.detach().cpu().contiguous().numpy()
        parts.append(arr.astype("<i8", copy=False).tobytes())
    return b"".join(parts)


def unpack_ring(data: bytes, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Split a :func:`pack_ring` payload back into ``torch.int64`` tensors of ``shapes``.

    Raises :class:`ProtocolError` when the length is not exactly what the shapes need (a
    peer that disagrees on the step, or a truncated message). One copy of the data.
    """
    sizes = [math.prod(int(d) for d in s) for s in shapes]
    if any(d < 0 for s in shapes for d in s):
        raise ProtocolError(f"negative dimension in shapes {[tuple(s) for s in shapes]}")
    need = 8 * sum(sizes)
    if len(data) != need:
        raise ProtocolError(
            f"round payload has {len(data)} bytes, expected {need} for shapes "
            f"{[tuple(s) for s in shapes]}"
        )
    flat = torch.from_numpy(np.frombuffer(data, dtype="<i8").astype(np.int64, copy=True))
    return [
        chunk.view(tuple(int(d) for d in s))
        for chunk, s in zip(torch.split(flat, sizes), shapes, strict=True)
    ]


def split_chunks(data: bytes, chunk_bytes: int) -> list[bytes]:
    """Cut ``data`` into pieces of at most ``chunk_bytes``; empty data gives one empty chunk."""
    if chunk_bytes <= 0:
        raise InvalidArgumentError(f"chunk_bytes must be positive, got {chunk_bytes}")
    if len(data) <= chunk_bytes:
        return [bytes(data)]
    view = memoryview(data)
    return [bytes(view[i : i + chunk_bytes]) for i in range(0, len(data), chunk_bytes)]


class _Partial:
    __slots__ = ("count", "parts", "size", "started")

    def __init__(self, count: int, now: float) -> None:
        self.count = count
        self.parts: dict[int, bytes] = {}
        self.size = 0
        self.started = now


class Reassembler:
    """Collects the chunks of messages, per key, until each message is complete.

    ``add(key, index, count, data)`` returns the whole message once all ``count`` chunks
    arrived (in any order), else ``None``. It raises :class:`ProtocolError` when a chunk
    contradicts the others (count changes, index out of range, duplicate index), when
    ``count`` exceeds ``max_chunks``, or when buffering it would exceed ``max_bytes`` over
    all pending messages. Partial messages older than ``max_age_s`` are dropped. Thread
    safe.
    """

    def __init__(
        self, *, max_bytes: int = 1 << 30, max_chunks: int = 1 << 16, max_age_s: float = 600.0
    ) -> None:
        self.max_bytes = max_bytes
        self.max_chunks = max_chunks
        self.max_age_s = max_age_s
        self._lock = threading.Lock()
        self._pending: dict[Hashable, _Partial] = {}
        self._bytes = 0

    @property
    def pending_bytes(self) -> int:
        """Bytes buffered in incomplete messages."""
        return self._bytes

    def add(self, key: Hashable, index: int, count: int, data: bytes) -> bytes | None:
        if count < 1 or count > self.max_chunks:
            raise ProtocolError(f"chunk count {count} outside 1..{self.max_chunks}")
        if not 0 <= index < count:
            raise ProtocolError(f"chunk index {index} outside 0..{count - 1}")
        if count == 1:
            with self._lock:
                if key in self._pending:
                    raise ProtocolError(f"single chunk for {key!r} while a chunked one is pending")
            return data
        now = time.monotonic()
        with self._lock:
            self._expire(now)
            part = self._pending.get(key)
            if part is None:
                part = self._pending[key] = _Partial(count, now)
            if part.count != count:
                raise ProtocolError(f"chunk count changed from {part.count} to {count} for {key!r}")
            if index in part.parts:
                raise ProtocolError(f"duplicate chunk {index} for {key!r}")
            if self._bytes + len(data) > self.max_bytes:
                raise ProtocolError(
                    f"reassembly buffer full ({self._bytes} of {self.max_bytes} bytes pending)"
                )
            part.parts[index] = data
            part.size += len(data)
            self._bytes += len(data)
            if len(part.parts) < count:
                return None
            del self._pending[key]
            self._bytes -= part.size
        return b"".join(part.parts[i] for i in range(count))

    def discard(self, match: Callable[[Hashable], bool]) -> int:
        """Drop the partial messages whose key satisfies ``match``; return how many."""
        with self._lock:
            keys = [k for k in self._pending if match(k)]
            for k in keys:
                self._bytes -= self._pending.pop(k).size
        return len(keys)

    def _expire(self, now: float) -> None:
        old = [k for k, p in self._pending.items() if now - p.started > self.max_age_s]
        for k in old:
            self._bytes -= self._pending.pop(k).size
