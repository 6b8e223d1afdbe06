"""Issue 14, findings 3 and 7: the gates' ranges under adversarial and edge inputs.

Finding 3: the DP clip gated on ``x - C`` with ``ell = f + 15``, so a logit of 65539.25
passed through unclipped. The clip now gates over the whole ring (``ell = 63``); these
tests feed it every kind of ring value a client could drive the logits to and check the
output never leaves ``[-C, C]``.

Finding 7: max, max-pool, argmax and softmax gated on ``a - b`` with 15 integer bits, so
``max(20000, -20000)`` returned -20000. Differences now get 16 bits; the tests sit at the
edges of the stated range ``|x| < 2^15``.
"""

from __future__ import annotations

import pytest
import torch

import secureinfer.engine.ops_nonlinear  # noqa: F401  (registers softmax)
from secureinfer import ring
from secureinfer.dealer.material import BundleBuilder, gate_material
from secureinfer.graph.ir import Graph, Node, TensorSpec
from secureinfer.prg import Prg
from secureinfer.protocols import approx
from secureinfer.protocols.compare import (
    argmax_material,
    argmax_onehot,
    clip,
    clip_material,
    full_range_int_bits,
    gate,
    gate_params,
    max_pair,
    max_pair_material,
)
from secureinfer.sharing import reconstruct, share

from .mpc import run_parties
from .test_ops_cnn import run_secure

F = 16
CASES = [(2, "fss"), (2, "bitwise"), (3, "bitwise")]


def _adversarial_ring_values() -> torch.Tensor:
    """Ring elements a client can reach by choosing its shares: the extremes, the values
    just past the old gate range, and uniform 64-bit words."""
    big = [
        0, 1, -1, 2**62, -(2**62), 2**63 - 1, -(2**63), -(2**63) + 1, 2**63 - 2**20,
        2**31, -(2**31), 2**31 + 12345, -(2**31) - 12345, 2**47, -(2**47),
        round(65539.25 * 2**F), -round(65539.25 * 2**F), round(8.5 * 2**F), -round(8.5 * 2**F),
        round(7.99 * 2**F), -round(7.99 * 2**F), round(8 * 2**F), -round(8 * 2**F),
    ]
    return torch.cat([torch.tensor(big, dtype=torch.int64), Prg.from_os().ring(2000)])


@pytest.mark.parametrize(("n", "method"), CASES)
def test_full_range_sign_gate_is_exact_for_every_ring_value(n: int, method: str) -> None:
    ib = full_range_int_bits(F)
    ell, cut = gate_params(F, int_bits=ib)
    assert (ell, cut) == (63, 0)  # all 63 bits: a cut would misread the top 2^cut values
    x = _adversarial_ring_values()
    b = BundleBuilder(n)
    gate_material(b, "g", shape=x.shape, ell=ell, cut=cut, payload="sign", frac=0, method=method)
    xs = share(x, n, prg=Prg.from_os())
    res, _ = run_parties(n, lambda s, bd: gate(s, xs[s.party_id], bundle=bd, name="g", payload="sign", scale=F,
                                               method=method, int_bits=ib), builder=b)
    assert torch.equal(reconstruct(res), (x >= 0).long())


@pytest.mark.parametrize(("n", "method"), CASES)
def test_clip_output_in_bound_for_adversarial_ring_values(n: int, method: str) -> None:
    bound = 8 * 2**F
    x = _adversarial_ring_values()
    b = BundleBuilder(n)
    clip_material(b, "c", shape=tuple(x.shape), scale=F, method=method)
    xs = share(x, n, prg=Prg.from_os())
    res, _ = run_parties(n, lambda s, bd: clip(s, xs[s.party_id], bound=bound, bundle=bd, name="c", scale=F,
                                               method=method), builder=b)
    got = reconstruct(res)
    assert int(got.min()) >= -bound and int(got.max()) <= bound  # the attack of finding 3 fails
    # and it is the clip: in range the value itself, outside it the nearer bound. Ring
    # values within C of -2^63 wrap when C is subtracted and clip to +C, which is still
    # in bound; the exact values are checked where x - C and x + C do not wrap.
    inside = (x > -bound) & (x < bound)
    assert torch.equal(got[inside], x[inside])
    no_wrap = (x >= -(2**63) + bound) & (x <= 2**63 - 1 - bound)
    assert bool((got[(x >= bound) & no_wrap] == bound).all())
    assert bool((got[(x <= -bound) & no_wrap] == -bound).all())
    assert int(got[(x == round(65539.25 * 2**F)).nonzero()[0]]) == bound


def test_clip_refuses_nonpositive_bound() -> None:
    b = BundleBuilder(2)
    clip_material(b, "c", shape=(1,), scale=F, method="fss")
    xs = share(torch.zeros(1, dtype=torch.int64), 2, prg=Prg.from_os())
    with pytest.raises(ValueError, match="positive"):
        run_parties(2, lambda s, bd: clip(s, xs[s.party_id], bound=0, bundle=bd, name="c", scale=F), builder=b)


def test_relu_trunc_refuses_the_full_range() -> None:
    b = BundleBuilder(2)
    gate_material(b, "g", shape=(1,), ell=62, cut=4, payload="relu_trunc", frac=F, method="fss")
    xs = share(torch.zeros(1, dtype=torch.int64), 2, prg=Prg.from_os())
    with pytest.raises(ValueError, match="relu_trunc"):
        run_parties(2, lambda s, bd: gate(s, xs[s.party_id], bundle=bd, name="g", payload="relu_trunc", scale=F,
                                          frac=F, int_bits=full_range_int_bits(F)), builder=b)


# ----------------------------------------------------------------------------- finding 7

EDGE = torch.tensor([
    [20000.0, -20000.0], [-20000.0, 20000.0], [32767.0, -32767.0], [-32767.0, 32767.0],
    [-32767.5, -32767.0], [32767.0, 32766.5], [0.0, -32767.0], [1e-3, -32767.0],
])


@pytest.mark.parametrize(("n", "method"), CASES)
def test_max_and_argmax_at_the_edges_of_the_range(n: int, method: str) -> None:
    x = ring.encode(EDGE, frac_bits=F)
    b = BundleBuilder(n)
    max_pair_material(b, "mx", shape=(x.shape[0], 1), scale=F, method=method)
    argmax_material(b, "am", batch_shape=(x.shape[0],), kdim=2, scale=F, method=method)
    xs = share(x, n, prg=Prg.from_os())

    def party(s, bd):
        xi = xs[s.party_id]
        return (max_pair(s, xi[:, :1], xi[:, 1:], bundle=bd, name="mx", scale=F, method=method),
                argmax_onehot(s, xi, bundle=bd, name="am", scale=F, method=method))

    res, _ = run_parties(n, party, builder=b)
    mx = ring.decode(reconstruct([r[0] for r in res]), frac_bits=F).squeeze(-1)
    assert torch.equal(mx, ring.decode(x, frac_bits=F).max(-1).values)  # max(20000, -20000) = 20000
    onehot = reconstruct([r[1] for r in res])
    assert torch.equal(onehot.argmax(-1), EDGE.argmax(-1)) and torch.equal(onehot.sum(-1), torch.ones(8).long())


def test_maxpool_and_argmax_through_the_engine_at_the_edges() -> None:
    # a padded window whose real values are all below the old pad (-16384) and a window
    # spanning the whole range; argmax over logits 40000 apart
    pool = {"kernel_size": [2, 2], "stride": [2, 2], "padding": [1, 1]}
    g = Graph([TensorSpec("input", (-1, 1, 2, 2))], [Node("mp", "maxpool2d", ("input",), pool),
                                                      Node("fl", "flatten", ("mp",), {"start_dim": 1})], ["fl"])
    x = torch.tensor([[[[-20000.0, -30000.0], [-25000.0, -32000.0]]],
                      [[[20000.0, -20000.0], [-32767.0, 32767.0]]]])
    got, _ = run_secure(g, x, 2, argmax=True)
    ref = torch.nn.functional.max_pool2d(x.double(), 2, 2, padding=1).flatten(1)
    assert torch.equal(got["logits"], ref)
    assert torch.equal(got["argmax"].argmax(-1), ref.argmax(-1))


@pytest.mark.parametrize("n", [2, 3])
def test_softmax_with_logits_far_apart(n: int) -> None:
    real = torch.tensor([[20000.0, -20000.0, 0.0], [-32767.0, 32767.0, 32766.0], [-20000.0, -20001.0, -20000.0]],
                        dtype=torch.float64)
    x = ring.encode(real, frac_bits=F)
    method = "fss" if n == 2 else "bitwise"
    spec = approx.describe("softmax", tuple(x.shape), scale=F, method=method)
    b = BundleBuilder(n)
    approx.material("softmax", b, "sm", shape=tuple(x.shape), scale=F)
    xs = share(x, n, prg=Prg.from_os())
    res, sess = run_parties(n, lambda s, bd: approx.run("softmax", s, xs[s.party_id], bd, "sm", scale=F), builder=b)
    assert sess[0].costs.rounds == spec.rounds
    got = ring.decode(reconstruct(res), frac_bits=spec.scale)
    assert (got - torch.softmax(real, -1)).abs().max() <= 1e-4
