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
call over all instances (of a cache-sized chunk).

PRG. ``G`` is fixed-key AES-128 (the key is a public constant) in Matyas–Meyer–Oseas
form with a distinct tweak per output block, ``H_T(s) = AES_K(s ^ T) ^ s ^ T``, which is a
PRG on a uniform secret seed when AES_K is modelled as a random permutation; see Guo,
Katz, Wang, Yu, "Efficient and Secure Multiparty Computation from Fixed-Key Block
Ciphers", IEEE S&P 2020, and Boyle, Gilboa, Ishai, "Function Secret Sharing:
Improvements and Extensions", CCS 2016 (fixed-key AES for FSS PRGs). The feed-forward
matters: without it ``AES_K^{-1}`` would recover the seed. Seeds are 128-bit blocks held
as two little-endian uint64 words ``(w0, w1)``; block ``j`` of domain ``d`` (0 = left
child, 1 = right child, 2 = Convert) uses the tweak ``T = (j, j ^ d)``. A side of
``G(s)`` is ``1 + ceil(k/2)`` blocks: the child seed, whose least significant bit is the
control bit ``t`` and is then cleared (seeds carry 127 random bits), followed by the
``k`` payload words ``v``. ``Convert(s)`` is the first ``k`` little-endian words of the
``ceil(k/2)`` blocks of domain 2. Eval expands only the side named by the public bit
``x_i`` (its domain is xored in per element): half the AES work of Gen's two-sided
expansion. Root seeds come from the caller's :class:`~secureinfer.prg.Prg`.

Cost per instance, ``n = n_bits``, ``k`` payload words:

* key size: ``16 + n*(16 + 8k + 2/8) + 8k`` bytes per party (the seed, ``n`` correction
  words ``(s_CW, V_CW, t_CW^L, t_CW^R)`` with the two t bits bit-packed, and ``CW_{n+1}``),
  plus a 24-byte header per serialized key; for n = 28, k = 3: 1,167 bytes. The
  correction words are the same in both keys, only the 16-byte seed differs.
* Gen: ``n`` two-sided PRG expansions per party (``2n(2 + 2*ceil(k/2)) + 2*ceil(k/2)``
  AES blocks in all) plus O(n*k) ring operations.
* Eval: ``n`` one-sided expansions (``n(1 + ceil(k/2)) + ceil(k/2)`` AES blocks) plus
  O(n*k) ring operations; no communication. The comparison that uses it costs one
  online round.
"""

from __future__ import annotations

import struct
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from secureinfer.errors import ConfigError, InvalidArgumentError, ProtocolError, ShapeError
from secureinfer.prg import Prg

__all__ = ["DcfKey", "dcf_eval", "dcf_gen"]

# Public fixed AES-128 key: the first 16 bytes of
# SHA-256(b"secureinfer/fss: fixed AES-128 key for the DCF PRG, v1") (nothing up the sleeve).
_AES_KEY = bytes.fromhex("2f5c646c9852ec80d9c4c1c7a7424adc")
_U64 = np.uint64
_NOT_LSB = np.uint64(0xFFFFFFFFFFFFFFFE)
_LEFT, _RIGHT, _CONVERT = np.uint64(0), np.uint64(1), np.uint64(2)  # tweak domains

# Instances per pass (they are independent). Gen touches 4x eval's blocks per level and
# gains from staying in cache; eval is cheaper in fewer, longer numpy calls (measured).
_GEN_CHUNK = 8192
_EVAL_CHUNK = 1 << 15
_BULK_ELEMENTS = 1 << 16  # eval precomputes all n levels' public bits below n*N of this

_MAGIC = b"SIDC"
_VERSION = 1
_HEADER = struct.Struct("<4sHBBIQ4x")  # magic, version, party, n_bits, k, N, reserved


def _side_blocks(k: int) -> int:
    """AES blocks per side of G: one seed block plus ceil(k/2) payload blocks."""
    return 1 + (k + 1) // 2


class _Mmo:
    """``out = AES_K(inp) ^ inp`` over blocks laid out as (..., blocks, N, 2) words.

    Buffers are allocated once and reused level after level; the block order in memory
    is free (ECB), so instances are the inner axis and every numpy op streams.
    """

    __slots__ = ("_enc", "_inp8", "_raw", "inp", "out")

    def __init__(self, shape: tuple[int, ...]) -> None:
        if sys.byteorder != "little":  # blocks are native uint64 pairs read as AES bytes
            raise ConfigError("secureinfer.fss needs a little-endian host")
        blocks = int(np.prod(shape, dtype=np.int64))
        self._enc = Cipher(algorithms.AES(_AES_KEY), modes.ECB()).encryptor()
        self.inp = np.empty((*shape, 2), dtype=_U64)
        self._inp8 = self.inp.reshape(-1).view(np.uint8)
        self._raw = np.empty(16 * blocks + 16, dtype=np.uint8)  # update_into wants +15
        self.out = self._raw[: 16 * blocks].view(_U64).reshape(*shape, 2)

    def load(self, seeds: np.ndarray, domain: np.ndarray | np.uint64) -> None:
        """inp[..., j, :, :] = seeds ^ (j, j ^ domain) for every block j.

        ``seeds`` (..., N, 2); ``domain`` a scalar or a per-instance (..., N) array.
        """
        first = self.inp[..., 0, :, :]
        np.copyto(first, seeds)
        first[..., 1] ^= domain
        self.spread()

    def spread(self) -> None:
        """inp[..., j, :, :] = inp[..., 0, :, :] ^ (j, j) for the blocks j >= 1."""
        blocks = self.inp.shape[-3]
        if blocks > 1:
            tweaks = np.arange(1, blocks, dtype=_U64)[:, None, None]
            np.bitwise_xor(self.inp[..., None, 0, :, :], tweaks, out=self.inp[..., 1:, :, :])

    def run(self) -> np.ndarray:
        if self._raw.size > 16:
            self._enc.update_into(self._inp8, self._raw)
        np.bitwise_xor(self.out, self.inp, out=self.out)
        return self.out


def _words(blocks: np.ndarray, k: int) -> np.ndarray:
    """The first k little-endian words of (..., c, N, 2) blocks, as (..., k, N)."""
    *lead, c, N, _ = blocks.shape
    return np.swapaxes(blocks, -1, -2).reshape(*lead, 2 * c, N)[..., :k, :]


def _convert(seeds: np.ndarray, k: int) -> np.ndarray:
    """Convert_G(s) for seeds (..., N, 2): k words of the domain-2 PRG output, (..., k, N)."""
    mmo = _Mmo((*seeds.shape[:-2], (k + 1) // 2, seeds.shape[-2]))
    mmo.load(seeds, _CONVERT)
    return _words(mmo.run(), k).copy()


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
    ``cw_last`` (N, k) uint64: CW_{n+1}. Seeds are 128-bit blocks as two little-endian
    words. Key material is never shown by ``repr``.

    Memory layout: keys from :func:`dcf_gen` and :meth:`from_bytes` hold ``cw_*`` as
    transposed views of instance-minor buffers (``(n, 2, N)``, ``(n, k, N)``, ``(k, N)``)
    because that is what :func:`dcf_eval` streams through; any layout is accepted.
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
        if isinstance(self.party, bool) or self.party not in (0, 1):
            raise InvalidArgumentError(f"party must be 0 or 1, got {self.party!r}")
        n = _check_n_bits(self.n_bits)
        if isinstance(self.k, bool) or not isinstance(self.k, (int, np.integer)) or self.k < 1:
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
        """Serialized size in bytes, ``len(self.to_bytes())``: a 24-byte header plus
        ``16 + n*(16 + 8k) + 8k`` bytes and ``2n`` bits per instance."""
        n, N, k = self.n_bits, self.num, self.k
        return _HEADER.size + 8 * N * (2 + n * (2 + k) + k) + (2 * n * N + 7) // 8

    def to_bytes(self) -> bytes:
        """Serialize: header, then raw little-endian uint64 arrays in the order ``seed``
        as (N, 2), ``cw_seed`` as (n, 2, N), ``cw_v`` as (n, k, N), ``cw_last`` as
        (k, N), then the t_CW bits as (n, 2, N) packed little-bit-first, zero padded."""
        header = _HEADER.pack(_MAGIC, _VERSION, self.party, self.n_bits, self.k, self.num)
        arrays = (self.seed, self.cw_seed.transpose(0, 2, 1), self.cw_v.transpose(0, 2, 1), self.cw_last.T)
        parts = [memoryview(np.ascontiguousarray(a, dtype="<u8").reshape(-1).view(np.uint8)) for a in arrays]
        tbits = np.packbits(self.cw_t.transpose(0, 2, 1) & 1, axis=None, bitorder="little")
        return b"".join([header, *parts, memoryview(tbits)])  # one copy of each array

    @classmethod
    def from_bytes(cls, data: bytes | bytearray | memoryview) -> "DcfKey":
        """Parse :meth:`to_bytes` output; raises ProtocolError on anything malformed.

        The uint64 arrays are read-only views of ``data`` (no copy; a mutable buffer is
        copied once first); only the t_CW bits are unpacked.
        """
        try:
            buf = memoryview(data).cast("B")
        except TypeError as e:
            raise ProtocolError(f"DCF key must be bytes, got {type(data).__name__}") from e
        if not isinstance(data, bytes):  # the key's arrays view the buffer: make it immutable
            buf = memoryview(buf.tobytes())
        if len(buf) < _HEADER.size:
            raise ProtocolError(f"DCF key too short: {len(buf)} bytes < {_HEADER.size}-byte header")
        magic, version, party, n, k, N = _HEADER.unpack_from(buf, 0)
        if magic != _MAGIC:
            raise ProtocolError("not a DCF key (bad magic)")
        if version != _VERSION:
            raise ProtocolError(f"unsupported DCF key version {version}")
        if party not in (0, 1) or not 1 <= n <= 64 or k < 1:
            raise ProtocolError(f"bad DCF key header: party={party} n_bits={n} k={k}")
        shapes = [(N, 2), (n, 2, N), (n, k, N), (k, N)]
        sizes = [8 * int(np.prod(s, dtype=object)) for s in shapes]
        nt = 2 * n * N
        expected = _HEADER.size + sum(sizes) + (nt + 7) // 8
        if len(buf) != expected:
            raise ProtocolError(f"DCF key length {len(buf)} does not match its header (expected {expected})")
        arrays, off = [], _HEADER.size
        for size, shape in zip(sizes, shapes):
            arr = np.frombuffer(buf, dtype="<u8", count=size // 8, offset=off)  # zero-copy, read-only
            arrays.append(arr.astype(_U64, copy=False).reshape(shape))
            off += size
        packed = np.frombuffer(buf, dtype=np.uint8, offset=off)
        if nt % 8 and packed[-1] >> (nt % 8):
            raise ProtocolError("DCF key has nonzero padding bits")
        cw_t = np.unpackbits(packed, count=nt, bitorder="little").reshape(n, 2, N)
        seed, cw_seed, cw_v, cw_last = arrays
        return cls(party=party, n_bits=n, k=k, seed=seed, cw_seed=cw_seed.transpose(0, 2, 1),
                   cw_v=cw_v.transpose(0, 2, 1), cw_t=cw_t.transpose(0, 2, 1), cw_last=cw_last.T)


def dcf_gen(alpha: np.ndarray, beta: np.ndarray, *, n_bits: int, prg: Prg) -> tuple[DcfKey, DcfKey]:
    """Gen^<_n of Boyle et al. (EUROCRYPT 2021, Fig. 3), vectorized over N instances.

    ``alpha`` (N,) uint64 (only the low ``n_bits`` bits are used), ``beta`` (N, k) uint64
    (int64 is accepted as the same bits). Returns the keys of party 0 and party 1; the
    two root seeds per instance are drawn from ``prg``. Line numbers below are Fig. 3's.
    Cost: n two-sided PRG expansions per party and instance (module docstring).
    """
    n = _check_n_bits(n_bits)
    alpha = _as_u64(alpha, "alpha")
    beta = _as_u64(beta, "beta")
    if alpha.ndim != 1:
        raise ShapeError(f"alpha must have shape (N,), got {alpha.shape}")
    N = alpha.shape[0]
    if beta.ndim != 2 or beta.shape[0] != N or beta.shape[1] < 1:
        raise ShapeError(f"beta must have shape (N, k) = ({N}, k>=1), got {beta.shape}")
    if not isinstance(prg, Prg):
        raise InvalidArgumentError(f"prg must be a secureinfer.prg.Prg, got {type(prg).__name__}")
    k = beta.shape[1]
    root = prg.uint64((2, N, 2))  # line 2: s_0^(0), s_1^(0); the LSB is the t slot, kept 0
    root[..., 0] &= _NOT_LSB
    cw_seed = np.empty((n, 2, N), dtype=_U64)
    cw_v = np.empty((n, k, N), dtype=_U64)
    cw_t = np.empty((n, 2, N), dtype=np.uint8)
    cw_last = np.empty((k, N), dtype=_U64)
    for lo in range(0, N, _GEN_CHUNK):
        hi = min(N, lo + _GEN_CHUNK)
        _gen_chunk(root[:, lo:hi], alpha[lo:hi], beta[lo:hi].T, n,
                   cw_seed[..., lo:hi], cw_v[..., lo:hi], cw_t[..., lo:hi], cw_last[:, lo:hi])
    for arr in (root, cw_seed, cw_v, cw_t, cw_last):
        arr.setflags(write=False)
    views = dict(cw_seed=cw_seed.transpose(0, 2, 1), cw_v=cw_v.transpose(0, 2, 1),
                 cw_t=cw_t.transpose(0, 2, 1), cw_last=cw_last.T)
    return (DcfKey(party=0, n_bits=n, k=k, seed=root[0], **views),
            DcfKey(party=1, n_bits=n, k=k, seed=root[1], **views))


def _gen_chunk(root: np.ndarray, alpha: np.ndarray, beta_t: np.ndarray, n: int, cw_seed: np.ndarray,
               cw_v: np.ndarray, cw_t: np.ndarray, cw_last: np.ndarray) -> None:
    """Fig. 3 Gen for root seeds (2, C, 2), alpha (C,), beta (k, C); fills the cw_* (.., C)."""
    k, N = beta_t.shape
    s = root.copy()  # s_b^(i-1): (party, N, word)
    t = np.zeros((2, N), dtype=_U64)  # line 4: t_b^(i-1) as 0/1
    t[1] = 1
    v_alpha = np.zeros((k, N), dtype=_U64)  # line 3
    abits = _bits_msb_first(alpha, n)
    mmo = _Mmo((2, 2, _side_blocks(k), N))  # (party, side, block, N) blocks
    sides = np.array([_LEFT, _RIGHT], dtype=_U64)[None, :, None]
    one = _U64(1)
    for i in range(n):
        mmo.load(s[:, None], sides)
        out = mmo.run()  # lines 6-7: G(s_b^(i-1)) for both sides, (party, side, block, N, word)
        tb = out[:, :, 0, :, 0] & one  # (party, side, N): t_b^L, t_b^R
        out[:, :, 0, :, 0] ^= tb
        a = abits[i]
        am = -a  # all-ones where alpha_i = 1: Keep = R, Lose = L (lines 8-9)
        t_mask = -t  # (party, N)
        for w in (0, 1):  # seeds, one 64-bit word at a time
            s_l, s_r = out[:, 0, 0, :, w], out[:, 1, 0, :, w]  # (party, N)
            s_diff = s_l ^ s_r
            s_keep = s_l ^ (s_diff & am)
            s_lose = s_keep ^ s_diff
            s_cw = s_lose[0] ^ s_lose[1]  # line 10
            cw_seed[i, w] = s_cw
            np.bitwise_xor(s_keep, s_cw & t_mask, out=s[:, :, w])  # line 16
        sign1 = t_mask[1]  # (-1)^{t_1^(i-1)} as a negation mask
        for m in range(k):  # payload word m of v_b^L, v_b^R: (party, N) views
            v_l, v_r = out[:, 0, 1 + m // 2, :, m % 2], out[:, 1, 1 + m // 2, :, m % 2]
            v_keep = v_l + ((v_r - v_l) & am)
            v_lose = v_l + v_r - v_keep
            v_cw = _signed(v_lose[1] - v_lose[0] - v_alpha[m] + (beta_t[m] & am), sign1)  # lines 11-12
            v_alpha[m] += v_keep[0] - v_keep[1] + _signed(v_cw, sign1)  # line 13
            cw_v[i, m] = v_cw
        t_cw_l = tb[0, 0] ^ tb[1, 0] ^ a ^ one  # line 14
        t_cw_r = tb[0, 1] ^ tb[1, 1] ^ a
        cw_t[i, 0], cw_t[i, 1] = t_cw_l, t_cw_r  # line 15: CW^(i) = s_CW || V_CW || t_CW^L || t_CW^R
        t_keep = tb[:, 0] ^ ((tb[:, 0] ^ tb[:, 1]) & a)
        t = t_keep ^ (t & (t_cw_l ^ ((t_cw_l ^ t_cw_r) & a)))  # line 17
    conv = _convert(s, k)  # (party, k, N)
    cw_last[...] = _signed(conv[1] - conv[0] - v_alpha, -t[1])  # line 19


def dcf_eval(key: DcfKey, x: np.ndarray) -> np.ndarray:
    """Eval^<_n of Boyle et al. (EUROCRYPT 2021, Fig. 3): party b's share of beta*1{x<alpha}.

    ``x`` (N,) uint64 (int64 accepted), public; only the low ``n_bits`` bits are used.
    Returns (N, k) uint64; the two parties' outputs sum to ``beta * 1{x < alpha}``
    mod 2^64. Cost: n one-sided PRG expansions of ``1 + ceil(k/2)`` AES blocks per
    instance plus one Convert, O(n*k) ring ops, no communication.
    """
    if not isinstance(key, DcfKey):
        raise InvalidArgumentError(f"key must be a DcfKey, got {type(key).__name__}")
    x = _as_u64(x, "x")
    N, k = key.num, key.k
    if x.shape != (N,):
        raise ShapeError(f"x must have shape ({N},) to match the key, got {x.shape}")
    # Instance-minor views (no copies for keys from dcf_gen / from_bytes).
    cw_seed = key.cw_seed.transpose(0, 2, 1)  # (n, 2, N)
    cw_v = key.cw_v.transpose(0, 2, 1)  # (n, k, N)
    cw_t = key.cw_t.transpose(0, 2, 1)  # (n, 2, N) uint8
    cw_last = key.cw_last.T  # (k, N)
    acc = np.empty((k, N), dtype=_U64)
    for lo in range(0, N, _EVAL_CHUNK):
        hi = min(N, lo + _EVAL_CHUNK)
        _eval_chunk(key.party, key.seed[lo:hi], cw_seed[..., lo:hi], cw_v[..., lo:hi], cw_t[..., lo:hi],
                    cw_last[:, lo:hi], x[lo:hi], acc[:, lo:hi])
    return np.ascontiguousarray(acc.T)


def _eval_chunk(party: int, seed: np.ndarray, cw_seed: np.ndarray, cw_v: np.ndarray, cw_t: np.ndarray,
                cw_last: np.ndarray, x: np.ndarray, acc: np.ndarray) -> None:
    """Fig. 3 Eval for C instances: seed (C, 2), cw_seed (n, 2, C), cw_v (n, k, C),
    cw_t (n, 2, C), cw_last (k, C), x (C,); writes V into acc (k, C)."""
    n, k, N = cw_v.shape
    B = _side_blocks(k)
    t_cw_l = cw_t[:, 0]  # (n, N) uint8
    t_cw_d = cw_t[:, 0] ^ cw_t[:, 1]  # t_CW^L ^ t_CW^R: t_CW^side = t_CW^L ^ x_i t_CW_d
    shifts = np.arange(n - 1, -1, -1, dtype=_U64)  # x_i = bit n-i of x (MSB first)
    band, bxor, one = np.bitwise_and, np.bitwise_xor, _U64(1)

    mmo = _Mmo((B, N))
    inp, out = mmo.inp, mmo.out
    seed_in = inp[0]  # s^(i-1) lives in the first input block
    np.copyto(seed_in, seed)
    s_w1, o_w0 = inp[0, :, 1], out[0, :, 0]
    tweaks = np.arange(1, B, dtype=_U64)[:, None, None]
    s_words, o_words = seed_in.T, out[0].T  # (2, N) views of s^(i-1) and of the child seed
    t = np.full(N, party, dtype=_U64)  # t^(i-1), 0/1
    # t^(i-1) as a word mask (0 or all ones): "t * w" is "tmask & w", and an AND is
    # vectorized where a 64-bit multiply is not (measured: the two products per level took
    # 22% of an MLP's ReLU evaluation as multiplies)
    tmask = np.full(N, party, dtype=_U64)
    np.negative(tmask, out=tmask)
    tmp_s = np.empty((2, N), dtype=_U64)
    tmp_v = np.empty((k, N), dtype=_U64)
    acc_v = np.zeros((B - 1, N, 2), dtype=_U64)  # sum of v^side, in block layout
    acc[...] = 0  # sum of the t V_CW terms; finally V without (-1)^b

    bulk = n * N <= _BULK_ELEMENTS
    if bulk:  # small batch: all public bits and t_CW^side at once, fewer calls per level
        x_all = (x[None, :] >> shifts[:, None]) & one  # (n, N)
        t_cw_all = (t_cw_l ^ (t_cw_d & x_all.astype(np.uint8))).astype(_U64)
        t_bits = t  # the control-bit logic runs on t itself
    else:  # large batch: per-level rows stay in cache; bit logic on bytes
        x_i, x8, t_cw_i = np.empty(N, dtype=_U64), np.empty(N, dtype=np.uint8), np.empty(N, dtype=np.uint8)
        t_bits = t.astype(np.uint8)
    t_new = np.empty(N, dtype=t_bits.dtype)

    # Per level: 16-22 numpy calls over N-long rows and one AES call over B*N blocks.
    for i in range(n):
        if bulk:
            x_i, t_cw_i = x_all[i], t_cw_all[i]
        else:
            np.right_shift(x, shifts[i], out=x_i)
            x_i &= one
            np.copyto(x8, x_i, casting="unsafe")
            band(x8, t_cw_d[i], out=t_cw_i)
            t_cw_i ^= t_cw_l[i]  # t_CW of side x_i
        if bulk:
            np.negative(t, out=tmask)
        s_w1 ^= x_i  # the public bit x_i picks the side, i.e. the tweak domain (0 L, 1 R)
        bxor(seed_in, tweaks, out=inp[1:])  # tweak (j, j) of payload block j
        mmo.run()  # G(s^(i-1)), side x_i only
        band(o_w0, one, out=t_new, casting="unsafe")  # t^side ...
        o_w0 &= _NOT_LSB  # ... taken out of the seed
        band(cw_seed[i], tmask, out=tmp_s)  # s^(i) = s^side ^ t^(i-1) s_CW
        bxor(o_words, tmp_s, out=s_words)
        band(cw_v[i], tmask, out=tmp_v)  # V += v^side + t^(i-1) V_CW
        acc += tmp_v
        acc_v += out[1:]
        t_bits &= t_cw_i  # t^(i) = t^side ^ t^(i-1) t_CW^side
        t_bits ^= t_new
        if not bulk:
            np.copyto(tmask, t_bits)
            np.negative(tmask, out=tmask)

    acc += _words(acc_v, k)
    acc += _convert(seed_in, k)  # V += Convert(s^(n)) + t^(n) CW_{n+1}
    if bulk:
        np.negative(t, out=tmask)
    band(cw_last, tmask, out=tmp_v)
    acc += tmp_v
    if party:
        np.negative(acc, out=acc)  # the (-1)^b factor of every term
