"""Convolution, pooling, residual add, concat and channel affine through the engine (n=2,3)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from secureinfer import ring
from secureinfer.dealer.material import BundleBuilder, PartyBundle
from secureinfer.engine.plan import compile_plan, fixed_operand_shapes, generate_request_material
from secureinfer.engine.runner import PartyModel, encode_params, open_masks, run_plan
from secureinfer.graph.ir import Graph, Node, TensorSpec
from secureinfer.prg import Prg
from secureinfer.sharing import reconstruct, share

from .mpc import run_parties


def run_secure(g: Graph, x: torch.Tensor, n: int, *, argmax: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    enc = encode_params(g)
    prg = Prg.from_os()
    param_shares = {k: share(v, n, prg=prg) for k, v in enc.items()}
    mb = BundleBuilder(n)
    masks = {k: mb.random(f"{k}/B", s) for k, s in fixed_operand_shapes(g).items()}
    plan = compile_plan(g, batch=x.shape[0], n_parties=n, argmax=argmax)
    rb = BundleBuilder(n)
    generate_request_material(plan, rb, masks)
    xs = share(ring.encode(x, frac_bits=g.frac_bits), n, prg=prg)

    def party(s, bundle: PartyBundle):
        mine = {k: v[s.party_id] for k, v in param_shares.items()}
        m, d = open_masks(s, g, mine, mb.party_bundle(s.party_id))
        pm = PartyModel(g, party_id=s.party_id, shares=mine, masks=m, diffs=d)
        return run_plan(s, plan, pm, bundle, xs[s.party_id])

    res, sess = run_parties(n, party, builder=rb)
    out = {k: reconstruct([r[k] for r in res]) for k in res[0]}
    decoded = {"logits": ring.decode(out["logits"], frac_bits=plan.output_scale)}
    if argmax:
        decoded["argmax"] = out["argmax"]
    assert sess[0].costs.rounds == plan.rounds() + (1 if masks else 0)  # + the deployment round opening E
    return decoded, plan.rounds()


def conv_attrs(cin, cout, k, *, stride=1, padding=0, groups=1, dilation=1, bias=True, name="c"):
    return {"in_channels": cin, "out_channels": cout, "kernel_size": [k, k], "stride": [stride, stride],
            "padding": [padding, padding], "dilation": [dilation, dilation], "groups": groups,
            "weight": f"{name}.weight", "bias": f"{name}.bias" if bias else None}


def test_lenet_style_cnn_matches_torch() -> None:
    torch.manual_seed(0)
    p = {
        "c1.weight": torch.randn(16, 1, 5, 5) * 0.2, "c1.bias": torch.randn(16) * 0.1,
        "c2.weight": torch.randn(16, 16, 5, 5) * 0.05, "c2.bias": torch.randn(16) * 0.1,
        "f1.weight": torch.randn(100, 256) * 0.06, "f1.bias": torch.randn(100) * 0.1,
        "f2.weight": torch.randn(10, 100) * 0.1, "f2.bias": torch.randn(10) * 0.1,
    }
    pool = {"kernel_size": [2, 2], "stride": [2, 2], "padding": [0, 0]}
    nodes = [
        Node("c1", "conv2d", ("input",), conv_attrs(1, 16, 5, name="c1")),
        Node("r1", "relu", ("c1",)), Node("p1", "maxpool2d", ("r1",), pool),
        Node("c2", "conv2d", ("p1",), conv_attrs(16, 16, 5, name="c2")),
        Node("r2", "relu", ("c2",)), Node("p2", "maxpool2d", ("r2",), pool),
        Node("fl", "flatten", ("p2",), {"start_dim": 1}),
        Node("f1", "linear", ("fl",), {"in_features": 256, "out_features": 100, "weight": "f1.weight", "bias": "f1.bias"}),
        Node("r3", "relu", ("f1",)),
        Node("f2", "linear", ("r3",), {"in_features": 100, "out_features": 10, "weight": "f2.weight", "bias": "f2.bias"}),
    ]
    g = Graph([TensorSpec("input", (-1, 1, 28, 28))], nodes, ["f2"], params={k: v.double().numpy() for k, v in p.items()})
    x = torch.rand(3, 1, 28, 28)
    got, rounds = run_secure(g, x, 2, argmax=True)
    d = {k: v.double() for k, v in p.items()}
    h = F.max_pool2d(F.relu(F.conv2d(x.double(), d["c1.weight"], d["c1.bias"])), 2)
    h = F.max_pool2d(F.relu(F.conv2d(h, d["c2.weight"], d["c2.bias"])), 2)
    ref = F.linear(F.relu(F.linear(h.flatten(1), d["f1.weight"], d["f1.bias"])), d["f2.weight"], d["f2.bias"])
    assert (got["logits"] - ref).abs().max() < 1e-2
    assert torch.equal(got["argmax"].argmax(-1), ref.argmax(-1))
    assert rounds == 1 + 1 + 2 + 1 + 1 + 2 + 1 + 1 + 1 + 2  # conv relu pool(2) conv relu pool fc relu fc argmax(2)


@pytest.mark.parametrize("n", [2, 3])
def test_residual_block_with_bn_affine_avgpool_concat(n: int) -> None:
    torch.manual_seed(1)
    p = {
        "a.weight": torch.randn(4, 3, 3, 3) * 0.3, "a.bias": torch.randn(4) * 0.1,
        "bn.weight": torch.rand(4) + 0.5, "bn.bias": torch.randn(4) * 0.1,
        "b.weight": torch.randn(4, 2, 3, 3) * 0.3,  # grouped conv, no bias
        "fc.weight": torch.randn(5, 8) * 0.3, "fc.bias": torch.randn(5) * 0.1,
    }
    nodes = [
        Node("a", "conv2d", ("input",), conv_attrs(3, 4, 3, padding=1, name="a")),
        Node("bn", "channel_affine", ("a",), {"axis": 1, "weight": "bn.weight", "bias": "bn.bias"}),
        Node("r", "relu", ("bn",)),
        Node("b", "conv2d", ("r",), conv_attrs(4, 4, 3, padding=1, groups=2, bias=False, name="b")),
        Node("res", "add", ("b", "r")),
        Node("ap", "avgpool2d", ("res",), {"kernel_size": [2, 2], "stride": [2, 2], "padding": [0, 0]}),
        Node("gp", "global_avgpool", ("ap",)),
        Node("gp2", "global_avgpool", ("r",)),
        Node("cat", "concat", ("gp", "gp2"), {"axis": 1}),
        Node("fl", "flatten", ("cat",), {"start_dim": 1}),
        Node("fc", "linear", ("fl",), {"in_features": 8, "out_features": 5, "weight": "fc.weight", "bias": "fc.bias"}),
    ]
    g = Graph([TensorSpec("input", (-1, 3, 8, 8))], nodes, ["fc"], params={k: v.double().numpy() for k, v in p.items()})
    x = torch.rand(2, 3, 8, 8)
    got, _ = run_secure(g, x, n)
    d = {k: v.double() for k, v in p.items()}
    a = F.conv2d(x.double(), d["a.weight"], d["a.bias"], padding=1)
    r = F.relu(a * d["bn.weight"].view(1, -1, 1, 1) + d["bn.bias"].view(1, -1, 1, 1))
    res = F.conv2d(r, d["b.weight"], padding=1, groups=2) + r
    gp = F.avg_pool2d(res, 2).mean((2, 3), keepdim=True)
    cat = torch.cat([gp, r.mean((2, 3), keepdim=True)], 1)
    ref = F.linear(cat.flatten(1), d["fc.weight"], d["fc.bias"])
    assert (got["logits"] - ref).abs().max() < 1e-2


def test_maxpool_with_padding_and_odd_window() -> None:
    nodes = [Node("mp", "maxpool2d", ("input",), {"kernel_size": [3, 3], "stride": [2, 2], "padding": [0, 0]}),
             Node("fl", "flatten", ("mp",), {"start_dim": 1})]
    g = Graph([TensorSpec("input", (-1, 2, 7, 7))], nodes, ["fl"])
    x = torch.randn(2, 2, 7, 7)
    got, rounds = run_secure(g, x, 2)
    ref = F.max_pool2d(x.double(), 3, 2).flatten(1)
    assert (got["logits"] - ref).abs().max() < 1e-3
    assert rounds == 4  # 9 -> 5 -> 3 -> 2 -> 1
    np.testing.assert_array_equal(got["logits"].shape, ref.shape)


def test_padded_maxpool_pads_with_minus_infinity_and_relu_reordering() -> None:
    nodes = [Node("r", "relu", ("input",)),
             Node("mp", "maxpool2d", ("r",), {"kernel_size": [2, 2], "stride": [2, 2], "padding": [1, 1]}),
             Node("mp2", "maxpool2d", ("input",), {"kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1]}),
             Node("f1", "flatten", ("mp",), {"start_dim": 1}), Node("f2", "flatten", ("mp2",), {"start_dim": 1}),
             Node("cat", "concat", ("f1", "f2"), {"axis": 1})]
    g = Graph([TensorSpec("input", (-1, 2, 5, 5))], nodes, ["cat"])
    plan = compile_plan(g, batch=1, n_parties=2)
    assert [s.node.op for s in plan.steps][:2] == ["maxpool2d", "relu"]  # pooled before the ReLU
    x = -torch.rand(2, 2, 5, 5) - 0.1  # all negative: zero padding would be wrong
    got, _ = run_secure(g, x, 2)
    ref = torch.cat([F.max_pool2d(F.relu(x.double()), 2, 2, padding=1).flatten(1),
                     F.max_pool2d(x.double(), 3, 1, padding=1).flatten(1)], 1)
    assert (got["logits"] - ref).abs().max() < 1e-3
