"""Distributed comparison functions (DCF): function secret sharing of ``x < alpha``.

A DCF lets a dealer hand two parties keys ``k_0, k_1`` for the function

    f_{alpha,beta}(x) = beta   if x < alpha   (x, alpha in {0,1}^n as unsigned integers)
                        0      otherwise,

such that ``dcf_eval(k_0, x) + dcf_eval(k_1, x) = f_{alpha,beta}(x)`` (mod 2^64, per
component) for every public ``x``, while each key alone reveals nothing about ``alpha``
or ``beta``. This is what makes an MPC comparison / ReLU cost ONE online round: the
parties open ``x = y + r`` for a dealer mask ``r`` hidden in ``alpha`` and evaluate
their keys locally (that protocol lives in ``secureinfer.protocols``, not here).

Construction: Boyle, Chandran, Gilboa, Gupta, Ishai, Kumar, Rathee, "Function Secret
Sharing for Mixed-Mode and Fixed-Point Secure Computation", EUROCRYPT 2021, Fig. 3
(``Gen^<_n`` / ``Eval^<_n``), with output group ``G = (Z_2^64)^k`` and domain
``{0,1}^n`` read MSB first. Everything is vectorized over ``N`` independent instances:
each element has its own ``alpha``, ``beta`` and key, and every tree level is one AES
call over all instances.

PRG. ``G`` is fixed-key AES-128 (the key is a public constant) in Matyas–Meyer–Oseas
form with a distinct tweak per output block, ``H_j(s) = AES_K(s ^ j) ^ s ^ j``, which is
a PRG on a uniform secret seed when AES_K is modelled as a random permutation; see Guo,
Katz, Wang, Yu, "Efficient and Secure Multiparty Computation from Fixed-Key Block
Ciphers", IEEE S&P 2020, and Boyle, Gilboa, Ishai, "Function Secret Sharing:
Improvements and Extensions", CCS 2016 (fixed-key AES for FSS PRGs). Seeds are 128-bit
blocks held as two little-endian uint64 words ``(w0, w1)``. Tweaks live in ``w1``:
``(d << 32) | j`` for domain ``d`` (0 = left child, 1 = right child, 2 = Convert) and
block ``j``. A side of ``G(s)`` is ``1 + ceil(k/2)`` blocks: the child seed, whose least
significant bit is the control bit ``t`` and is then cleared (so seeds carry 127 random
bits), followed by the ``k`` payload words ``v``. ``Convert(s)`` is the first ``k``
little-endian uint64 words of ``ceil(k/2)`` blocks in domain 2. Eval expands only the
side chosen by the public bit ``x_i`` (the tweak is picked per element), so it does half
the AES work of Gen. Root seeds come from the caller's :class:`~secureinfer.prg.Prg`.

Cost per instance, ``n = n_bits``, ``k`` payload words:

* key size: ``16 + n*(16 + 8k + 2/8) + 8k`` bytes per party (the seed, ``n`` correction
  words ``(s_CW, V_CW, t_CW^L, t_CW^R)`` with the two t bits bit-packed, and ``CW_{n+1}``),
  plus a 24-byte header per serialized key; for n = 28, k = 3: ~1,139 bytes. The
  correction words are the same in both keys, only the 16-byte seed differs.
* Gen: ``n`` two-sided PRG expansions per party (``2n(2 + 2*ceil(k/2)) + 2*ceil(k/2)``
  AES blocks in all) plus O(n*k) ring operations.
* Eval: ``n`` one-sided expansions (``n(1 + ceil(k/2)) + ceil(k/2)`` AES blocks) plus
  O(n*k) ring operations; no communication. The comparison that uses it costs one
  online round.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secureinfer.errors import InvalidArgumentError, ProtocolError, ShapeError
from secureinfer.prg import Prg

__all__ = ["DcfKey", "dcf_eval", "dcf_gen"]

# Public fixed AES-128 key: the first 16 bytes of
# SHA-256(b"secureinfer/fss: fixed AES-128 key for the DCF PRG, v1") (nothing up the sleeve).
_AES_KEY = bytes.fromhex("2f5c646c9852ec80d9c4c1c7a7424adc")
_U64 = np.uint64
_ONES = np.uint64(0xFFFFFFFFFFFFFFFF)
_NOT_LSB = np.uint64(0xFFFFFFFFFFFFFFFE)
_DOMAIN_SHIFT = 32
_CONVERT_DOMAIN = 2

_MAGIC = b"SIDC"
_VERSION = 1
_HEADER = struct.Struct("<4sHBBIQ4x")  # magic, version, party, n_bits, k, N, reserved


def _side_blocks(k: int) -> int:
    """AES blocks per side of G: one seed block plus ceil(k/2) payload blocks."""
    return 1 + (k + 1) // 2


def _tweaks(domains: list[int], blocks: int) -> np.ndarray:
    """Tweak blocks ``(0, (d << 32) | j)`` of shape (len(domains), blocks, 2)."""
    tw = np.zeros((len(domains), blocks, 2), dtype=_U64)
    for a, d in enumerate(domains):
        tw[a, :, 1] = (np.uint64(d) << np.uint64(_DOMAIN_SHIFT)) | np.arange(blocks, dtype=_U64)
    return tw


class _Mmo:
    """``out = AES_K(inp) ^ inp`` over a fixed number of blocks with reused buffers."""

    __slots__ = ("_enc", "_inp8", "_raw", "inp", "out")

    def __init__(self, shape: tuple[int, ...]) -> None:
        blocks = int(np.prod(shape, dtype=np.int64))
        self._enc = Cipher(algorithms.AES(_AES_KEY), modes.ECB()).encryptor()
        self.inp = np.empty((*shape, 2), dtype=_U64)
        self._inp8 = self.inp.reshape(-1).view(np.uint8)
        self._raw = np.empty(16 * blocks + 16, dtype=np.uint8)  # update_into needs +15
        self.out = self._raw[: 16 * blocks].view(_U64).reshape(*shape, 2)

    def run(self) -> np.ndarray:
        if self.inp.size:
            self._enc.update_into(self._inp8, self._raw)
        np.bitwise_xor(self.out, self.inp, out=self.out)
        return self.out


def _convert(seeds: np.ndarray, k: int) -> np.ndarray:
    """Convert_G(s): the first k little-endian words of the domain-2 PRG output, (..., k)."""
    c = (k + 1) // 2
    mmo = _Mmo((*seeds.shape[:-1], c))
    np.bitwise_xor(seeds[..., None, :], _tweaks([_CONVERT_DOMAIN], c)[0], out=mmo.inp)
    return mmo.run().reshape(*seeds.shape[:-1], 2 * c)[..., :k].copy()


def _signed(x: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``(-1)^t * x`` where ``mask`` is all-ones for t = 1 and zero for t = 0."""
    return (x ^ mask) - mask


def _as_u64(a: Any, name: str) -> np.ndarray:
    if not isinstance(a, np.ndarray):
        raise ShapeError(f"{name} must be a numpy uint64 array, got {type(a).__name__}")
    if a.dtype == np.int64:
        return a.view(_U64)  # two's-complement ring elements, same bits
    if a.dtype != _U64:
        raise ShapeError(f"{name} must have dtype uint64 (or int64), got {a.dtype}")
    return a


def _check_n_bits(n_bits: Any) -> int:
    if isinstance(n_bits, bool) or not isinstance(n_bits, (int, np.integer)) or not 1 <= n_bits <= 64:
        raise InvalidArgumentError(f"n_bits must be an integer in [1, 64], got {n_bits!r}")
    return int(n_bits)


def _bits_msb_first(x: np.ndarray, n_bits: int) -> np.ndarray:
    """Bits x_1..x_n (MSB first) of the low n_bits of x, shape (n, N), values 0/1."""
    shifts = np.arange(n_bits - 1, -1, -1, dtype=_U64)[:, None]
    return (x[None, :] >> shifts) & _U64(1)


@dataclass(frozen=True, eq=False)
class DcfKey:
    """One party's DCF keys for N instances (Fig. 3 of Boyle et al. 2021).

    ``seed`` (N, 2) uint64: s_b^(0). ``cw_seed`` (n, N, 2) uint64, ``cw_v`` (n, N, k)
    uint64, ``cw_t`` (n, N, 2) uint8 0/1 (t_CW^L, t_CW^R): the correction words CW_1..CW_n.
    ``cw_last`` (N, k) uint64: CW_{n+1}. Key material is never shown by ``repr``.
    """

    party: int
    n_bits: int
    k: int
    seed: np.ndarray = field(repr=False)
    cw_seed: np.ndarray = field(repr=False)
    cw_v: np.ndarray = field(repr=False)
    cw_t: np.ndarray = field(repr=False)
    cw_last: np.ndarray = field(repr=False)

    def __post_init__(self) -> None:
        if self.party not in (0, 1):
            raise InvalidArgumentError(f"party must be 0 or 1, got {self.party!r}")
        n = _check_n_bits(self.n_bits)
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 1:
            raise InvalidArgumentError(f"k must be a positive integer, got {self.k!r}")
        N = self.seed.shape[0] if isinstance(self.seed, np.ndarray) and self.seed.ndim == 2 else -1
        expect = {
            "seed": ((N, 2), _U64, self.seed),
            "cw_seed": ((n, N, 2), _U64, self.cw_seed),
            "cw_v": ((n, N, self.k), _U64, self.cw_v),
            "cw_t": ((n, N, 2), np.uint8, self.cw_t),
            "cw_last": ((N, self.k), _U64, self.cw_last),
        }
        for name, (shape, dtype, arr) in expect.items():
            if not isinstance(arr, np.ndarray) or arr.shape != shape or arr.dtype != dtype:
                got = f"{arr.shape} {arr.dtype}" if isinstance(arr, np.ndarray) else type(arr).__name__
                raise ShapeError(f"DcfKey.{name} must be {shape} {np.dtype(dtype)}, got {got}")

    @property
    def num(self) -> int:
        """Number of instances N."""
        return int(self.seed.shape[0])

    @property
    def nbytes(self) -> int:
        """Serialized size in bytes: ``len(self.to_bytes())``."""
        n, N, k = self.n_bits, self.num, self.k
        return _HEADER.size + 8 * N * (2 + n * (2 + k) + k) + (2 * n * N + 7) // 8

    def to_bytes(self) -> bytes:
        """Header, then seed, cw_seed, cw_v, cw_last as raw little-endian uint64, then
        the t_CW bits packed (little bit order, zero padding)."""
        header = _HEADER.pack(_MAGIC, _VERSION, self.party, self.n_bits, self.k, self.num)
        parts = [np.ascontiguousarray(a, dtype="<u8").tobytes() for a in (self.seed, self.cw_seed, self.cw_v, self.cw_last)]
        tbits = np.packbits(self.cw_t.reshape(-1) & 1, bitorder="little").tobytes()
        return b"".join([header, *parts, tbits])

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "DcfKey":
        """Parse :meth:`to_bytes` output; raises ProtocolError on anything malformed."""
        buf = memoryview(data).cast("B")
        if len(buf) < _HEADER.size:
            raise ProtocolError(f"DCF key too short: {len(buf)} bytes < {_HEADER.size}-byte header")
        magic, version, party, n, k, N = _HEADER.unpack_from(buf, 0)
        if magic != _MAGIC:
            raise ProtocolError("not a DCF key (bad magic)")
        if version != _VERSION:
            raise ProtocolError(f"unsupported DCF key version {version}")
        if party not in (0, 1) or not 1 <= n <= 64 or k < 1:
            raise ProtocolError(f"bad DCF key header: party={party} n_bits={n} k={k}")
        sizes = [8 * N * 2, 8 * n * N * 2, 8 * n * N * k, 8 * N * k]
        tbytes = (2 * n * N + 7) // 8
        if len(buf) != _HEADER.size + sum(sizes) + tbytes:
            raise ProtocolError(f"DCF key length {len(buf)} does not match its header "
                                f"(expected {_HEADER.size + sum(sizes) + tbytes})")
        arrays, off = [], _HEADER.size
        for size, shape in zip(sizes, [(N, 2), (n, N, 2), (n, N, k), (N, k)]):
            arrays.append(np.frombuffer(buf[off : off + size], dtype="<u8").astype(_U64).reshape(shape))
            off += size
        packed = np.frombuffer(buf[off:], dtype=np.uint8)
        cw_t = np.unpackbits(packed, count=2 * n * N, bitorder="little")
        if tbytes and np.unpackbits(packed[-1:], bitorder="little")[(2 * n * N - 1) % 8 + 1 :].any():
            raise ProtocolError("DCF key has nonzero padding bits")
        seed, cw_seed, cw_v, cw_last = arrays
        return cls(party=party, n_bits=n, k=k, seed=seed, cw_seed=cw_seed, cw_v=cw_v,
                   cw_t=cw_t.reshape(n, N, 2), cw_last=cw_last)


def dcf_gen(alpha: np.ndarray, beta: np.ndarray, *, n_bits: int, prg: Prg) -> tuple[DcfKey, DcfKey]:
    """Gen^<_n of Boyle et al. (EUROCRYPT 2021, Fig. 3), vectorized over N instances.

    ``alpha`` (N,) uint64 (only the low ``n_bits`` bits are used), ``beta`` (N, k) uint64.
    Returns the keys of party 0 and party 1. The two root seeds per instance are drawn
    from ``prg``. Cost: 2n two-sided PRG expansions per instance (see the module docstring).
    """
    n = _check_n_bits(n_bits)
    alpha = _as_u64(alpha, "alpha")
    beta = _as_u64(beta, "beta")
    if alpha.ndim != 1:
        raise ShapeError(f"alpha must have shape (N,), got {alpha.shape}")
    N = alpha.shape[0]
    if beta.ndim != 2 or beta.shape[0] != N or beta.shape[1] < 1:
        raise ShapeError(f"beta must have shape (N, k) = ({N}, k>=1), got {beta.shape}")
    k = beta.shape[1]
    B = _side_blocks(k)

    root = prg.uint64((2, N, 2))
    root[..., 0] &= _NOT_LSB
    s = root.copy()  # s_b^(i-1), (party, N, word)
    t = np.zeros((2, N), dtype=_U64)  # t_b^(i-1) as 0/1
    t[1] = 1
    v_alpha = np.zeros((N, k), dtype=_U64)
    cw_seed = np.empty((n, N, 2), dtype=_U64)
    cw_v = np.empty((n, N, k), dtype=_U64)
    cw_t = np.empty((n, N, 2), dtype=np.uint8)
    abits = _bits_msb_first(alpha, n)
    tw = _tweaks([0, 1], B)
    mmo = _Mmo((2, N, 2, B))  # (party, N, side, block)

    for i in range(n):
        np.bitwise_xor(s[:, :, None, None, :], tw, out=mmo.inp)
        out = mmo.run()
        tb = out[:, :, :, 0, 0] & _U64(1)  # (party, N, side): t_b^L, t_b^R
        out[:, :, :, 0, 0] &= _NOT_LSB
        sd = out[:, :, :, 0, :]  # (party, N, side, word)
        v = out.reshape(2, N, 2, 2 * B)[..., 2 : 2 + k]  # (party, N, side, k)
        a = abits[i]
        am = -a  # all-ones where alpha_i = 1, i.e. Keep = R, Lose = L
        # Keep = side alpha_i, Lose = the other one (lines 8-9).
        s_diff = sd[:, :, 0] ^ sd[:, :, 1]
        s_keep = sd[:, :, 0] ^ (s_diff & am[None, :, None])
        s_lose = s_keep ^ s_diff
        v_keep = v[:, :, 0] + ((v[:, :, 1] - v[:, :, 0]) & am[None, :, None])
        v_lose = v[:, :, 0] + v[:, :, 1] - v_keep
        t_keep = tb[:, :, 0] ^ ((tb[:, :, 0] ^ tb[:, :, 1]) & a)
        sign1 = -t[1][:, None]  # mask of t_1^(i-1)
        s_cw = s_lose[0] ^ s_lose[1]  # line 10
        v_cw = _signed(v_lose[1] - v_lose[0] - v_alpha + (beta & am[:, None]), sign1)  # lines 11-12
        v_alpha = v_alpha - v_keep[1] + v_keep[0] + _signed(v_cw, sign1)  # line 13
        t_cw_l = tb[0, :, 0] ^ tb[1, :, 0] ^ a ^ _U64(1)  # line 14
        t_cw_r = tb[0, :, 1] ^ tb[1, :, 1] ^ a
        t_cw_keep = t_cw_l ^ ((t_cw_l ^ t_cw_r) & a)
        cw_seed[i], cw_v[i] = s_cw, v_cw
        cw_t[i, :, 0], cw_t[i, :, 1] = t_cw_l, t_cw_r
        s = s_keep ^ (s_cw[None] & -t[:, :, None])  # line 16
        t = t_keep ^ (t & t_cw_keep[None])  # line 17

    conv = _convert(s, k)  # (party, N, k)
    cw_last = _signed(conv[1] - conv[0] - v_alpha, -t[1][:, None])  # line 19
    for arr in (root, cw_seed, cw_v, cw_t, cw_last):
        arr.setflags(write=False)
    keys = tuple(
        DcfKey(party=b, n_bits=n, k=k, seed=root[b], cw_seed=cw_seed, cw_v=cw_v, cw_t=cw_t, cw_last=cw_last)
        for b in (0, 1)
    )
    return keys[0], keys[1]


def dcf_eval(key: DcfKey, x: np.ndarray) -> np.ndarray:
    """Eval^<_n of Boyle et al. (EUROCRYPT 2021, Fig. 3): party b's share of beta*1{x<alpha}.

    ``x`` (N,) uint64, public (only the low ``n_bits`` bits are used). Returns (N, k)
    uint64; the two parties' outputs sum to ``beta * 1{x < alpha}`` mod 2^64. Cost: n
    one-sided PRG expansions (``1 + ceil(k/2)`` AES blocks each) per instance, no rounds.
    """
    if not isinstance(key, DcfKey):
        raise InvalidArgumentError(f"key must be a DcfKey, got {type(key).__name__}")
    x = _as_u64(x, "x")
    n, N, k = key.n_bits, key.num, key.k
    if x.shape != (N,):
        raise ShapeError(f"x must have shape ({N},) to match the key, got {x.shape}")
    B = _side_blocks(k)

    xbits = _bits_msb_first(x, n)  # (n, N) 0/1
    side_tw = xbits << _U64(_DOMAIN_SHIFT)  # tweak of the side x_i, xored into word 1
    # t_CW of the side x_i, as all-ones / zero masks
    t_cw = -np.where(xbits.astype(bool), key.cw_t[:, :, 1], key.cw_t[:, :, 0]).astype(_U64)
    cw_seed, cw_v = key.cw_seed, key.cw_v

    s = np.array(key.seed, dtype=_U64, order="C")  # s^(i-1)
    t = np.full(N, _ONES if key.party else 0, dtype=_U64)  # t^(i-1) as a mask
    t_new = np.empty(N, dtype=_U64)
    tmp_v = np.empty((N, k), dtype=_U64)
    acc = np.zeros((N, k), dtype=_U64)  # V without the (-1)^b factor
    tw = _tweaks([0], B)[0]
    mmo = _Mmo((N, B))
    out = mmo.out
    out_t = out[:, 0, 0]
    out_s = out[:, 0, :]
    out_v = out.reshape(N, 2 * B)[:, 2 : 2 + k]

    for i in range(n):
        s[:, 1] ^= side_tw[i]
        np.bitwise_xor(s[:, None, :], tw, out=mmo.inp)
        mmo.run()  # G(s^(i-1)) restricted to side x_i
        np.bitwise_and(out_t, _U64(1), out=t_new)
        out_t ^= t_new  # clear the control bit out of the seed
        np.negative(t_new, out=t_new)
        np.bitwise_and(cw_seed[i], t[:, None], out=s)  # correction by t^(i-1) * s_CW
        s ^= out_s
        np.bitwise_and(cw_v[i], t[:, None], out=tmp_v)  # V += v^side + t^(i-1) V_CW
        acc += tmp_v
        acc += out_v
        t &= t_cw[i]  # t^(i) = t^side ^ t^(i-1) t_CW^side
        t ^= t_new

    acc += _convert(s, k)
    np.bitwise_and(key.cw_last, t[:, None], out=tmp_v)
    acc += tmp_v
    if key.party:
        np.negative(acc, out=acc)
    return acc
