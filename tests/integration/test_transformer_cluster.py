"""Issue 10 (part): transformer blocks through their ONNX export and real dealer and party
processes -- a BERT-style encoder with a tanh pooler and a classification head, and a
GPT-style decoder with position embeddings and a causal mask (next-token logits).
Token embeddings are not part of these models (the input is the embedded sequence)."""

from __future__ import annotations

import io
import math
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from secureinfer.client.sdk import Client, deploy_graph
from secureinfer.graph.onnx_import import from_onnx
from secureinfer.graph.passes import evaluate
from secureinfer.localcluster import LocalCluster

pytestmark = pytest.mark.timeout(900)
D, HEADS, T = 32, 2, 8


class Attention(nn.Module):
    def __init__(self, *, causal: bool) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.register_buffer("mask", torch.triu(torch.full((T, T), -1e4), diagonal=1) if causal else torch.zeros(T, T))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, HEADS, d // HEADS).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // HEADS) + self.mask, dim=-1)
        return self.out((a @ v).transpose(1, 2).reshape(b, t, d))


class EncoderLayer(nn.Module):  # post-LN, as in BERT
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.ln1, self.ln2 = Attention(causal=False), nn.LayerNorm(D), nn.LayerNorm(D)
        self.ff = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.ln1(x + self.attn(x))
        return self.ln2(x + self.ff(x))


class DecoderLayer(nn.Module):  # pre-LN, as in GPT-2
    def __init__(self) -> None:
        super().__init__()
        self.attn, self.ln1, self.ln2 = Attention(causal=True), nn.LayerNorm(D), nn.LayerNorm(D)
        self.ff = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.ff(self.ln2(x))


class Bert(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, T, D) * 0.1)
        self.layers = nn.Sequential(EncoderLayer(), EncoderLayer())
        self.pooler, self.cls = nn.Linear(D, D), nn.Linear(D, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layers(x + self.pos)
        return self.cls(torch.tanh(self.pooler(h[:, 0])))


class Gpt(nn.Module):
    def __init__(self, vocab: int = 50) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, T, D) * 0.1)
        self.layers = nn.Sequential(DecoderLayer(), DecoderLayer())
        self.ln, self.head = nn.LayerNorm(D), nn.Linear(D, vocab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.layers(x + self.pos)))[:, -1]


def _onnx(model: nn.Module) -> bytes:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.randn(2, T, D),), f, opset_version=17, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}})
    return f.getvalue()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with LocalCluster(tmp_path_factory.mktemp("transformers"), request_timeout_s=120.0, rpc_timeout_s=60.0) as c:
        yield c


@pytest.mark.parametrize("kind", ["bert", "gpt"])
def test_transformer_through_onnx_and_real_parties(cluster: LocalCluster, kind: str) -> None:
    torch.manual_seed(7)
    model = (Bert() if kind == "bert" else Gpt()).eval()
    graph = from_onnx(_onnx(model))
    ops = {n.op for n in graph.nodes}
    assert {"matmul", "softmax", "layernorm", "gelu", "transpose", "slice", "add_tensor"} <= ops
    x = torch.randn(16, T, D, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(x).double().numpy()
    assert np.abs(evaluate(graph, x.double().numpy()) - ref).max() < 1e-5  # the import itself
    deploy_graph(graph, name=kind, config=cluster.config_path)
    with Client(cluster.config_path) as c:
        secure = np.concatenate([c.infer(kind, x[i:i + 8].numpy()) for i in range(0, 16, 8)])
    assert np.abs(secure - ref).max() <= 1e-2
    assert (secure.argmax(1) == ref.argmax(1)).all()
