"""Transformer models through both importers: torch.export and the ONNX export give the
same graph semantics (within float rounding) and match torch; what cannot be mapped is
refused with the reason."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from secureinfer.errors import UnsupportedModelError
from secureinfer.graph.onnx_import import from_onnx
from secureinfer.graph.passes import evaluate
from secureinfer.graph.torch_import import from_torch
from secureinfer.zoo_transformers import TinyBert, TinyGpt, to_onnx


@pytest.mark.parametrize("cls", [TinyBert, TinyGpt])
def test_torch_and_onnx_imports_agree(cls) -> None:
    model = cls(layers=2, hidden=32, heads=2, seq=8, seed=1)
    x = torch.randn(4, 8, 32, generator=torch.Generator().manual_seed(0))
    g_torch, g_onnx = from_torch(model, x[:1]), from_onnx(to_onnx(model, x[:2]))
    xs = x.double().numpy()
    with torch.no_grad():
        ref = model(x).double().numpy()
    assert np.abs(evaluate(g_torch, xs) - ref).max() < 1e-5
    assert np.abs(evaluate(g_torch, xs) - evaluate(g_onnx, xs)).max() < 1e-9
    assert {"transpose", "slice", "add_tensor", "matmul"} <= {n.op for n in g_torch.nodes}


class _BatchMover(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(1, 0, 2).reshape(x.shape[0], -1) + x[0:1].reshape(1, -1)


def test_permutes_and_slices_of_the_batch_axis_are_refused() -> None:
    with pytest.raises(UnsupportedModelError) as err:
        from_torch(_BatchMover(), torch.randn(2, 3, 4))
    text = "\n".join(err.value.problems)
    assert "moves the batch axis" in text


def test_token_ids_through_an_embedding_become_a_one_hot_input() -> None:
    from secureinfer.client.sdk import one_hot
    from secureinfer.errors import InvalidArgumentError, ShapeError
    from secureinfer.graph.ir import Graph

    model = TinyBert(layers=1, hidden=16, heads=2, seq=6, classes=3, vocab=40, seed=2)
    ids = torch.randint(0, 40, (5, 6), generator=torch.Generator().manual_seed(1))
    g = from_torch(model, ids[:1])
    spec = g.input_spec()
    assert spec.shape == (-1, 6, 40) and spec.one_hot == 40
    assert Graph.from_public_json(g.public_json()).input_spec() == spec  # travels to the parties
    assert g.nodes[0].op == "linear"  # one-hot rows times the table: nothing indexed by a secret
    with torch.no_grad():
        ref = model(ids).double().numpy()
    assert np.abs(evaluate(g, one_hot(ids.numpy(), 40).astype(np.float64)) - ref).max() < 1e-5
    g_onnx = from_onnx(to_onnx(model, ids[:2]))  # the ONNX export's Gather(table, ids): the same
    assert g_onnx.input_spec() == spec
    rows = one_hot(ids.numpy(), 40).astype(np.float64)
    assert np.abs(evaluate(g_onnx, rows) - evaluate(g, rows)).max() < 1e-9
    with pytest.raises(InvalidArgumentError, match=r"\[0, 40\)"):
        one_hot(np.array([[3, 40]]), 40)
    with pytest.raises(ShapeError):
        one_hot(np.array([[0.5]]), 40)


class _IdsArithmetic(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.embed(ids).flatten(1) + ids.float().sum(1, keepdim=True)


def test_an_integer_input_used_otherwise_is_refused() -> None:
    with pytest.raises(UnsupportedModelError, match="other ops than nn.Embedding"):
        from_torch(_IdsArithmetic(), torch.zeros(1, 3, dtype=torch.int64))
