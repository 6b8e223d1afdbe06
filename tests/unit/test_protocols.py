"""Protocols on the in-process transport, for n = 2 and n = 3 parties."""

from __future__ import annotations

import pytest
import torch

from secureinfer import ring
from secureinfer.dealer.material import BundleBuilder, gate_material, linear_material, triple_material, trunc_material
from secureinfer.prg import Prg
from secureinfer.protocols.arith import beaver_mul, linear_fixed, truncate
from secureinfer.protocols.compare import (
    argmax_material,
    argmax_onehot,
    gate,
    gate_params,
    max_pair,
    max_pair_material,
)
from secureinfer.sharing import reconstruct, share

from .mpc import run_parties

NS = [2, 3]
F = 16


def _shares(x: torch.Tensor, n: int) -> list[torch.Tensor]:
    return share(x, n, prg=Prg.from_os())


def _methods(n: int) -> list[str]:
    return ["fss", "bitwise"] if n == 2 else ["bitwise"]


@pytest.mark.parametrize("n", NS)
def test_sharing_roundtrip(n: int) -> None:
    x = ring.encode(torch.linspace(-100, 100, 57), frac_bits=F)
    assert torch.equal(reconstruct(_shares(x, n)), x)


@pytest.mark.parametrize("n", NS)
def test_beaver_mul(n: int) -> None:
    x = torch.tensor([[3, -7, 2**40]], dtype=torch.int64)
    y = torch.tensor([[5], [-11]], dtype=torch.int64)
    xs, ys = _shares(x, n), _shares(y, n)
    b = BundleBuilder(n)
    triple_material(b, "m", a_shape=x.shape, b_shape=y.shape)
    res, sess = run_parties(n, lambda s, bd: beaver_mul(s, xs[s.party_id], ys[s.party_id], bd, "m"), builder=b)
    assert torch.equal(reconstruct(res), x * y)
    assert sess[0].costs.rounds == 1


@pytest.mark.parametrize("n", NS)
def test_linear_fixed_weight_mask(n: int) -> None:
    x = ring.encode(torch.randn(4, 9), frac_bits=F)
    w = ring.encode(torch.randn(9, 5), frac_bits=F)
    b = BundleBuilder(n)
    mask = b.random("model/B", w.shape)  # stands in for the deployment mask
    e = w - mask
    linear_material(b, "fc", input_shape=x.shape, mask=mask, op=ring.matmul)
    xs = _shares(x, n)

    def party(s, bd):
        local = bd.share("model/B", w.shape) + (e if s.party_id == 0 else 0)
        return linear_fixed(s, xs[s.party_id], bundle=bd, name="fc", public_mask_diff=ring.prepare(e),
                            local_operand=ring.prepare(local), op=ring.matmul, out_shape=(4, 5))

    res, sess = run_parties(n, party, builder=b)
    assert torch.equal(reconstruct(res), ring.matmul(x, w))
    assert sess[0].costs.rounds == 1
    assert sess[0].costs.bytes_sent == 8 * x.numel() * (n - 1)


@pytest.mark.parametrize("n", NS)
def test_truncation_error_at_most_one_ulp(n: int) -> None:
    x = torch.cat([torch.tensor([0, 1, -1, 2**61, -(2**61), 2**62 - 1, -(2**62)]),
                   Prg.from_os().ring(5000) >> 2])
    b = BundleBuilder(n)
    trunc_material(b, "t", shape=x.shape, frac=F)
    xs = _shares(x, n)
    res, _ = run_parties(n, lambda s, bd: truncate(s, xs[s.party_id], bundle=bd, name="t", frac=F), builder=b)
    err = reconstruct(res) - (x >> F)
    assert int(err.min()) >= 0 and int(err.max()) <= 1  # floor, or one ulp above


@pytest.mark.parametrize("n", NS)
def test_sign_gate(n: int) -> None:
    scale = 2 * F
    ell, cut = gate_params(scale)
    vals = torch.tensor([0, 1, -1, 2**cut, -(2**cut) - 1, 5 * 2**40, -(5 * 2**40), 2**ell - 2**cut - 1, -(2**ell)])
    x = torch.cat([vals, (Prg.from_os().ring(300) >> (64 - ell))])
    expect = (x >= 0).long()
    tol = (x < 0) & (x >= -(2**cut))  # documented: may read as non-negative
    for method in _methods(n):
        b = BundleBuilder(n)
        gate_material(b, "g", shape=x.shape, ell=ell, cut=cut, payload="sign", frac=0, method=method)
        xs = _shares(x, n)
        res, sess = run_parties(n, lambda s, bd: gate(s, xs[s.party_id], bundle=bd, name="g", payload="sign",
                                                       scale=scale, method=method), builder=b)
        got = reconstruct(res)
        assert torch.equal(got[~tol], expect[~tol]), method
        if method == "fss":
            assert sess[0].costs.rounds == 1


@pytest.mark.parametrize("n", NS)
def test_relu_and_relu_trunc(n: int) -> None:
    real = torch.cat([torch.linspace(-50, 50, 201), torch.tensor([0.0, 1e-3, -1e-3])])
    x = ring.encode(real, frac_bits=2 * F, max_abs=1e4)
    ell, cut = gate_params(2 * F)
    for method in _methods(n):
        for payload in ("relu", "relu_trunc"):
            b = BundleBuilder(n)
            frac = F if payload == "relu_trunc" else 0
            gate_material(b, "g", shape=x.shape, ell=ell, cut=cut, payload=payload, frac=frac, method=method)
            xs = _shares(x, n)
            res, _ = run_parties(n, lambda s, bd: gate(s, xs[s.party_id], bundle=bd, name="g", payload=payload,
                                                           scale=2 * F, frac=frac, method=method), builder=b)
            out_scale = F if payload == "relu_trunc" else 2 * F
            got = ring.decode(reconstruct(res), frac_bits=out_scale)
            assert torch.allclose(got, torch.relu(real).double(), atol=2.0 ** -11), (method, payload)


@pytest.mark.parametrize("n", NS)
def test_max_and_argmax(n: int) -> None:
    real = torch.tensor([[0.5, -2.0, 3.25, 3.0], [-1.0, -0.5, -3.0, -0.75], [7.0, 7.5, -8.0, 0.0]])
    x = ring.encode(real, frac_bits=F)
    for method in _methods(n):
        b = BundleBuilder(n)
        max_pair_material(b, "mx", shape=(3, 2), scale=F, method=method)
        argmax_material(b, "am", batch_shape=(3,), kdim=4, scale=F, method=method)
        xs = _shares(x, n)

        def party(s, bd):
            xi = xs[s.party_id]
            m = max_pair(s, xi[:, 0::2], xi[:, 1::2], bundle=bd, name="mx", scale=F, method=method)
            a = argmax_onehot(s, xi, bundle=bd, name="am", scale=F, method=method)
            return m, a

        res, sess = run_parties(n, party, builder=b)
        mx = ring.decode(reconstruct([r[0] for r in res]), frac_bits=F)
        assert torch.allclose(mx, torch.maximum(real[:, 0::2], real[:, 1::2]).double())
        onehot = reconstruct([r[1] for r in res])
        assert torch.equal(onehot.argmax(-1), real.argmax(-1)) and int(onehot.sum()) == 3
        if method == "fss":
            assert sess[0].costs.rounds == 3


def test_truncation_ten_million_elements_no_large_error() -> None:
    """DESIGN: truncation never produces a large error; checked on 10^7 elements."""
    n_el = 10_000_000
    x = Prg.from_os().ring(n_el) >> 2  # uniform over [-2^61, 2^61): the whole safe range scale
    b = BundleBuilder(2)
    trunc_material(b, "t", shape=x.shape, frac=F)
    xs = _shares(x, 2)
    res, _ = run_parties(2, lambda s, bd: truncate(s, xs[s.party_id], bundle=bd, name="t", frac=F), builder=b,
                         timeout=120)
    err = reconstruct(res) - (x >> F)
    assert int(err.min()) >= 0 and int(err.max()) <= 1
