"""Issue 10, tabular models: scikit-learn pipelines converted by skl2onnx deploy unchanged
and run through real dealer and party processes; labels agree with onnxruntime on every
row, probabilities within 1e-3."""

from __future__ import annotations

import warnings

import numpy as np
import onnxruntime as ort
import pytest
from sklearn.datasets import load_breast_cancer, load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split
from sklearn.neural_network import MLPClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from skl2onnx import to_onnx

from secureinfer.client.sdk import Client, deploy_graph
from secureinfer.errors import InvalidArgumentError
from secureinfer.graph.onnx_import import from_onnx
from secureinfer.localcluster import LocalCluster

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with LocalCluster(tmp_path_factory.mktemp("tabular"), request_timeout_s=120.0, rpc_timeout_s=60.0) as c:
        yield c


def _split(binary: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    x, y = load_breast_cancer(return_X_y=True) if binary else load_digits(return_X_y=True)
    x_tr, x_te, y_tr, _ = train_test_split(x.astype(np.float32), y, test_size=0.25, random_state=0, stratify=y)
    return x_tr, y_tr, x_te


def _onnx(clf, binary: bool) -> tuple[bytes, np.ndarray]:
    x_tr, y_tr, x_te = _split(binary)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        pipe = make_pipeline(StandardScaler(), clf).fit(x_tr, y_tr)
    return to_onnx(pipe, x_tr[:1]).SerializeToString(), x_te  # skl2onnx's defaults: ZipMap, lowest opset


def _reference(model: bytes, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    sess = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    label, probs = sess.run(None, {sess.get_inputs()[0].name: x})
    if not isinstance(probs, np.ndarray):  # ZipMap: one {class: probability} dict per row
        probs = np.array([[row[k] for k in sorted(row)] for row in probs])
    return np.asarray(label).reshape(-1), probs


@pytest.mark.parametrize("kind", ["logreg-digits", "logreg-binary", "mlp-digits"])
def test_sklearn_pipeline_through_real_parties_agrees_with_onnxruntime(cluster: LocalCluster, kind: str) -> None:
    binary = kind.endswith("binary")
    clf = MLPClassifier(hidden_layer_sizes=(32,), max_iter=300, random_state=0) if kind.startswith("mlp") \
        else LogisticRegression(max_iter=1000)
    model, x = _onnx(clf, binary)
    graph = from_onnx(model)
    assert graph.output_names == {"output_label": "label", "output_probability": "logits"}
    deploy_graph(graph, name=kind, config=cluster.config_path)
    ref_label, ref_probs = _reference(model, x)
    labels, probs = [], []
    with Client(cluster.config_path) as c:
        for i in range(0, len(x), 64):
            out = c.infer(kind, x[i:i + 64], outputs=("output_label", "output_probability"))
            labels.append(out["output_label"])
            probs.append(out["output_probability"])
        one = c.infer(kind, x[:3], outputs=("label",))  # the engine's own name for it
    labels_all, probs_all = np.concatenate(labels), np.concatenate(probs)
    assert labels_all.dtype == np.int64 and (labels_all == ref_label).all()
    assert np.abs(probs_all - ref_probs).max() <= 1e-3
    assert (one == ref_label[:3]).all()


def test_unknown_output_names_are_refused_with_the_available_ones(cluster: LocalCluster) -> None:
    model, x = _onnx(LogisticRegression(max_iter=1000), binary=True)
    deploy_graph(from_onnx(model), name="named-outputs", config=cluster.config_path)
    with Client(cluster.config_path) as c, pytest.raises(InvalidArgumentError, match="output_probability"):
        c.infer("named-outputs", x[:2], outputs=("probabilities",))


def test_cli_deploys_the_onnx_file_and_returns_every_output_asked_for(cluster: LocalCluster, tmp_path) -> None:
    import subprocess
    import sys

    model, x = _onnx(LogisticRegression(max_iter=1000), binary=False)
    (tmp_path / "pipe.onnx").write_bytes(model)
    np.save(tmp_path / "x.npy", x[:20])
    cli = [sys.executable, "-m", "secureinfer"]
    cfg = ["--config", str(cluster.config_path)]
    subprocess.run([*cli, "deploy", str(tmp_path / "pipe.onnx"), "--name", "cli-pipe", "--identity", "owner", *cfg],
                   check=True, capture_output=True, timeout=300)
    subprocess.run([*cli, "infer", "--model", "cli-pipe", "--input", str(tmp_path / "x.npy"),
                    "--output", str(tmp_path / "y.npz"), "--outputs", "output_label,output_probability", *cfg],
                   check=True, capture_output=True, timeout=300)
    got = np.load(tmp_path / "y.npz", allow_pickle=False)
    label, probs = _reference(model, x[:20])
    assert (got["output_label"] == label).all()
    assert np.abs(got["output_probability"] - probs).max() <= 1e-3
