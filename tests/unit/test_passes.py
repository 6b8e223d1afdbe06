"""Graph passes (BN/affine folding, shape folding, dead nodes), the float64 reference
evaluator, the validator, the cost estimate and ``secureinfer inspect`` — on hand-built
IR graphs (no tracing, fast)."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from secureinfer.engine.ops import OPS
from secureinfer.engine.plan import compile_plan
from secureinfer.errors import ShapeError, UnsupportedModelError
from secureinfer.graph.inspect_cli import format_report, inspect_graph, register_cli
from secureinfer.graph.ir import Graph, Node, TensorSpec
from secureinfer.graph.passes import (eliminate_dead, evaluate, fold_affine, fold_shapes, infer_shapes, optimize,
                                      pool_before_relu)
from secureinfer.graph.validate import estimate_cost, validate

RNG = np.random.default_rng(0)  # non-secret: test weights and inputs


def r(*shape: int) -> np.ndarray:
    return RNG.standard_normal(shape)


def conv(name: str, src: str, cin: int, cout: int, k: int = 3, pad: int = 1, bias: bool = True) -> Node:
    return Node(name, "conv2d", (src,), {"in_channels": cin, "out_channels": cout, "kernel_size": [k, k],
                                         "stride": [1, 1], "padding": [pad, pad], "dilation": [1, 1], "groups": 1,
                                         "weight": f"{name}.weight", "bias": f"{name}.bias" if bias else None})


def affine(name: str, src: str, axis: int = 1) -> Node:
    return Node(name, "channel_affine", (src,), {"axis": axis, "weight": f"{name}.weight", "bias": f"{name}.bias"})


def bn_params(name: str, c: int) -> dict[str, np.ndarray]:
    gamma, beta, mean, var = r(c) + 2, r(c), r(c), np.abs(r(c)) + 0.5
    w = gamma / np.sqrt(var + 1e-5)
    return {f"{name}.weight": w, f"{name}.bias": beta - mean * w}


def cnn_with_bn() -> Graph:
    nodes = [conv("c1", "input", 3, 4, bias=False), affine("bn1", "c1"), Node("r1", "relu", ("bn1",)),
             conv("c2", "r1", 4, 4), affine("bn2", "c2"), Node("add", "add", ("r1", "bn2")),
             affine("bn3", "add"),  # after an add: cannot fold, stays channel_affine
             Node("pool", "maxpool2d", ("bn3",), {"kernel_size": [2, 2], "stride": [2, 2], "padding": [0, 0]}),
             Node("flat", "flatten", ("pool",), {"start_dim": 1}),
             Node("fc", "linear", ("flat",), {"in_features": 16, "out_features": 3, "weight": "fc.weight",
                                              "bias": "fc.bias"}),
             affine("bn4", "fc")]
    params = {"c1.weight": r(4, 3, 3, 3), "c2.weight": r(4, 4, 3, 3), "c2.bias": r(4), "fc.weight": r(3, 16),
              "fc.bias": r(3), **bn_params("bn1", 4), **bn_params("bn2", 4), **bn_params("bn3", 4), **bn_params("bn4", 3)}
    return Graph(inputs=[TensorSpec("input", (-1, 3, 4, 4))], nodes=nodes, outputs=["bn4"], params=params)


# ----------------------------------------------------------------------------- evaluator and passes


def test_evaluator_matches_torch_functional() -> None:
    g = cnn_with_bn()
    x = r(2, 3, 4, 4)
    p = {k: torch.tensor(v) for k, v in g.params.items()}
    t = torch.tensor(x)

    def aff(v: torch.Tensor, n: str) -> torch.Tensor:
        shape = [1] * v.dim()
        shape[1] = -1
        return v * p[f"{n}.weight"].view(shape) + p[f"{n}.bias"].view(shape)

    y1 = F.relu(aff(F.conv2d(t, p["c1.weight"], padding=1), "bn1"))
    y = aff(y1 + aff(F.conv2d(y1, p["c2.weight"], p["c2.bias"], padding=1), "bn2"), "bn3")
    want = aff(F.linear(F.max_pool2d(y, 2).flatten(1), p["fc.weight"], p["fc.bias"]), "bn4")
    np.testing.assert_allclose(evaluate(g, x), want.numpy(), rtol=1e-12, atol=1e-12)


def test_batchnorm_folding_preserves_outputs() -> None:
    g = cnn_with_bn()
    folded = fold_affine(g)
    ops = [n.op for n in folded.nodes]
    assert ops == ["conv2d", "relu", "conv2d", "add", "channel_affine", "maxpool2d", "flatten", "linear"]
    assert folded.outputs == ["fc"] and "bn1.weight" not in folded.params
    assert folded.params["c1.bias"].shape == (4,)  # a bias appears where the conv had none
    x = r(5, 3, 4, 4)
    np.testing.assert_allclose(evaluate(folded, x), evaluate(g, x), rtol=1e-10, atol=1e-10)
    assert cnn_with_bn().nodes == g.nodes  # the input graph is left alone


def test_folding_respects_other_consumers_and_shared_weights() -> None:
    nodes = [conv("c", "input", 2, 2), affine("bn", "c"), Node("add", "add", ("c", "bn")),  # c has two consumers
             Node("fa", "linear", ("add",), {"in_features": 2, "out_features": 2, "weight": "W", "bias": None}),
             Node("fb", "linear", ("fa",), {"in_features": 2, "out_features": 2, "weight": "W", "bias": None}),
             affine("aff", "fb", axis=3)]
    params = {"c.weight": r(2, 2, 3, 3), "c.bias": r(2), "W": r(2, 2), **bn_params("bn", 2), **bn_params("aff", 2)}
    g = Graph(inputs=[TensorSpec("input", (-1, 2, 2, 2))], nodes=nodes, outputs=["aff"], params=params)
    folded = fold_affine(g)
    assert [n.op for n in folded.nodes] == ["conv2d", "channel_affine", "add", "linear", "linear"]
    fa, fb = folded.nodes[3], folded.nodes[4]
    assert fa.attrs["weight"] == "W" and fb.attrs["weight"] != "W"  # the shared weight is not modified
    np.testing.assert_allclose(folded.params["W"], params["W"])
    x = r(3, 2, 2, 2)
    np.testing.assert_allclose(evaluate(folded, x), evaluate(g, x), rtol=1e-10, atol=1e-10)


def test_affine_chains_merge_but_layernorm_keeps_its_affine() -> None:
    nodes = [Node("ln", "layernorm", ("input",), {"axis": -1, "size": 4, "eps": 1e-5, "weight": None, "bias": None}),
             affine("gamma", "ln", axis=2), affine("scale", "gamma", axis=-1)]
    params = {**bn_params("gamma", 4), **bn_params("scale", 4)}
    g = Graph(inputs=[TensorSpec("input", (-1, 3, 4))], nodes=nodes, outputs=["scale"], params=params)
    folded = optimize(g)
    assert [n.op for n in folded.nodes] == ["layernorm", "channel_affine"]
    assert folded.nodes[0].attrs["weight"] is None and folded.outputs == ["gamma"]
    x = r(2, 3, 4)
    np.testing.assert_allclose(evaluate(folded, x), evaluate(g, x), rtol=1e-10, atol=1e-10)


def test_shape_folding_and_dead_nodes() -> None:
    nodes = [Node("keep", "reshape", ("input",), {"shape": [2, 3, 4]}),  # identity: dropped
             Node("f1", "flatten", ("keep",), {"start_dim": 2}),
             Node("f2", "reshape", ("f1",), {"shape": [24]}),  # flatten + reshape -> one flatten(1)
             Node("dead", "relu", ("f1",)),
             Node("out", "relu", ("f2",))]
    g = Graph(inputs=[TensorSpec("input", (-1, 2, 3, 4))], nodes=nodes, outputs=["out"])
    g2 = fold_shapes(g)
    assert [(n.op, n.inputs) for n in g2.nodes] == [("flatten", ("input",)), ("relu", ("f2",))]
    assert g2.nodes[0].attrs == {"start_dim": 1}
    x = r(2, 2, 3, 4)
    np.testing.assert_array_equal(evaluate(g2, x), evaluate(g, x))
    assert [n.name for n in eliminate_dead(g).nodes] == ["keep", "f1", "f2", "out"]


def test_pool_before_relu_is_exact_and_keeps_relus_with_other_uses() -> None:
    def pool(n: str, s: str, pad: int = 0) -> Node:
        return Node(n, "maxpool2d", (s,), {"kernel_size": [3, 3], "stride": [2, 2], "padding": [pad, pad]})

    nodes = [conv("c", "input", 2, 3), Node("r", "relu", ("c",), {"int_bits": 5}), pool("p", "r", pad=1),
             Node("r2", "relu", ("p",)), pool("p2", "r2"),  # a chain: both move
             Node("r3", "relu", ("c",)), pool("p3", "r3"), Node("a", "flatten", ("r3",), {"start_dim": 1}),  # 2 users
             Node("f", "flatten", ("p2",), {"start_dim": 1})]
    g = Graph(inputs=[TensorSpec("input", (-1, 2, 8, 8))], nodes=nodes, outputs=["f", "a", "p3"],
              params={"c.weight": r(3, 2, 3, 3), "c.bias": r(3)})
    g2 = pool_before_relu(g)
    # to a fixpoint: r moves after p, then after p2 (r2 on r: ReLU twice, as before)
    assert [(n.name, n.op, n.inputs) for n in g2.nodes][:5] == [
        ("c", "conv2d", ("input",)), ("p", "maxpool2d", ("c",)), ("p2", "maxpool2d", ("p",)),
        ("r", "relu", ("p2",)), ("r2", "relu", ("r",))]
    assert g2.nodes[3].attrs == {"int_bits": 5}  # a calibrated range moves with its ReLU
    assert [(n.name, n.inputs) for n in g2.nodes][5:] == [("r3", ("c",)), ("p3", ("r3",)), ("a", ("r3",)),
                                                          ("f", ("r2",))]
    assert pool_before_relu(g2).nodes == g2.nodes  # idempotent
    x = r(2, 2, 8, 8)
    v1, v2 = evaluate(g, x, all_values=True), evaluate(g2, x, all_values=True)
    for o in g.outputs:  # ReLU is monotone: exact
        np.testing.assert_array_equal(v2[o], v1[o])
    out = pool_before_relu(Graph(inputs=g.inputs, nodes=nodes[:3], outputs=["r", "p"], params=g.params))
    assert [n.op for n in out.nodes] == ["conv2d", "relu", "maxpool2d"]  # a ReLU that is an output stays


def test_infer_shapes_and_shape_errors() -> None:
    g = cnn_with_bn()
    shapes = infer_shapes(g, batch=7)
    assert shapes["pool"] == (7, 4, 2, 2) and shapes["bn4"] == (7, 3)
    bad = Graph(inputs=[TensorSpec("input", (-1, 5))], nodes=[
        Node("fc", "linear", ("input",), {"in_features": 4, "out_features": 2, "weight": "w", "bias": None})],
        outputs=["fc"], params={"w": r(2, 4)})
    with pytest.raises(ShapeError):
        infer_shapes(bad)
    assert any("cannot take inputs" in f.message for f in validate(bad))


# ----------------------------------------------------------------------------- validator and cost


def test_validator_lists_every_unsupported_node_with_suggestions() -> None:
    nodes = [Node("a", "gelu", ("input",)), Node("b", "softmax", ("a",), {"axis": 1}), Node("c", "frobnicate", ("b",)),
             Node("p", "maxpool2d", ("c",), {"kernel_size": [3, 3], "stride": [1, 1], "padding": [1, 1]})]
    g = Graph(inputs=[TensorSpec("input", (-1, 2, 4, 4))], nodes=nodes, outputs=["p"])
    ops = {"maxpool2d": OPS["maxpool2d"]}  # an engine that knows only max pooling
    found = validate(g, ops=ops)
    errors = [f for f in found if f.severity == "error"]
    assert [f.node for f in errors] == ["a", "b", "c"]
    assert errors[0].suggestion and errors[1].suggestion and errors[2].suggestion is None
    assert [f.node for f in found if f.severity == "warning"] == ["p"]  # zero padding vs -inf padding
    with pytest.raises(UnsupportedModelError) as err:
        validate(g, ops=ops, strict=True)
    assert len(err.value.problems) == 3 and "frobnicate" in str(err.value)
    assert validate(cnn_with_bn(), strict=True) == []


def lenet_graph() -> Graph:
    def pool(n: str, s: str) -> Node:
        return Node(n, "maxpool2d", (s,), {"kernel_size": [2, 2], "stride": [2, 2], "padding": [0, 0]})

    nodes = [conv("c1", "input", 1, 16, k=5, pad=0), Node("r1", "relu", ("c1",)), pool("p1", "r1"),
             conv("c2", "p1", 16, 16, k=5, pad=0), Node("r2", "relu", ("c2",)), pool("p2", "r2"),
             Node("flat", "flatten", ("p2",), {"start_dim": 1}),
             Node("fc1", "linear", ("flat",), {"in_features": 256, "out_features": 100, "weight": "fc1.w",
                                               "bias": "fc1.b"}),
             Node("r3", "relu", ("fc1",)),
             Node("fc2", "linear", ("r3",), {"in_features": 100, "out_features": 10, "weight": "fc2.w",
                                             "bias": "fc2.b"})]
    params = {"c1.weight": r(16, 1, 5, 5), "c1.bias": r(16), "c2.weight": r(16, 16, 5, 5), "c2.bias": r(16),
              "fc1.w": r(100, 256), "fc1.b": r(100), "fc2.w": r(10, 100), "fc2.b": r(10)}
    return Graph(inputs=[TensorSpec("input", (-1, 1, 28, 28))], nodes=nodes, outputs=["fc2"], params=params)


def test_cost_estimate_follows_the_plan() -> None:
    g = lenet_graph()
    steps = estimate_cost(g, batch=1, n_parties=2)
    plan = compile_plan(g, batch=1, n_parties=2)
    assert [s.rounds for s in steps] == [row["rounds"] for row in plan.per_step()]
    by = {s.step: s for s in steps}
    assert by["c1"].bytes_per_peer == 8 * 28 * 28  # only the input mask is opened
    # the planner pools before the ReLU (maxpool(relu(x)) == relu(maxpool(x))): step "p1"
    # is the max tournament on the conv output, "r1" the ReLU gate on the pooled values
    assert [s.step for s in steps][:3] == ["c1", "p1", "r1"]
    assert by["p1"].bytes_per_peer == 8 * 16 * 12 * 12 * (2 + 1)  # 4-window tournament: 2 + 1 gates
    assert by["r1"].bytes_per_peer == 8 * 16 * 12 * 12  # FSS gate: one opening per element
    assert by["flat"].bytes_per_peer == 0
    three = estimate_cost(g, batch=2, n_parties=3)
    assert all(t.bytes_per_peer is not None for t in three)
    assert next(t for t in three if t.step == "r1").bytes_per_peer > 8 * 2 * by["r1"].bytes_per_peer  # bitwise


def test_inspect_report_and_cli(tmp_path, capsys) -> None:
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rep = inspect_graph(lenet_graph(), batch=1, n_parties=2)
    assert rep["ok"] and rep["total_rounds"] == compile_plan(lenet_graph(), batch=1, n_parties=2).rounds()
    text = format_report(rep)
    assert "fc1" in text and "1x256 -> 1x100" in text and "total:" in text

    def save(nodes: list, inits: dict[str, np.ndarray], name: str) -> str:
        graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                                  [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                                  [numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()])
        path = tmp_path / name
        onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(path))
        return str(path)

    good = save([helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1), helper.make_node("Relu", ["h"], ["y"])],
                {"w": r(4, 8), "b": r(4)}, "good.onnx")
    bad = save([helper.make_node("Gemm", ["x", "w", "b"], ["h"], transB=1), helper.make_node("Elu", ["h"], ["e"]),
                helper.make_node("Softplus", ["e"], ["y"])], {"w": r(4, 8), "b": r(4)}, "bad.onnx")
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers())
    args = parser.parse_args(["inspect", good, "--parties", "2"])
    assert args.func(args) == 0
    out = capsys.readouterr().out
    assert "linear" in out and "relu" in out and f"{8 * 8 + 8 * 4:,} bytes per peer" in out
    args = parser.parse_args(["inspect", bad, "--json"])
    assert args.func(args) == 1
    out = capsys.readouterr().out
    assert "Elu" in out and "Softplus" in out and '"ok": false' in out
