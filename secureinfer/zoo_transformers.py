"""Small transformer reference models (PyTorch modules) of the benchmarks and tests.

* :class:`TinyBert` — BERT-style: learned position embeddings, post-LN encoder layers
  (multi-head self-attention, GELU feed-forward), a tanh pooler on the first token and a
  classification head; the input is the embedded sequence (batch, seq, hidden), or
  token ids through an ``nn.Embedding`` (``vocab``).
* :class:`TinyGpt` — GPT-2-style: position embeddings, pre-LN decoder layers with a
  causal mask (an additive constant), final LayerNorm, next-token logits of the last
  position.

Written with Linear, reshape, transpose, matmul, softmax and LayerNorm so that their ONNX
export maps onto the IR (:func:`to_onnx`). Token ids (``TinyBert(vocab=...)``) are sent
one-hot by the client. Weights: torch's default
initialisation under a seed (benchmark data, not secret).
"""

from __future__ import annotations

import io
import math
import warnings

import torch
from torch import nn

__all__ = ["TinyBert", "TinyGpt", "to_onnx"]


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int, seq: int, *, causal: bool) -> None:
        super().__init__()
        self.heads = heads
        self.qkv, self.out = nn.Linear(hidden, 3 * hidden), nn.Linear(hidden, hidden)
        mask = torch.triu(torch.full((seq, seq), -1e4), diagonal=1) if causal else torch.zeros(seq, seq)
        self.register_buffer("mask", mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).split(d, dim=-1)
        q, k, v = (z.reshape(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d // self.heads) + self.mask, dim=-1)
        return self.out((a @ v).transpose(1, 2).reshape(b, t, d))


class _Layer(nn.Module):
    def __init__(self, hidden: int, heads: int, seq: int, *, decoder: bool) -> None:
        super().__init__()
        self.decoder = decoder
        self.attn = _Attention(hidden, heads, seq, causal=decoder)
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.ff = nn.Sequential(nn.Linear(hidden, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.decoder:  # pre-LN (GPT-2)
            x = x + self.attn(self.ln1(x))
            return x + self.ff(self.ln2(x))
        x = self.ln1(x + self.attn(x))  # post-LN (BERT)
        return self.ln2(x + self.ff(x))


class TinyBert(nn.Module):
    """``vocab``: the model takes token ids (batch, seq) through an ``nn.Embedding`` (they
    are sent one-hot, :func:`secureinfer.client.sdk.one_hot`); else embedded tokens."""

    def __init__(self, *, layers: int = 2, hidden: int = 128, heads: int = 2, seq: int = 32, classes: int = 2,
                 vocab: int | None = None, seed: int = 0) -> None:
        torch.manual_seed(seed)  # reproducible initial weights of a public reference model (not secret)
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden) if vocab else None
        self.pos = nn.Parameter(torch.randn(1, seq, hidden) * 0.1)  # public reference weights (not secret)
        self.layers = nn.Sequential(*(_Layer(hidden, heads, seq, decoder=False) for _ in range(layers)))
        self.pooler, self.cls = nn.Linear(hidden, hidden), nn.Linear(hidden, classes)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.embed is not None:
            x = self.embed(x)
        h = self.layers(x + self.pos)
        return self.cls(torch.tanh(self.pooler(h[:, 0])))


class TinyGpt(nn.Module):
    def __init__(self, *, layers: int = 2, hidden: int = 128, heads: int = 2, seq: int = 16, vocab: int = 256,
                 seed: int = 0) -> None:
        torch.manual_seed(seed)  # reproducible initial weights of a public reference model (not secret)
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, seq, hidden) * 0.1)  # public reference weights (not secret)
        self.layers = nn.Sequential(*(_Layer(hidden, heads, seq, decoder=True) for _ in range(layers)))
        self.ln, self.head = nn.LayerNorm(hidden), nn.Linear(hidden, vocab)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.layers(x + self.pos)))[:, -1]


def to_onnx(model: nn.Module, example: torch.Tensor, *, opset: int = 17) -> bytes:
    """The model's ONNX export (legacy exporter), with a symbolic batch axis."""
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (example,), f, opset_version=opset, dynamo=False, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": {0: "batch"}})
    return f.getvalue()
