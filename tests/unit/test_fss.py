"""Tests of secureinfer.fss: the DCF of Boyle et al. (EUROCRYPT 2021, Fig. 3).

Correctness is checked as the scheme defines it: for every instance the two parties'
outputs sum to ``beta * 1{x < alpha}`` mod 2^64 (on the low ``n_bits`` bits of x and
alpha). Randomness comes from fixed-seed ``Prg`` streams so the tests are reproducible.
"""

from __future__ import annotations

import dataclasses
import struct

import numpy as np
import pytest

from secureinfer import fss
from secureinfer.errors import InvalidArgumentError, ProtocolError, ShapeError
from secureinfer.fss import DcfKey, dcf_eval, dcf_gen
from secureinfer.prg import Prg

U64 = np.uint64


def _prg(label: str) -> Prg:
    return Prg.derived(b"secureinfer-test-fss-master-seed", label)


def _mask(n_bits: int) -> np.uint64:
    return U64((1 << n_bits) - 1)


def _expected(alpha: np.ndarray, beta: np.ndarray, x: np.ndarray, n_bits: int) -> np.ndarray:
    lt = (x & _mask(n_bits)) < (alpha & _mask(n_bits))
    return np.where(lt[:, None], beta, U64(0))


def _both(keys: tuple[DcfKey, DcfKey], x: np.ndarray) -> np.ndarray:
    return dcf_eval(keys[0], x) + dcf_eval(keys[1], x)


def _cases(n_bits: int, prg: Prg, n_random: int = 300) -> tuple[np.ndarray, np.ndarray]:
    """alpha, x pairs: random ones plus the edge cases, with junk above bit n_bits."""
    m = int(_mask(n_bits))
    top = (1 << n_bits) - 1
    a_rand = prg.uint64(n_random)
    x_rand = prg.uint64(n_random)
    a_edge, x_edge = [], []
    for a in {0, 1, top, top - 1 if top else 0, int(a_rand[0]) & m}:
        for x in {a, (a - 1) & m, (a + 1) & m, 0, top}:
            a_edge.append(a)
            x_edge.append(x)
    alpha = np.concatenate([a_rand, np.array(a_edge, dtype=U64)])
    x = np.concatenate([x_rand, np.array(x_edge, dtype=U64)])
    if n_bits < 64:  # bits above n_bits must be ignored, for x and for alpha
        junk_x = prg.uint64(x.shape) << U64(n_bits)
        junk_a = prg.uint64(alpha.shape) << U64(n_bits)
        x, alpha = x ^ junk_x, alpha ^ junk_a
    return alpha, x


@pytest.fixture(params=["bulk", "streaming"])
def eval_mode(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Run a test through both code paths: one chunk with all public bits precomputed,
    and many small chunks (gen and eval) with per-level bit extraction."""
    bulk = request.param == "bulk"
    monkeypatch.setattr(fss, "_BULK_ELEMENTS", 1 << 62 if bulk else 0)
    monkeypatch.setattr(fss, "_GEN_CHUNK", 1 << 30 if bulk else 97)
    monkeypatch.setattr(fss, "_EVAL_CHUNK", 1 << 30 if bulk else 61)
    return str(request.param)


@pytest.mark.parametrize("n_bits", [1, 2, 8, 28, 64])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_shares_sum_to_beta_times_comparison(n_bits: int, k: int, eval_mode: str) -> None:
    prg = _prg(f"correct/{n_bits}/{k}")
    alpha, x = _cases(n_bits, prg)
    beta = prg.uint64((alpha.size, k))
    keys = dcf_gen(alpha, beta, n_bits=n_bits, prg=prg)
    want = _expected(alpha, beta, x, n_bits)
    assert np.array_equal(_both(keys, x), want)
    lt = ((x & _mask(n_bits)) < (alpha & _mask(n_bits)))
    if n_bits > 1:
        assert 0 < lt.sum() < lt.size  # both branches were exercised


@pytest.mark.parametrize("n_bits", [1, 5, 64])
def test_exhaustive_small_and_extreme_points(n_bits: int, eval_mode: str) -> None:
    """Every x for n = 1 and 5; for n = 64 the points around 0, alpha and 2^64 - 1."""
    prg = _prg(f"exhaustive/{n_bits}")
    if n_bits <= 8:
        vals = np.arange(1 << n_bits, dtype=U64)
        alpha, x = np.repeat(vals, vals.size), np.tile(vals, vals.size)
    else:
        top = 2**64 - 1
        pts = [0, 1, 2**63 - 1, 2**63, 2**63 + 1, top - 1, top]
        alpha = np.repeat(np.array(pts, dtype=U64), len(pts))
        x = np.tile(np.array(pts, dtype=U64), len(pts))
    beta = prg.uint64((alpha.size, 2))
    keys = dcf_gen(alpha, beta, n_bits=n_bits, prg=prg)
    assert np.array_equal(_both(keys, x), _expected(alpha, beta, x, n_bits))


def test_explicit_edge_values() -> None:
    n = 10
    top = (1 << n) - 1
    alpha = np.array([0, 0, top, top, top, 1, 1, 517, 517, 517], dtype=U64)
    x = np.array([0, top, top, top - 1, 0, 0, 1, 517, 516, 518], dtype=U64)
    want_lt = np.array([0, 0, 0, 1, 1, 1, 0, 0, 1, 0], dtype=bool)
    beta = np.full((x.size, 1), 12345, dtype=U64)
    keys = dcf_gen(alpha, beta, n_bits=n, prg=_prg("explicit"))
    assert np.array_equal(_both(keys, x)[:, 0], np.where(want_lt, U64(12345), U64(0)))


def test_high_bits_of_x_do_not_change_either_share(eval_mode: str) -> None:
    prg = _prg("highbits")
    n = 20
    alpha, beta = prg.uint64(200), prg.uint64((200, 3))
    keys = dcf_gen(alpha, beta, n_bits=n, prg=prg)
    x = prg.uint64(200)
    x_low = x & _mask(n)
    for key in keys:
        assert np.array_equal(dcf_eval(key, x), dcf_eval(key, x_low))


def test_int64_inputs_are_read_as_ring_elements() -> None:
    prg = _prg("int64")
    alpha, beta, x = prg.uint64(64), prg.uint64((64, 2)), prg.uint64(64)
    keys = dcf_gen(alpha.view(np.int64), beta.view(np.int64), n_bits=64, prg=prg)
    total = dcf_eval(keys[0], x.view(np.int64)) + dcf_eval(keys[1], x)
    assert np.array_equal(total, _expected(alpha, beta, x, 64))


def test_empty_batch() -> None:
    keys = dcf_gen(np.zeros(0, U64), np.zeros((0, 3), U64), n_bits=16, prg=_prg("empty"))
    assert dcf_eval(keys[0], np.zeros(0, U64)).shape == (0, 3)
    assert DcfKey.from_bytes(keys[1].to_bytes()).num == 0


def test_gen_draws_its_seeds_from_the_prg_and_nothing_else() -> None:
    """Gen consumes exactly the two 16-byte root seeds per instance from ``prg``."""
    n_inst = 37
    prg, twin = _prg("draws"), _prg("draws")
    dcf_gen(np.zeros(n_inst, U64), np.ones((n_inst, 1), U64), n_bits=12, prg=prg)
    twin.bytes(2 * 16 * n_inst)
    assert prg.bytes(32) == twin.bytes(32)


def test_same_prg_seed_same_keys_and_fresh_seeds_differ() -> None:
    alpha, beta = np.arange(50, dtype=U64), np.ones((50, 1), U64)
    a0, a1 = dcf_gen(alpha, beta, n_bits=8, prg=_prg("det"))
    b0, _ = dcf_gen(alpha, beta, n_bits=8, prg=_prg("det"))
    c0, _ = dcf_gen(alpha, beta, n_bits=8, prg=Prg.from_os())
    assert a0.to_bytes() == b0.to_bytes()
    assert not np.array_equal(a0.seed, c0.seed)
    # the correction words are common to both keys; only the root seed differs
    assert (a0.party, a1.party) == (0, 1)
    assert not np.array_equal(a0.seed, a1.seed)
    for name in ("cw_seed", "cw_v", "cw_t", "cw_last"):
        assert np.array_equal(getattr(a0, name), getattr(a1, name))


def test_single_party_shares_look_uniform() -> None:
    """A light sanity check: one party's output bits are balanced whether x < alpha or not,
    and its share is never the plain answer (0 or beta)."""
    prg = _prg("uniform")
    n_inst, n = 4000, 16
    alpha = np.full(n_inst, 1 << 15, dtype=U64)
    x = np.where(np.arange(n_inst) % 2 == 0, U64(5), U64(50000))  # half below, half above
    beta = np.ones((n_inst, 1), U64)
    keys = dcf_gen(alpha, beta, n_bits=n, prg=prg)
    for key in keys:
        share = dcf_eval(key, x)[:, 0]
        assert not np.isin(share, [0, 1]).any()
        for below in (True, False):
            s = share[(x < alpha) == below]
            for bit in (0, 1, 31, 32, 62, 63):
                freq = float(((s >> U64(bit)) & U64(1)).mean())
                assert abs(freq - 0.5) < 0.06, (key.party, below, bit, freq)
    # the seeds themselves are balanced too (control-bit slot, bit 0, is always clear)
    seeds = keys[0].seed
    assert not (seeds[:, 0] & U64(1)).any()
    assert abs(float(((seeds[:, 1] >> U64(63)) & U64(1)).mean()) - 0.5) < 0.06


def test_key_sizes_match_the_cost_formula() -> None:
    prg = _prg("size")
    for n_inst, n, k in [(256, 28, 3), (100, 62, 1), (8, 1, 2)]:
        key, _ = dcf_gen(prg.uint64(n_inst), prg.uint64((n_inst, k)), n_bits=n, prg=prg)
        data = key.to_bytes()
        assert key.nbytes == len(data)
        per_instance = 16 + n * (16 + 8 * k) + 8 * k
        assert len(data) == 24 + n_inst * per_instance + (2 * n * n_inst + 7) // 8


def test_serialization_round_trip() -> None:
    prg = _prg("serde")
    alpha, beta, x = prg.uint64(101), prg.uint64((101, 3)), prg.uint64(101)
    keys = dcf_gen(alpha, beta, n_bits=28, prg=prg)
    for key in keys:
        data = key.to_bytes()
        for blob in (data, bytearray(data), memoryview(data)):
            back = DcfKey.from_bytes(blob)
            assert (back.party, back.n_bits, back.k, back.num) == (key.party, 28, 3, 101)
            for f in dataclasses.fields(DcfKey):
                assert np.array_equal(getattr(back, f.name), getattr(key, f.name)), f.name
            assert np.array_equal(dcf_eval(back, x), dcf_eval(key, x))
            assert back.to_bytes() == data
    # a key built from plain C-ordered arrays serializes identically
    k0 = keys[0]
    plain = DcfKey(party=0, n_bits=28, k=3, seed=np.array(k0.seed), cw_seed=np.array(k0.cw_seed),
                   cw_v=np.array(k0.cw_v), cw_t=np.array(k0.cw_t), cw_last=np.array(k0.cw_last))
    assert plain.to_bytes() == k0.to_bytes()
    assert np.array_equal(dcf_eval(plain, x), dcf_eval(k0, x))


def test_from_bytes_does_not_alias_a_mutable_buffer() -> None:
    key, _ = dcf_gen(np.arange(9, dtype=U64), np.ones((9, 1), U64), n_bits=4, prg=_prg("alias"))
    buf = bytearray(key.to_bytes())
    back = DcfKey.from_bytes(buf)
    buf[24:] = bytes(len(buf) - 24)
    assert np.array_equal(back.seed, key.seed)


def _valid_blob() -> bytes:
    key, _ = dcf_gen(np.arange(5, dtype=U64), np.ones((5, 2), U64), n_bits=3, prg=_prg("blob"))
    return key.to_bytes()  # 2*n*N = 30 t bits: the last byte has 2 padding bits


def _with_header(data: bytes, **fields: int) -> bytes:
    magic, version, party, n, k, num = struct.unpack_from("<4sHBBIQ", data)
    vals = dict(version=version, party=party, n=n, k=k, num=num) | fields
    head = struct.pack("<4sHBBIQ4x", magic, vals["version"], vals["party"], vals["n"], vals["k"], vals["num"])
    return head + data[24:]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d[:10],
        lambda d: d[:-1],
        lambda d: d + b"\x00",
        lambda d: b"XXXX" + d[4:],
        lambda d: _with_header(d, version=2),
        lambda d: _with_header(d, party=2),
        lambda d: _with_header(d, n=0),
        lambda d: _with_header(d, n=65),
        lambda d: _with_header(d, k=0),
        lambda d: _with_header(d, k=3),
        lambda d: _with_header(d, num=2**60),
        lambda d: d[:-1] + bytes([d[-1] | 0x80]),  # a padding bit set
        lambda d: b"",
    ],
)
def test_malformed_bytes_raise_protocol_error(mutate: object) -> None:
    data = _valid_blob()
    DcfKey.from_bytes(data)
    with pytest.raises(ProtocolError):
        DcfKey.from_bytes(mutate(data))  # type: ignore[operator]


def test_from_bytes_rejects_non_bytes() -> None:
    with pytest.raises(ProtocolError):
        DcfKey.from_bytes("not bytes")  # type: ignore[arg-type]


def test_invalid_arguments() -> None:
    prg = _prg("args")
    a, b = np.zeros(4, U64), np.zeros((4, 2), U64)
    for bad_n in (0, 65, True, 8.0, None):
        with pytest.raises(InvalidArgumentError):
            dcf_gen(a, b, n_bits=bad_n, prg=prg)  # type: ignore[arg-type]
    for bad_a in (np.zeros(4, np.float64), np.zeros(4, np.int32), np.zeros((4, 1), U64), [0, 0, 0, 0]):
        with pytest.raises(ShapeError):
            dcf_gen(bad_a, b, n_bits=8, prg=prg)  # type: ignore[arg-type]
    for bad_b in (np.zeros(4, U64), np.zeros((3, 2), U64), np.zeros((4, 0), U64), np.zeros((4, 2), np.float32)):
        with pytest.raises(ShapeError):
            dcf_gen(a, bad_b, n_bits=8, prg=prg)
    with pytest.raises(InvalidArgumentError):
        dcf_gen(a, b, n_bits=8, prg=b"seed")  # type: ignore[arg-type]
    key, _ = dcf_gen(a, b, n_bits=8, prg=prg)
    for bad_x in (np.zeros(5, U64), np.zeros((4, 1), U64), np.zeros(4, np.float64)):
        with pytest.raises(ShapeError):
            dcf_eval(key, bad_x)
    with pytest.raises(InvalidArgumentError):
        dcf_eval(key.to_bytes(), np.zeros(4, U64))  # type: ignore[arg-type]
    with pytest.raises(ShapeError):
        dataclasses.replace(key, cw_v=np.zeros((8, 4, 3), U64))
    with pytest.raises(InvalidArgumentError):
        dataclasses.replace(key, party=2)


def test_repr_shows_no_key_material() -> None:
    key, _ = dcf_gen(np.arange(3, dtype=U64), np.ones((3, 1), U64), n_bits=8, prg=_prg("repr"))
    text = repr(key)
    assert "DcfKey" in text and "party=0" in text
    assert str(int(key.seed[0, 0])) not in text and "array" not in text
