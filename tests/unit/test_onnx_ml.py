"""ONNX-ML import (skl2onnx pipelines): the IR matches onnxruntime in plaintext, labels
travel in the public graph, and unsupported parts are all named in one error."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.ensemble import RandomForestClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import Normalizer, StandardScaler
from skl2onnx import to_onnx

from secureinfer.engine.plan import compile_plan
from secureinfer.errors import UnsupportedModelError
from secureinfer.graph.ir import Graph
from secureinfer.graph.onnx_import import from_onnx
from secureinfer.graph.passes import evaluate


def _data(binary: bool = False) -> tuple[np.ndarray, np.ndarray]:
    x, y = load_breast_cancer(return_X_y=True) if binary else load_digits(return_X_y=True)
    return x.astype(np.float32), y


def _convert(steps, binary: bool = False, **kw) -> tuple[bytes, np.ndarray]:
    x, y = _data(binary)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe = make_pipeline(*steps).fit(x, y)
    return to_onnx(pipe, x[:1], **kw).SerializeToString(), x[:100]


def _ort(model: bytes, x: np.ndarray) -> list:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})


@pytest.mark.parametrize("kind", ["logreg", "logreg-binary", "mlp"])
def test_classifier_pipelines_match_onnxruntime_in_plaintext(kind: str) -> None:
    clf = MLPClassifier(hidden_layer_sizes=(16,), max_iter=100, random_state=0) if kind == "mlp" \
        else LogisticRegression(max_iter=1000)
    model, x = _convert([StandardScaler(), clf], binary=kind.endswith("binary"))
    g = from_onnx(model)
    assert g.output_names == {"output_label": "label", "output_probability": "logits"}
    assert len(g.outputs) == 2 and g.labels is not None  # probabilities, then the scores the label uses
    label, probs = _ort(model, x)
    probs = np.array([[row[k] for k in sorted(row)] for row in probs])
    values = evaluate(g, x.astype(np.float64), all_values=True)
    assert np.abs(values[g.outputs[0]] - probs).max() < 1e-5
    assert (np.asarray(g.labels)[values[g.outputs[1]].argmax(1)] == label).all()


def test_class_labels_need_not_be_column_indices() -> None:
    x, y = _data()
    y = np.array([3, 7, 11, 2, 5, 8, 13, 1, 0, 42])[y]  # labels that are not 0..9 in order
    pipe = make_pipeline(StandardScaler(), MLPClassifier(hidden_layer_sizes=(8,), max_iter=50, random_state=0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe.fit(x, y)
    model = to_onnx(pipe, x[:1]).SerializeToString()
    g = from_onnx(model)
    assert sorted(g.labels) == [0, 1, 2, 3, 5, 7, 8, 11, 13, 42]
    values = evaluate(g, x[:50].astype(np.float64), all_values=True)
    assert (np.asarray(g.labels)[values[g.outputs[1]].argmax(1)] == _ort(model, x[:50])[0]).all()


def test_linear_regressor_pipeline() -> None:
    x, y = _data(binary=True)
    model = to_onnx(make_pipeline(StandardScaler(), LinearRegression()).fit(x, y.astype(np.float32)),
                    x[:1]).SerializeToString()
    g = from_onnx(model)
    assert g.labels is None and g.output_names == {}
    assert np.abs(evaluate(g, x[:50].astype(np.float64)).reshape(-1) - _ort(model, x[:50])[0].reshape(-1)).max() < 1e-4


def test_the_plan_adds_the_label_output_for_argmax_requests() -> None:
    model, _ = _convert([StandardScaler(), LogisticRegression(max_iter=1000)])
    plan = compile_plan(from_onnx(model), batch=4, n_parties=2, argmax=True)
    assert set(plan.outputs) == {"logits", "argmax", "label"}
    assert plan.specs[plan.outputs["label"]].shape == (4,) and plan.specs[plan.outputs["label"]].scale == 0


def test_labels_and_output_names_travel_in_the_public_graph_and_old_graphs_keep_their_digest() -> None:
    model, _ = _convert([StandardScaler(), LogisticRegression(max_iter=1000)], binary=True)
    g = from_onnx(model)
    back = Graph.from_public_json(g.public_json())
    assert back.labels == g.labels == (0, 1) and back.output_names == g.output_names
    plain = Graph(inputs=g.inputs, nodes=g.nodes, outputs=g.outputs[:1], param_shapes=g.param_shapes)
    assert b"labels" not in plain.public_json() and b"output_names" not in plain.public_json()


def test_bad_label_declarations_are_listed() -> None:
    model, _ = _convert([StandardScaler(), LogisticRegression(max_iter=1000)], binary=True)
    g = from_onnx(model)
    bad = Graph(inputs=g.inputs, nodes=g.nodes, outputs=g.outputs, param_shapes=g.param_shapes, labels=None,
                output_names={"y": "label", "z": "probabilities"})
    probs = bad.problems()
    assert any("2 outputs" in p for p in probs)
    huge = Graph(inputs=g.inputs, nodes=g.nodes, outputs=g.outputs, param_shapes=g.param_shapes, labels=(0, 2**63))
    assert any("[-2^31, 2^31)" in p for p in huge.problems())
    assert any("'y' maps to 'label'" in p and "no labels" in p for p in probs)
    assert any("'z' maps to 'probabilities'" in p for p in probs)


def test_unsupported_pipeline_parts_are_all_named_in_one_error() -> None:
    model, _ = _convert([Normalizer(norm="l2"), RandomForestClassifier(n_estimators=2, max_depth=2, random_state=0)])
    with pytest.raises(UnsupportedModelError) as err:
        from_onnx(model)
    text = str(err.value) + " ".join(getattr(err.value, "problems", []) or [])
    assert "Normalizer(norm=L2)" in text and "TreeEnsembleClassifier" in text


def test_a_near_unit_scaler_folds_into_the_classifier_and_a_tiny_one_does_not() -> None:
    digits, _ = _convert([StandardScaler(), LogisticRegression(max_iter=1000)])
    cancer, _ = _convert([StandardScaler(), LogisticRegression(max_iter=1000)], binary=True)
    # digits pixels have std ~1-6: the Scaler folds into the linear (one round less)
    assert [n.op for n in from_onnx(digits).nodes] == ["linear", "softmax"]
    # breast-cancer features have std up to ~500: folding 2e-3 scales would lose weight bits
    assert [n.op for n in from_onnx(cancer).nodes] == ["channel_affine", "linear", "sigmoid"]
    x, _ = _data()
    label, probs = _ort(digits, x[:100])
    g = from_onnx(digits)
    values = evaluate(g, x[:100].astype(np.float64), all_values=True)
    probs = np.array([[row[k] for k in sorted(row)] for row in probs])
    assert np.abs(values[g.outputs[0]] - probs).max() < 1e-5
