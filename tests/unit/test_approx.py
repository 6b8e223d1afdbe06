"""Nonlinear approximations and secret x secret products against torch, n = 2 and n = 3.

Every approximation is checked on a dense grid over its documented range (the bounds
below are the ones stated in ``secureinfer.protocols.approx``), and the online rounds a
party counts must equal what ``describe`` (the dealer's view) predicts. Grid points are
multiples of 2^-16, so the fixed-point input is exact and torch's value is the reference.
n = 3 uses the bitwise comparison (slower): coarser grids by default, dense ones under
``-m slow``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import secureinfer.engine.ops_nonlinear  # noqa: F401  (registers the ops even without engine.ops' import)
from secureinfer import ring
from secureinfer.dealer.material import BundleBuilder, PartyBundle
from secureinfer.engine.ops import gate_rounds
from secureinfer.engine.plan import compile_plan, fixed_operand_shapes, generate_request_material
from secureinfer.engine.runner import PartyModel, encode_params, open_masks, run_plan
from secureinfer.errors import UnsupportedModelError
from secureinfer.graph.ir import Graph, Node, TensorSpec
from secureinfer.prg import Prg
from secureinfer.protocols import approx
from secureinfer.sharing import reconstruct, share

from .mpc import run_parties

NS = [2, 3]
F16 = 16
# documented max errors (protocols/approx.py module table)
BOUND = {"tanh": 1e-4, "sigmoid": 5e-5, "gelu": 1.5e-4}


def q16(t: torch.Tensor) -> torch.Tensor:
    """Round to the fixed-point grid so the reference sees the exact secure input."""
    return torch.round(t.double() * 2**F16) / 2**F16


def secure(kind: str, real: torch.Tensor, n: int, **kw) -> torch.Tensor:
    """Run program ``kind`` on shares of ``real``; checks rounds == describe().rounds."""
    x = ring.encode(real, frac_bits=F16)
    method = "fss" if n == 2 else "bitwise"
    spec = approx.describe(kind, tuple(x.shape), scale=F16, method=method, **kw)
    b = BundleBuilder(n)
    approx.material(kind, b, "op", shape=tuple(x.shape), scale=F16, **kw)
    xs = share(x, n, prg=Prg.from_os())
    res, sess = run_parties(n, lambda s, bd: approx.run(kind, s, xs[s.party_id], bd, "op", scale=F16, **kw),
                            builder=b)
    assert sess[0].costs.rounds == spec.rounds
    assert tuple(res[0].shape) == spec.shape
    return ring.decode(reconstruct(res), frac_bits=spec.scale)


# ----------------------------------------------------------------------------- products


@pytest.mark.parametrize("n", NS)
def test_mul_square_exact_and_rounds(n: int) -> None:
    prg = Prg.from_os()
    x = prg.ring((3, 4)) >> 34  # |x| < 2^30
    y = prg.ring((3, 1)) >> 34
    b = BundleBuilder(n)
    approx.mul_material(b, "m", x_shape=x.shape, y_shape=y.shape)
    approx.mul_material(b, "mt", x_shape=x.shape, y_shape=y.shape, frac=F16)
    approx.square_material(b, "sq", shape=x.shape)
    xs, ys = share(x, n, prg=prg), share(y, n, prg=prg)

    def party(s, bd):
        xi, yi = xs[s.party_id], ys[s.party_id]
        r0 = s.costs.rounds
        m = approx.mul(s, xi, yi, bd, "m")
        assert s.costs.rounds - r0 == 1
        mt = approx.mul(s, xi, yi, bd, "mt", frac=F16)
        assert s.costs.rounds - r0 == 3
        return m, mt, approx.square(s, xi, bd, "sq")

    res, _ = run_parties(n, party, builder=b)
    m, mt, sq = (reconstruct([r[i] for r in res]) for i in range(3))
    assert torch.equal(m, x * y) and torch.equal(sq, x * x)
    err = mt - ((x * y) >> F16)
    assert int(err.min()) >= 0 and int(err.max()) <= 1


@pytest.mark.parametrize("n", NS)
def test_secret_matmul_exact_with_broadcasting(n: int) -> None:
    prg = Prg.from_os()
    cases = [((2, 3, 4), (4, 5)), ((2, 3, 4), (2, 4, 5)), ((3, 4), (1, 4, 2))]
    b = BundleBuilder(n)
    data = []
    for i, (sa, sb) in enumerate(cases):
        x, y = prg.ring(sa) >> 40, prg.ring(sb) >> 40
        approx.matmul_material(b, f"mm{i}", x_shape=sa, y_shape=sb)
        data.append((x, y, share(x, n, prg=prg), share(y, n, prg=prg)))

    def party(s, bd):
        return [approx.matmul(s, xs[s.party_id], ys[s.party_id], bd, f"mm{i}") for i, (_, _, xs, ys) in enumerate(data)]

    res, sess = run_parties(n, party, builder=b)
    for i, (x, y, _, _) in enumerate(data):
        assert torch.equal(reconstruct([r[i] for r in res]), ring.matmul(x, y))
    assert sess[0].costs.rounds == len(cases)


@pytest.mark.parametrize("n", NS)
def test_leaky_relu(n: int) -> None:
    real = q16(torch.linspace(-100, 100, 801))
    x = ring.encode(real, frac_bits=F16)
    b = BundleBuilder(n)
    approx.leaky_relu_material(b, "lr", shape=x.shape, scale=F16)
    xs = share(x, n, prg=Prg.from_os())
    res, sess = run_parties(n, lambda s, bd: approx.leaky_relu(s, xs[s.party_id], bd, "lr", scale=F16, slope=0.1),
                            builder=b)
    assert sess[0].costs.rounds == gate_rounds("fss" if n == 2 else "bitwise", F16)
    got = ring.decode(reconstruct(res), frac_bits=2 * F16)
    # the slope is encoded with 16 bits: |a_enc - a| <= 2^-17
    assert ((got - F.leaky_relu(real, 0.1)).abs() <= 2.0**-17 * real.abs() + 2.0**-30).all()


# ----------------------------------------------------------------------------- approximations


def _piecewise_grid(kind: str, points: int) -> torch.Tensor:
    """[-2B, 2B] (B: the end of the polynomial piece) with about ``points`` points, plus far values."""
    bound = {"tanh": 5.0, "sigmoid": 10.0, "gelu": 4.0}[kind]
    step = 2.0 ** -int(np.log2(points / (4 * bound)))
    inner = torch.arange(-2 * bound, 2 * bound + step, step, dtype=torch.float64)
    wide = torch.tensor([-32000.0, -1000.5, -50.0, 50.0, 999.25, 32000.0], dtype=torch.float64)
    return torch.cat([inner, wide])


@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("kind,ref", [("tanh", torch.tanh), ("sigmoid", torch.sigmoid), ("gelu", F.gelu)])
def test_piecewise_activations_vs_torch(kind: str, ref, n: int) -> None:
    x = _piecewise_grid(kind, 8192 if n == 2 else 1024)
    err = (secure(kind, x, n) - ref(x)).abs().max().item()
    assert err <= BOUND[kind], (kind, err)


@pytest.mark.slow
@pytest.mark.parametrize("kind,ref", [("tanh", torch.tanh), ("sigmoid", torch.sigmoid), ("gelu", F.gelu)])
@pytest.mark.parametrize("n", NS)
def test_piecewise_activations_dense(kind: str, ref, n: int) -> None:
    x = _piecewise_grid(kind, 2**17 if n == 2 else 2**15)
    assert (secure(kind, x, n) - ref(x)).abs().max().item() <= BOUND[kind]


@pytest.mark.parametrize("n", NS)
def test_exp_over_its_range(n: int) -> None:
    step = 2.0**-8 if n == 2 else 2.0**-4
    x = torch.arange(-384.0, 4.0 + step, step, dtype=torch.float64)
    got, ref = secure("exp", x, n), torch.exp(x)
    neg = x <= 0
    assert (got[neg] - ref[neg]).abs().max() <= 5e-6
    assert ((got[~neg] - ref[~neg]) / ref[~neg]).abs().max() <= 2e-4


def _log_grid(points: int) -> torch.Tensor:
    """[2^-8, 2^15): the documented range of reciprocal and rsqrt."""
    return q16(2.0 ** torch.linspace(-8.0, 14.999, points, dtype=torch.float64))


@pytest.mark.parametrize("n", NS)
def test_reciprocal_relative_error(n: int) -> None:
    x = _log_grid(4001 if n == 2 else 401)
    assert ((secure("reciprocal", x, n) * x) - 1).abs().max() <= 2e-5


@pytest.mark.parametrize("n", NS)
def test_rsqrt_relative_error(n: int) -> None:
    x = _log_grid(4001 if n == 2 else 401)
    assert ((secure("rsqrt", x, n) * x.sqrt()) - 1).abs().max() <= 1e-5


@pytest.mark.slow
@pytest.mark.parametrize("n", NS)
def test_reciprocal_rsqrt_dense(n: int) -> None:
    x = _log_grid(50001 if n == 2 else 10001)
    assert ((secure("reciprocal", x, n) * x) - 1).abs().max() <= 2e-5
    assert ((secure("rsqrt", x, n) * x.sqrt()) - 1).abs().max() <= 1e-5


@pytest.mark.parametrize("n", NS)
def test_softmax_vs_torch(n: int) -> None:
    torch.manual_seed(1)
    for k in (1, 2, 10, 33):
        x = torch.randn(16, k, dtype=torch.float64) * 6
        x[0] = 0.0  # uniform row
        x[1] = torch.linspace(-1000.0, 12.0, k)  # beyond the clamp at -256
        x = q16(x)
        assert (secure("softmax", x, n) - torch.softmax(x, -1)).abs().max() <= 1e-4, k
    x = q16(torch.randn(3, 5, 4, dtype=torch.float64) * 3)
    assert (secure("softmax", x, n, axis=1) - torch.softmax(x, 1)).abs().max() <= 1e-4


def _layernorm_rows(size: int, rows: int) -> torch.Tensor:
    """Rows with standard deviation 1e-3 .. 200 (variance up to 4e4 < 2^16), random means."""
    z = torch.randn(rows, size, dtype=torch.float64)
    z = (z - z.mean(1, keepdim=True)) / z.std(1, unbiased=False, keepdim=True)
    std = torch.logspace(-3, np.log10(200.0), rows, dtype=torch.float64).unsqueeze(1)
    x = q16(z * std + torch.randn(rows, 1, dtype=torch.float64) * 5)
    x[0] = 1.5  # constant row: output 0
    return x


@pytest.mark.parametrize("n", NS)
def test_layernorm_vs_torch(n: int) -> None:
    torch.manual_seed(2)
    for size in (2, 8, 64, 768):
        x = _layernorm_rows(size, 24)
        ref = F.layer_norm(x, (size,), eps=1e-5)
        assert (secure("layernorm", x, n) - ref).abs().max() <= 3e-4, size


@pytest.mark.slow
@pytest.mark.parametrize("n", NS)
def test_layernorm_wide_rows(n: int) -> None:
    torch.manual_seed(3)
    x = _layernorm_rows(4096, 32)
    assert (secure("layernorm", x, n) - F.layer_norm(x, (4096,), eps=1e-5)).abs().max() <= 3e-4


def test_dealer_sends_party_one_seeds_only() -> None:
    """Seed compression: every correction goes to party 0 (bitwise gates for n = 3)."""
    b = BundleBuilder(3)
    approx.material("layernorm", b, "ln", shape=(2, 8), scale=F16, method="bitwise")
    approx.material("tanh", b, "th", shape=(5,), scale=F16, method="bitwise")
    assert b.tensors[0] and not b.tensors[1] and not b.tensors[2]


# ----------------------------------------------------------------------------- engine


def run_graph(g: Graph, x: torch.Tensor, n: int) -> tuple[torch.Tensor, int]:
    enc = encode_params(g)
    prg = Prg.from_os()
    param_shares = {k: share(v, n, prg=prg) for k, v in enc.items()}
    mb = BundleBuilder(n)
    masks = {k: mb.random(f"{k}/B", s) for k, s in fixed_operand_shapes(g).items()}
    plan = compile_plan(g, batch=x.shape[0], n_parties=n)
    rb = BundleBuilder(n)
    generate_request_material(plan, rb, masks)
    xs = share(ring.encode(x, frac_bits=g.frac_bits), n, prg=prg)

    def party(s, bundle: PartyBundle):
        mine = {k: v[s.party_id] for k, v in param_shares.items()}
        m, d = open_masks(s, g, mine, mb.party_bundle(s.party_id))
        pm = PartyModel(g, party_id=s.party_id, shares=mine, masks=m, diffs=d)
        return run_plan(s, plan, pm, bundle, xs[s.party_id])["logits"]

    res, sess = run_parties(n, party, builder=rb)
    assert sess[0].costs.rounds == plan.rounds() + (1 if masks else 0)
    return ring.decode(reconstruct(res), frac_bits=plan.output_scale), plan.rounds()


def _linear(name: str, fin: int, fout: int, params: dict[str, np.ndarray], rng: np.random.Generator) -> Node:
    # test weights (not secrets): numpy's seeded generator is fine here
    params[f"{name}.weight"] = rng.normal(0, 1 / np.sqrt(fin), (fout, fin))
    params[f"{name}.bias"] = rng.normal(0, 0.1, fout)
    return {"in_features": fin, "out_features": fout, "weight": f"{name}.weight", "bias": f"{name}.bias"}


@pytest.mark.parametrize("n", NS)
def test_engine_activation_mlp_matches_torch(n: int) -> None:
    rng = np.random.default_rng(0)
    p: dict[str, np.ndarray] = {}
    nodes = [
        Node("l1", "linear", ("x",), _linear("l1", 6, 8, p, rng)), Node("a1", "gelu", ("l1",)),
        Node("l2", "linear", ("a1",), _linear("l2", 8, 8, p, rng)), Node("a2", "tanh", ("l2",)),
        Node("l3", "linear", ("a2",), _linear("l3", 8, 8, p, rng)), Node("a3", "leaky_relu", ("l3",),
                                                                          {"negative_slope": 0.05}),
        Node("l4", "linear", ("a3",), _linear("l4", 8, 5, p, rng)), Node("a4", "sigmoid", ("l4",)),
        Node("l5", "linear", ("a4",), _linear("l5", 5, 4, p, rng)), Node("sm", "softmax", ("l5",), {"axis": -1}),
    ]
    g = Graph(inputs=[TensorSpec("x", (-1, 6))], nodes=nodes, outputs=["sm"], params=p)
    x = torch.randn(7, 6, dtype=torch.float64) * 2
    got, _ = run_graph(g, x, n)
    t = {k: torch.as_tensor(v) for k, v in p.items()}
    lin = lambda v, k: v @ t[f"{k}.weight"].T + t[f"{k}.bias"]  # noqa: E731
    h = F.gelu(lin(x, "l1"))
    h = F.leaky_relu(lin(torch.tanh(lin(h, "l2")), "l3"), 0.05)
    ref = torch.softmax(lin(torch.sigmoid(lin(h, "l4")), "l5"), -1)
    assert (got - ref).abs().max() < 1e-3


@pytest.mark.parametrize("n", NS)
def test_engine_attention_block_matches_torch(n: int) -> None:
    """Q = x Wq, scores = Q x, softmax, context = P x, LayerNorm + channel_affine(axis=-1)."""
    rng = np.random.default_rng(1)
    p: dict[str, np.ndarray] = {}
    d = 6
    p["ln.weight"] = rng.normal(1, 0.2, d)
    p["ln.bias"] = rng.normal(0, 0.2, d)
    nodes = [
        Node("q", "linear", ("x",), _linear("q", d, d, p, rng)),
        Node("s", "matmul", ("q", "x")),
        Node("p", "softmax", ("s",), {"axis": -1}),
        Node("c", "matmul", ("p", "x")),
        Node("r", "add", ("c", "x")),
        Node("ln", "layernorm", ("r",), {"axis": -1, "size": d, "eps": 1e-5, "weight": None, "bias": None}),
        Node("af", "channel_affine", ("ln",), {"axis": -1, "weight": "ln.weight", "bias": "ln.bias"}),
    ]
    g = Graph(inputs=[TensorSpec("x", (-1, d, d))], nodes=nodes, outputs=["af"], params=p)
    x = torch.randn(3, d, d, dtype=torch.float64)
    got, rounds = run_graph(g, x, n)
    t = {k: torch.as_tensor(v) for k, v in p.items()}
    q = x @ t["q.weight"].T + t["q.bias"]
    r = torch.softmax(q @ x, -1) @ x + x
    ref = F.layer_norm(r, (d,), weight=t["ln.weight"], bias=t["ln.bias"], eps=1e-5)
    assert (got - ref).abs().max() < 1e-3
    assert rounds > 0


def test_layernorm_with_inline_affine_is_refused() -> None:
    p = {"w": np.ones(4), "b": np.zeros(4)}
    g = Graph(inputs=[TensorSpec("x", (-1, 4))], params=p, outputs=["ln"],
              nodes=[Node("ln", "layernorm", ("x",), {"axis": -1, "size": 4, "eps": 1e-5, "weight": "w", "bias": "b"})])
    with pytest.raises(UnsupportedModelError, match="channel_affine"):
        compile_plan(g, batch=1, n_parties=2)
