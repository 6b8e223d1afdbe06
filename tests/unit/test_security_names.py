"""Security review finding 5: node names are validated, dealer items never collide.

Dealer items are named ``"<step>/<field>"``; two linear steps with one name would draw
the same mask A and open ``X - A`` and ``Y - A``. The IR refuses such graphs (listing
every bad name), the importers produce conforming names, and the bundle builder refuses
an item name generated twice.
"""

from __future__ import annotations

import copy
import io
import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from secureinfer import ring
from secureinfer.dealer.material import BundleBuilder, linear_material, triple_material
from secureinfer.engine.plan import compile_plan, fixed_operand_shapes, generate_request_material
from secureinfer.errors import InvalidArgumentError, ProtocolError, UnsupportedModelError
from secureinfer.graph.builder import Builder
from secureinfer.graph.ir import MAX_NAME_LENGTH, NAME_PATTERN, RESERVED_NAMES, Graph, Node, TensorSpec, safe_name
from secureinfer.graph.passes import evaluate
from secureinfer.graph.torch_import import from_torch
from secureinfer.prg import Prg
from secureinfer.sharing import reconstruct, share

from .mpc import run_parties


def _linear(name: str, src: str, fin: int, fout: int, weight: str | None = None) -> Node:
    return Node(name, "linear", (src,), {"in_features": fin, "out_features": fout,
                                         "weight": weight or f"{name}.weight", "bias": None})


def _mlp_graph() -> Graph:
    """x -> fc1 (4x4) -> relu -> fc2 (4x4): two linear steps of the same shape."""
    g = torch.Generator().manual_seed(3)  # non-secret: test weights
    params = {"fc1.weight": torch.randn(4, 4, generator=g).double().numpy(),
              "fc2.weight": torch.randn(4, 4, generator=g).double().numpy()}
    nodes = [_linear("fc1", "x", 4, 4), Node("act", "relu", ("fc1",)), _linear("fc2", "act", 4, 4)]
    return Graph(inputs=[TensorSpec("x", (-1, 4))], nodes=nodes, outputs=["fc2"], params=params)


def _doc(g: Graph) -> dict:
    return json.loads(g.public_json())


def _assert_valid_names(g: Graph) -> None:
    names = [i.name for i in g.inputs] + [n.name for n in g.nodes]
    assert len(set(names)) == len(names), names
    assert all(NAME_PATTERN.fullmatch(n) and n not in RESERVED_NAMES for n in names), names
    assert g.name_problems() == []


def _secure(g: Graph, x: torch.Tensor, n: int = 2) -> np.ndarray:
    """The graph run by the secure engine on n in-process parties."""
    from secureinfer.engine.runner import PartyModel, encode_params, open_masks, run_plan

    prg = Prg.from_os()
    param_shares = {k: share(v, n, prg=prg) for k, v in encode_params(g).items()}
    model_b = BundleBuilder(n)
    masks = {k: model_b.random(f"{k}/B", s) for k, s in fixed_operand_shapes(g).items()}
    plan = compile_plan(g, batch=x.shape[0], n_parties=n)
    req_b = BundleBuilder(n)
    generate_request_material(plan, req_b, masks)
    xs = share(ring.encode(x.double(), frac_bits=g.frac_bits), n, prg=prg)

    def party(s, bundle):  # noqa: ANN001, ANN202
        mine = {k: v[s.party_id] for k, v in param_shares.items()}
        m, d = open_masks(s, g, mine, model_b.party_bundle(s.party_id))
        pm = PartyModel(g, party_id=s.party_id, shares=mine, masks=m, diffs=d)
        return run_plan(s, plan, pm, bundle, xs[s.party_id])["logits"]

    res, _ = run_parties(n, party, builder=req_b)
    return ring.decode(reconstruct(res), frac_bits=plan.output_scale).numpy()


# ----------------------------------------------------------------------------- the IR validator


def test_validator_lists_every_bad_name_in_a_parsed_graph() -> None:
    doc = _doc(_mlp_graph())
    doc["inputs"][0]["name"] = "dp"  # reserved
    doc["nodes"] = [
        {**doc["nodes"][0], "name": "fc1", "inputs": ["dp"]},
        {**doc["nodes"][1], "name": "a/b", "inputs": ["fc1"]},  # the internal separator
        {**doc["nodes"][2], "name": "fc1", "inputs": ["a/b"]},  # a second step named fc1
        {"name": "argmax", "op": "relu", "inputs": ["fc1"], "attrs": {}},  # the planner's own step
        {"name": "sp ace", "op": "relu", "inputs": ["argmax"], "attrs": {}},
        {"name": "x" * (MAX_NAME_LENGTH + 1), "op": "relu", "inputs": ["sp ace"], "attrs": {}},
    ]
    doc["outputs"] = ["x" * (MAX_NAME_LENGTH + 1)]
    doc["params"]["evil/param"] = [4, 4]
    with pytest.raises(InvalidArgumentError) as err:
        Graph.from_public_json(json.dumps(doc).encode())
    assert not isinstance(err.value, UnsupportedModelError)  # a naming error, not "layers the engine cannot run"
    text = str(err.value)
    for bad in ("'dp'", "'a/b'", "'fc1' is used 2 times", "'argmax'", "'sp ace'", "'xxxxxxxx", "'evil/param'"):
        assert bad in text, (bad, text)
    assert "7 invalid name(s)" in text and text.count("\n  - ") == 7  # one line per problem


def test_each_kind_of_bad_name_is_reported_once() -> None:
    g = _mlp_graph()
    g.nodes[2] = _linear("fc1", "act", 4, 4, weight="fc2.weight")  # mutation bypasses the constructor check
    assert g.name_problems() == ["name 'fc1' is used 2 times (by 2 nodes); names must be unique"]
    with pytest.raises(InvalidArgumentError, match="'fc1' is used 2 times"):
        g.validate()
    g.nodes[2] = _linear("fc2/A", "act", 4, 4, weight="fc2.weight")
    (p,) = g.name_problems()
    assert "'fc2/A'" in p and "contains '/'" in p
    g.nodes[2] = _linear("act", "act", 4, 4, weight="fc2.weight")  # a node shadowing an earlier value
    assert g.name_problems() == ["name 'act' is used 2 times (by 2 nodes); names must be unique"]
    g.nodes[2] = _linear("x", "act", 4, 4, weight="fc2.weight")  # a node shadowing the model input
    assert g.name_problems() == ["name 'x' is used 2 times (by 1 input, 1 node); names must be unique"]


def test_many_bad_names_are_all_counted_and_the_message_stays_small() -> None:
    nodes = [Node(f"n{i}/x", "relu", ("x" if i == 0 else f"n{i - 1}/x",)) for i in range(300)]
    nodes += [Node("dup", "relu", ("x",)) for _ in range(20000)]  # quadratic bookkeeping would show here
    with pytest.raises(InvalidArgumentError) as err:
        Graph(inputs=[TensorSpec("x", (-1, 4))], nodes=nodes, outputs=["dup"])
    text = str(err.value)
    assert "301 invalid name(s)" in text and "'n0/x'" in text and "more" in text
    assert len(text) < 5000  # it travels in a gRPC status
    g = Graph(inputs=[TensorSpec("x", (-1, 4))], nodes=[Node("ok", "relu", ("x",))], outputs=["ok"])
    g.nodes = nodes
    probs = g.name_problems()
    assert len(probs) == 301 and probs[-1] == "name 'dup' is used 20000 times (by 20000 nodes); names must be unique"


def test_graph_constructor_refuses_bad_names() -> None:
    with pytest.raises(InvalidArgumentError, match=r"'dp/clip'.*\n.*'fc'.*used 2 times"):
        Graph(inputs=[TensorSpec("x", (-1, 4))], nodes=[
            Node("dp/clip", "relu", ("x",)), Node("fc", "relu", ("dp/clip",)), Node("fc", "relu", ("fc",))],
            outputs=["fc"])
    for name in sorted(RESERVED_NAMES):
        with pytest.raises(InvalidArgumentError, match="reserved"):
            Graph(inputs=[TensorSpec("x", (-1, 4))], nodes=[Node(name, "relu", ("x",))], outputs=[name])
    ok = _mlp_graph()
    assert Graph.from_public_json(ok.public_json()).digest() == ok.digest()


def test_a_duplicate_name_that_slipped_past_the_ir_is_refused_by_the_bundle_builder() -> None:
    """The attack itself: two linear steps named alike would draw one mask A."""
    g = _mlp_graph()
    g.nodes[2] = _linear("fc1", "act", 4, 4, weight="fc2.weight")  # bypasses the constructor check
    plan = compile_plan(g, batch=1, n_parties=2)
    assert [s.name for s in plan.steps].count("fc1") == 2
    model_b = BundleBuilder(2)
    masks = {k: model_b.random(f"{k}/B", s) for k, s in fixed_operand_shapes(g).items()}
    with pytest.raises(ProtocolError, match="'fc1/A'"):
        generate_request_material(plan, BundleBuilder(2), masks)
    ok = _mlp_graph()  # the honest graph generates its material without a collision
    ok_b = BundleBuilder(2)
    plan = compile_plan(ok, batch=1, n_parties=2, argmax=True, dp_clip=1.0)  # with the planner's own steps
    assert {"dp/trunc", "dp/clip", "argmax"} <= {s.name for s in plan.steps}
    generate_request_material(plan, BundleBuilder(2),
                              {k: ok_b.random(f"{k}/B", s) for k, s in fixed_operand_shapes(ok).items()})


# ----------------------------------------------------------------------------- the bundle builder


def test_bundle_builder_refuses_every_repeated_item_name() -> None:
    b = BundleBuilder(2)
    b.random("s/A", (2,))
    with pytest.raises(ProtocolError, match=r"'s/A' generated twice \(random, then random\)"):
        b.random("s/A", (2,))
    with pytest.raises(ProtocolError, match=r"'s/A' generated twice \(random, then shared\)"):
        b.shared("s/A", torch.zeros(2, dtype=torch.int64))
    b.shared("s/C", torch.zeros(2, dtype=torch.int64))
    with pytest.raises(ProtocolError, match="'s/C'"):
        b.shared("s/C", torch.ones(2, dtype=torch.int64))
    b.blob(0, "s/dcf", b"k0")
    b.blob(1, "s/dcf", b"k1")  # one item, one part per party: allowed
    with pytest.raises(ProtocolError, match="'s/dcf'"):
        b.blob(1, "s/dcf", b"again")
    with pytest.raises(ProtocolError, match="'s/dcf'"):
        b.random("s/dcf", (1,))
    with pytest.raises(ProtocolError, match="'s/A'"):
        b.blob(0, "s/A", b"x")
    with pytest.raises(ProtocolError, match="no party 2"):
        b.blob(2, "s/other", b"x")
    assert b.party_bundle(1).blobs == {"s/dcf": b"k1"}
    # the generators inherit the check: one step name used twice
    linear_material(b, "lin", input_shape=(1, 2), mask=torch.ones(2, 2, dtype=torch.int64), op=ring.matmul)
    with pytest.raises(ProtocolError, match="'lin/A'"):
        linear_material(b, "lin", input_shape=(1, 2), mask=torch.ones(2, 2, dtype=torch.int64), op=ring.matmul)
    triple_material(b, "t", a_shape=(2,), b_shape=(2,))
    with pytest.raises(ProtocolError, match="'t/a'"):
        triple_material(b, "t", a_shape=(2,), b_shape=(2,))


# ----------------------------------------------------------------------------- importers


def test_safe_name_and_builder_give_conforming_unique_names() -> None:
    assert safe_name("/fc1/Gemm") == "_fc1_Gemm"
    assert safe_name("a b:c") == "a_b_c"
    assert safe_name(".x") == "_.x" and safe_name("-x") == "_-x" and safe_name("") == "node"
    assert safe_name("argmax") == "argmax_" and safe_name("dp") == "dp_"
    assert len(safe_name("y" * 500)) == MAX_NAME_LENGTH
    b = Builder(input_name="input", input_shape=(1, 4), frac_bits=16)
    names = [b.unique(n) for n in ("input", "dp", "dp_", "a/b", "a_b", "z" * 300, "z" * 300, "argmax")]
    assert len(set(names)) == len(names)
    assert all(NAME_PATTERN.fullmatch(n) and n not in RESERVED_NAMES for n in names), names


class _Reserved(nn.Module):
    """Attribute names that collide with the planner's internal names."""

    def __init__(self) -> None:
        super().__init__()
        self.dp = nn.Linear(6, 5)
        self.argmax = nn.Linear(5, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.argmax(torch.relu(self.dp(x)))


def test_torch_import_avoids_reserved_names_and_runs() -> None:
    torch.manual_seed(0)
    model = _Reserved().eval()
    g = from_torch(model, (1, 6))
    _assert_valid_names(g)
    assert [n.op for n in g.nodes] == ["linear", "relu", "linear"]
    x = torch.rand(3, 6)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(x.double()).numpy()
    np.testing.assert_allclose(evaluate(g, x.numpy()), ref, atol=1e-9)
    got = _secure(g, x)
    assert np.abs(got - ref).max() < 1e-3


def test_onnx_node_names_with_slashes_and_reserved_names_import_and_run() -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper
    from onnx.reference import ReferenceEvaluator

    from secureinfer.graph.onnx_import import from_onnx

    rng = np.random.default_rng(0)  # non-secret: test weights
    inits = {"W1": rng.standard_normal((6, 5)).astype(np.float32), "B1": rng.standard_normal(5).astype(np.float32),
             "W2": rng.standard_normal((5, 4)).astype(np.float32), "W3": rng.standard_normal((4, 3)).astype(np.float32)}
    nodes = [  # node names as exporters write them, plus hostile ones; weights not named "*.weight"
        helper.make_node("Gemm", ["x", "W1", "B1"], ["h1"], name="/block/dp/Gemm"),
        helper.make_node("Relu", ["h1"], ["r1"], name="argmax"),
        helper.make_node("MatMul", ["r1", "W2"], ["h2"], name="dp"),
        helper.make_node("Relu", ["h2"], ["r2"], name="/"),
        helper.make_node("MatMul", ["r2", "W3"], ["h3"], name="a/b:c d"),
        helper.make_node("Relu", ["h3"], ["out"], name="a/b:c d"),  # a repeated node name
    ]
    graph = helper.make_graph(
        nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 6])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, None)],
        [numpy_helper.from_array(v, k) for k, v in inits.items()])
    data = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()
    g = from_onnx(data)
    _assert_valid_names(g)
    assert [n.op for n in g.nodes] == ["linear", "relu", "linear", "relu", "linear", "relu"]
    assert any("/" in n.name for n in onnx.load_from_string(data).graph.node)
    x = rng.standard_normal((3, 6)).astype(np.float32)
    want = ReferenceEvaluator(onnx.load_from_string(data)).run(None, {"x": x})[0]
    np.testing.assert_allclose(evaluate(g, x), want, atol=1e-4)
    assert np.abs(_secure(g, torch.from_numpy(x)) - want).max() < 1e-3
    assert Graph.from_public_json(g.public_json()).digest() == g.digest()  # what a party would parse


def test_torch_onnx_export_names_import_and_run() -> None:
    onnx = pytest.importorskip("onnx")
    from secureinfer.graph.onnx_import import from_onnx

    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 4 * 4, 4)).eval()
    x = torch.rand(1, 1, 6, 6)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (x,), buf, dynamo=False, opset_version=17)
    data = buf.getvalue()
    assert any("/" in n.name for n in onnx.load_from_string(data).graph.node)  # "/0/Conv", "/1/Relu", ...
    g = from_onnx(data)
    _assert_valid_names(g)
    xs = torch.rand(2, 1, 6, 6)
    with torch.no_grad():
        ref = copy.deepcopy(model).double()(xs.double()).numpy()
    np.testing.assert_allclose(evaluate(g, xs.numpy()), ref, atol=1e-5)
    assert np.abs(_secure(g, xs) - ref).max() < 1e-3
