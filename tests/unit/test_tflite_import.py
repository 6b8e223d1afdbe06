"""TFLite import: files written by scripts/make_tflite.py (int8 weights) match the TFLite
reference interpreter in plaintext; quantization parameters are applied; every op that
cannot be mapped is named in one error; malformed files get a clear error."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import tflite
from ai_edge_litert.interpreter import Interpreter

from secureinfer.errors import InvalidArgumentError, UnsupportedModelError
from secureinfer.graph.load import load_model_file
from secureinfer.graph.passes import evaluate
from secureinfer.graph.tflite_import import from_tflite

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
from make_tflite import TfliteWriter, cnn_tflite  # noqa: E402


def interpret(model: bytes, x: np.ndarray) -> np.ndarray:
    it = Interpreter(model_content=model)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(inp["index"], x.astype(np.float32))
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


@pytest.mark.parametrize("hybrid", [False, True])
def test_int8_cnn_matches_the_reference_interpreter(hybrid: bool) -> None:
    model = cnn_tflite(seed=1, hybrid=hybrid)
    g = from_tflite(model)
    x = np.random.default_rng(5).random((64, 16, 16, 3))
    ref = interpret(model, x)
    got = evaluate(g, x)
    # DEQUANTIZE form: the dequantized float model exactly; hybrid: the interpreter also
    # quantizes the FULLY_CONNECTED input on the fly
    assert np.abs(got - ref).max() < (2e-3 if hybrid else 1e-6)
    assert (got.argmax(1) == ref.argmax(1)).all()
    assert g.input_spec().shape == (-1, 16, 16, 3)  # the client sends the model's NHWC input


def test_quantization_parameters_are_applied() -> None:
    op = tflite.BuiltinOperator
    w = TfliteWriter()
    x = w.tensor("x", (1, 3))
    q = np.array([[-128, 0, 127], [5, -7, 9]])
    wt = w.tensor("w", (2, 3), dtype="int8", data=q, scale=np.array([0.5, 0.25]), zero_point=np.array([2, -3]))
    y = w.tensor("y", (1, 2))
    w.op(op.FULLY_CONNECTED, [x, wt, -1], [y])
    g = from_tflite(w.finish([x], [y]))
    lin = next(n for n in g.nodes if n.op == "linear")
    expect = (q - np.array([[2], [-3]])) * np.array([[0.5], [0.25]])
    np.testing.assert_array_equal(g.params[lin.attrs["weight"]], expect)


def test_unmappable_ops_are_all_named_in_one_error() -> None:
    op = tflite.BuiltinOperator
    w = TfliteWriter()
    x = w.tensor("x", (1, 4))
    a, b, c = w.tensor("a", (1, 4)), w.tensor("b", (1, 8)), w.tensor("c", (1, 8))
    w.op(op.SQUARE, [x], [a])
    w.op(op.CONCATENATION, [x, x], [b])
    w.op(op.EXP, [b], [c])
    with pytest.raises(UnsupportedModelError) as err:
        from_tflite(w.finish([x], [c]))
    text = "\n".join(err.value.problems)
    assert "SQUARE" in text and "CONCATENATION" in text  # EXP's input is already unmapped: not repeated


def test_malformed_files_get_a_clear_error(tmp_path: Path) -> None:
    model = cnn_tflite(seed=0)
    with pytest.raises(InvalidArgumentError, match="TFL3"):
        from_tflite(b"not a model at all")
    for cut in (12, 200, len(model) // 2):
        with pytest.raises((InvalidArgumentError, UnsupportedModelError)):
            from_tflite(model[:cut])
    p = tmp_path / "m.tflite"
    p.write_bytes(model)
    assert [n.op for n in load_model_file(p).nodes] == [n.op for n in from_tflite(model).nodes]
