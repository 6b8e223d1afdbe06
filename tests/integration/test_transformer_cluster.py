"""Issue 10 (part): transformer blocks through their ONNX export (and torch.export) and
real dealer and party processes -- a BERT-style encoder with a tanh pooler and a classification head, and a
GPT-style decoder with position embeddings and a causal mask (next-token logits).
Token embeddings are not part of these models (the input is the embedded sequence)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from secureinfer.client.sdk import Client, deploy_graph
from secureinfer.graph.onnx_import import from_onnx
from secureinfer.graph.passes import evaluate
from secureinfer.graph.torch_import import from_torch
from secureinfer.localcluster import LocalCluster
from secureinfer.zoo_transformers import TinyBert, TinyGpt, to_onnx

pytestmark = pytest.mark.timeout(900)
T, D = 8, 32


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with LocalCluster(tmp_path_factory.mktemp("transformers"), request_timeout_s=120.0, rpc_timeout_s=60.0) as c:
        yield c


@pytest.mark.parametrize("kind,importer", [("bert", "onnx"), ("gpt", "onnx"), ("gpt", "torch")])
def test_transformer_through_real_parties(cluster: LocalCluster, kind: str, importer: str) -> None:
    kw = {"layers": 2, "hidden": D, "heads": 2, "seq": T, "seed": 7}
    model = TinyBert(classes=3, **kw) if kind == "bert" else TinyGpt(vocab=50, **kw)
    example = torch.randn(2, T, D)
    graph = from_onnx(to_onnx(model, example)) if importer == "onnx" else from_torch(model, example[:1])
    ops = {n.op for n in graph.nodes}
    assert {"matmul", "softmax", "layernorm", "gelu", "transpose", "slice", "add_tensor"} <= ops
    x = torch.randn(16, T, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x).double().numpy()
    assert np.abs(evaluate(graph, x.double().numpy()) - ref).max() < 1e-5  # the import itself
    name = f"{kind}-{importer}"
    deploy_graph(graph, name=name, config=cluster.config_path)
    with Client(cluster.config_path) as c:
        secure = np.concatenate([c.infer(name, x[i:i + 8].numpy()) for i in range(0, 16, 8)])
    assert np.abs(secure - ref).max() <= 1e-2
    assert (secure.argmax(1) == ref.argmax(1)).all()


def test_token_ids_sent_one_hot_through_real_parties(cluster: LocalCluster) -> None:
    """A BERT-style classifier over token ids (nn.Embedding): the client one-hot encodes the
    ids and secret-shares the rows; the parties multiply them by the shared table."""
    from secureinfer.client.sdk import one_hot

    vocab = 64
    model = TinyBert(layers=2, hidden=D, heads=2, seq=T, classes=3, vocab=vocab, seed=5)
    ids = torch.randint(0, vocab, (16, T), generator=torch.Generator().manual_seed(4))
    deploy_graph(from_torch(model, ids[:1]), name="bert-ids", config=cluster.config_path)
    with torch.no_grad():
        ref = model(ids).double().numpy()
    with Client(cluster.config_path) as c:
        secure = np.concatenate([c.infer("bert-ids", one_hot(ids[i:i + 8].numpy(), vocab)) for i in range(0, 16, 8)])
    assert np.abs(secure - ref).max() <= 1e-2
    assert (secure.argmax(1) == ref.argmax(1)).all()
