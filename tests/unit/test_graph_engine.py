"""Importer, validator, plan, and the whole engine in-process (no sockets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from secureinfer import ring
from secureinfer.dealer.material import BundleBuilder, PartyBundle
from secureinfer.engine.plan import compile_plan, fixed_operand_shapes, generate_request_material
from secureinfer.engine.runner import PartyModel, encode_params, open_masks, run_plan
from secureinfer.errors import InvalidArgumentError, UnsupportedModelError
from secureinfer.graph.ir import Graph
from secureinfer.graph.load import load_model_file
from secureinfer.graph.torch_import import from_torch
from secureinfer.prg import Prg
from secureinfer.sharing import reconstruct, share

from .mpc import run_parties


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.ReLU(), nn.Linear(8, 8), nn.Linear(8, 3))


def test_unsupported_layers_are_all_listed() -> None:
    m = nn.Sequential(nn.Linear(4, 4), nn.ELU(), nn.ReLU(), nn.SiLU(), nn.Linear(4, 2), nn.Softplus())
    with pytest.raises(UnsupportedModelError) as err:
        from_torch(m, (1, 4))
    text = str(err.value)
    assert "ELU" in text and "SiLU" in text and "Softplus" in text
    assert len(err.value.problems) == 3


def test_public_json_roundtrip_has_no_weights() -> None:
    g = from_torch(_mlp(), (1, 3, 4))
    data = g.public_json()
    g2 = Graph.from_public_json(data)
    assert g2.digest() == g.digest() and not g2.params
    assert b"0." not in data.replace(b'"frac_bits":16', b"")  # no float weights leak into the structure


def test_malformed_graph_json_is_invalid_argument() -> None:
    with pytest.raises(InvalidArgumentError):
        Graph.from_public_json(b"{not json")
    with pytest.raises(InvalidArgumentError):
        Graph.from_public_json(b'{"format": "other"}')


def test_torchscript_file_import(tmp_path) -> None:
    m = nn.Sequential(nn.Linear(5, 4), nn.ReLU(), nn.Linear(4, 2))
    p = tmp_path / "m.pt"
    torch.jit.script(m).save(str(p))
    g = load_model_file(p)
    assert [n.op for n in g.nodes] == ["linear", "relu", "linear"]
    np.testing.assert_allclose(g.params["0.weight"], m[0].weight.detach().double().numpy())
    (tmp_path / "junk.pt").write_bytes(b"not a model")
    with pytest.raises(InvalidArgumentError):
        load_model_file(tmp_path / "junk.pt")


def test_plan_fuses_truncation_into_relu_and_counts_rounds() -> None:
    g = from_torch(_mlp(), (1, 3, 4))
    plan = compile_plan(g, batch=2, n_parties=2)
    assert [s.node.op for s in plan.steps] == ["flatten", "linear", "relu", "linear", "trunc", "linear"]
    assert plan.steps[2].ins[0].scale == 32 and plan.steps[2].out.scale == 16  # ReLU fused with truncation
    assert plan.rounds() == 5 and plan.output_scale == 32


@pytest.mark.parametrize("n", [2, 3])
def test_engine_in_process_matches_torch(n: int) -> None:
    model = _mlp()
    x = torch.rand(4, 3, 4)
    g = from_torch(model, x[:1])
    enc = encode_params(g)
    prg = Prg.from_os()
    param_shares = {k: share(v, n, prg=prg) for k, v in enc.items()}
    model_b = BundleBuilder(n)
    masks = {k: model_b.random(f"{k}/B", s) for k, s in fixed_operand_shapes(g).items()}
    plan = compile_plan(g, batch=4, n_parties=n)
    req_b = BundleBuilder(n)
    generate_request_material(plan, req_b, masks)
    xs = share(ring.encode(x, frac_bits=16), n, prg=prg)

    def party(s, bundle: PartyBundle):
        mine = {k: v[s.party_id] for k, v in param_shares.items()}
        mb = model_b.party_bundle(s.party_id)
        m, d = open_masks(s, g, mine, mb)
        pm = PartyModel(g, party_id=s.party_id, shares=mine, masks=m, diffs=d)
        return run_plan(s, plan, pm, bundle, xs[s.party_id])["logits"]

    res, _ = run_parties(n, party, builder=req_b)
    got = ring.decode(reconstruct(res), frac_bits=plan.output_scale)
    with torch.no_grad():
        ref = model(x).double()
    assert (got - ref).abs().max() < 1e-3
