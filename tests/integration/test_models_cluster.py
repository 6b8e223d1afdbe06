"""Issue 3 acceptance through real party processes: digits CNN (whole test split), LeNet
and a small ResNet (random weights, 64 random inputs each), PyTorch vs ONNX import."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from secureinfer.client.sdk import Client, deploy, deploy_graph
from secureinfer.demo import load_digits_split, train_digits_cnn
from secureinfer.graph.onnx_import import from_onnx
from secureinfer.localcluster import LocalCluster
from secureinfer.zoo import lenet, small_resnet

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with LocalCluster(tmp_path_factory.mktemp("models"), request_timeout_s=120.0, rpc_timeout_s=60.0) as c:
        yield c


def _run(cluster: LocalCluster, name: str, x: np.ndarray, *, batch: int) -> np.ndarray:
    out = []
    with Client(cluster.config_path) as c:
        for i in range(0, len(x), batch):
            out.append(c.infer(name, x[i : i + batch]))
    return np.concatenate(out)


def _check(secure: np.ndarray, model: nn.Module, x: np.ndarray) -> None:
    with torch.no_grad():
        ref = model(torch.from_numpy(x)).double().numpy()
    assert np.abs(secure - ref).max() <= 1e-2
    assert (secure.argmax(1) == ref.argmax(1)).all()


def test_digits_cnn_whole_test_split(cluster: LocalCluster) -> None:
    x_tr, x_te, y_tr, y_te = load_digits_split()
    model = train_digits_cnn(x_tr, y_tr, epochs=8)
    imgs = x_te.reshape(-1, 1, 8, 8)
    deploy(model, torch.from_numpy(imgs[:1]), name="digits-cnn", config=cluster.config_path)
    _check(_run(cluster, "digits-cnn", imgs, batch=90), model, imgs)


def test_lenet_random_weights_64_inputs(cluster: LocalCluster) -> None:
    model = lenet(seed=3)
    x = torch.rand(64, 1, 28, 28, generator=torch.Generator().manual_seed(1)).numpy()
    deploy(model, torch.from_numpy(x[:1]), name="lenet", config=cluster.config_path)
    _check(_run(cluster, "lenet", x, batch=16), model, x)


@pytest.mark.parametrize("n_inputs", [pytest.param(64, marks=pytest.mark.slow), 8])
def test_small_resnet_random_weights(cluster: LocalCluster, n_inputs: int) -> None:
    """The acceptance run (64 inputs, ~3 min on 2 cores) is marked slow; 8 by default."""
    model = small_resnet(seed=4)
    x = torch.rand(n_inputs, 3, 32, 32, generator=torch.Generator().manual_seed(2)).numpy()
    deploy(model, torch.from_numpy(x[:1]), name=f"resnet{n_inputs}", config=cluster.config_path)
    _check(_run(cluster, f"resnet{n_inputs}", x, batch=4), model, x)


def test_pytorch_and_onnx_imports_give_the_same_secure_outputs(cluster: LocalCluster, tmp_path) -> None:
    model = lenet(seed=5)
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(3))
    path = tmp_path / "lenet.onnx"
    torch.onnx.export(model, (x[:1],), str(path), dynamo=False, input_names=["input"],
                      dynamic_axes={"input": {0: "batch"}})
    deploy(model, x[:1], name="lenet-pt", config=cluster.config_path)
    deploy_graph(from_onnx(path), name="lenet-onnx", config=cluster.config_path)
    a = _run(cluster, "lenet-pt", x.numpy(), batch=8)
    b = _run(cluster, "lenet-onnx", x.numpy(), batch=8)
    assert np.abs(a - b).max() <= 1e-3  # float32 ONNX weights vs float64: at most a few ulps apart
    assert (a.argmax(1) == b.argmax(1)).all()
    _check(b, model, x.numpy())


def test_tflite_cnn_with_int8_weights_64_inputs(cluster: LocalCluster, tmp_path) -> None:
    """Issue 10: a .tflite CNN (int8 weights, written by scripts/make_tflite.py) deployed as a
    file, through real parties: the reference interpreter's argmax on 64 inputs."""
    import sys
    from pathlib import Path

    from ai_edge_litert.interpreter import Interpreter

    from secureinfer.graph.load import load_model_file

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    from make_tflite import cnn_tflite

    model = cnn_tflite(seed=2)
    path = tmp_path / "cnn.tflite"
    path.write_bytes(model)
    deploy_graph(load_model_file(path), name="tflite-cnn", config=cluster.config_path)
    x = np.random.default_rng(3).random((64, 16, 16, 3)).astype(np.float32)
    it = Interpreter(model_content=model)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(inp["index"], x)
    it.invoke()
    ref = it.get_tensor(it.get_output_details()[0]["index"]).astype(np.float64)
    secure = _run(cluster, "tflite-cnn", x, batch=16)
    assert np.abs(secure - ref).max() <= 1e-2
    assert (secure.argmax(1) == ref.argmax(1)).all()
