"""The ops transformer exports need: Transpose (batch kept first), Split/Slice/Gather of an
activation, and Add of a full constant tensor (position embeddings, attention masks) --
checked against onnx's reference evaluator, and their refusals."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from secureinfer.errors import UnsupportedModelError
from secureinfer.graph.ir import Graph, Node, TensorSpec
from secureinfer.graph.onnx_import import from_onnx
from secureinfer.graph.passes import evaluate


def _model(nodes, inits: dict[str, np.ndarray], shape: list[int], out: str):
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", *shape[1:]])],
                          [helper.make_tensor_value_info(out, TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(v.astype(np.int64 if v.dtype.kind in "iu" else np.float32), k)
                           for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)])


def test_split_slice_gather_transpose_and_add_tensor_match_the_reference() -> None:
    rng = np.random.default_rng(0)
    pos = rng.normal(size=(1, 4, 6))
    nodes = [
        helper.make_node("Add", ["x", "pos"], ["p"]),  # a (1, T, D) constant: add_tensor
        helper.make_node("Split", ["p", "sizes"], ["a", "b"], axis=2),
        helper.make_node("Transpose", ["a"], ["at"], perm=[0, 2, 1]),
        helper.make_node("Slice", ["at", "st", "en", "ax"], ["s"]),
        helper.make_node("Gather", ["b", "idx"], ["g"], axis=1),  # scalar index: the axis goes
        helper.make_node("Concat", ["g", "g"], ["c"], axis=1),
        helper.make_node("MatMul", ["s", "c3"], ["m"]),
        helper.make_node("Flatten", ["m"], ["f"], axis=1),
        helper.make_node("Concat", ["f", "c"], ["out"], axis=1),
    ]
    inits = {"pos": pos, "sizes": np.array([2, 4]), "st": np.array([1]), "en": np.array([-1]), "ax": np.array([2]),
             "idx": np.array(3), "c3": rng.normal(size=(2, 3))}
    model = _model(nodes, inits, [1, 4, 6], "out")
    g = from_onnx(model.SerializeToString())
    assert {"add_tensor", "slice", "transpose"} <= {n.op for n in g.nodes}
    x = rng.normal(size=(3, 4, 6)).astype(np.float32)
    ref = ReferenceEvaluator(model).run(None, {"x": x})[0]
    np.testing.assert_allclose(evaluate(g, x.astype(np.float64)), ref, atol=1e-5)


def test_refusals_name_the_reason() -> None:
    nodes = [helper.make_node("Add", ["x", "perbatch"], ["a"]),  # varies along the batch axis
             helper.make_node("Transpose", ["x"], ["t"], perm=[1, 0, 2]),
             helper.make_node("Gather", ["x", "ids"], ["e"], axis=1),
             helper.make_node("Concat", ["a", "t", "e"], ["out"], axis=1)]
    inits = {"perbatch": np.ones((2, 4, 6)), "ids": np.array([0, 2])}
    with pytest.raises(UnsupportedModelError) as err:
        from_onnx(_model(nodes, inits, [2, 4, 6], "out").SerializeToString())
    text = "\n".join(err.value.problems)
    assert "Add with a constant" in text and "moves the batch axis" in text and "one constant index" in text


def test_graph_validation_checks_transpose_perms() -> None:
    spec = TensorSpec("x", (-1, 4, 6))
    bad = Graph(inputs=[spec], nodes=[Node("t", "transpose", ("x",), {"perm": [1, 0, 2]})], outputs=["t"])
    assert any("perm" in p for p in bad.problems())
    ok = Graph(inputs=[spec], nodes=[Node("t", "transpose", ("x",), {"perm": [0, 2, 1]})], outputs=["t"])
    assert ok.problems() == []


def test_tanh_gelu_pattern_becomes_one_gelu() -> None:
    """GELU's tanh form (GPT-2's gelu_new), as torch.onnx writes it below opset 20 and
    with Pow(x, 3): one gelu node, within the documented 5e-4 of the tanh formula."""
    import io
    import warnings

    import torch
    from torch import nn

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 8), nn.GELU(approximate="tanh"), nn.Linear(8, 3)).eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, 8),), f, opset_version=17, dynamo=False)
    g = from_onnx(f.getvalue())
    assert [n.op for n in g.nodes] == ["linear", "gelu", "linear"]
    x = torch.randn(64, 8) * 3
    with torch.no_grad():
        ref = model(x).double().numpy()
    assert np.abs(evaluate(g, x.double().numpy()) - ref).max() < 5e-4 * 8
    c = {"three": np.array(3.0), "k": np.array(0.044715), "s": np.array((2 / np.pi) ** 0.5), "one": np.array(1.0),
         "half": np.array(0.5)}
    nodes = [helper.make_node("Pow", ["x", "three"], ["cube"]), helper.make_node("Mul", ["k", "cube"], ["kc"]),
             helper.make_node("Add", ["x", "kc"], ["inner"]), helper.make_node("Mul", ["s", "inner"], ["arg"]),
             helper.make_node("Tanh", ["arg"], ["t"]), helper.make_node("Add", ["one", "t"], ["p"]),
             helper.make_node("Mul", ["x", "p"], ["xp"]), helper.make_node("Mul", ["xp", "half"], ["out"])]
    model2 = _model(nodes, c, [1, 6], "out")
    g2 = from_onnx(model2.SerializeToString())
    assert [n.op for n in g2.nodes] == ["gelu"]
    xs = np.random.default_rng(1).normal(size=(5, 6)).astype(np.float32) * 3
    np.testing.assert_allclose(evaluate(g2, xs.astype(np.float64)), ReferenceEvaluator(model2).run(None, {"x": xs})[0],
                               atol=5e-4)
