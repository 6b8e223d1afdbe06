"""The model IR: a small, JSON-serializable graph of named nodes.

A :class:`Graph` is *public structure* (ops, attributes, shapes) plus *parameters*
(weights, held separately in ``params`` and never part of :meth:`Graph.public_json`).
Every importer produces this IR; the engine maps nodes to protocols and the dealer
derives the correlated randomness a model needs from the same public structure.

Ops (attributes). Tensors are batch-first; images NCHW. Parameter attributes
(``weight``, ``bias``) name entries of ``params`` in PyTorch layout.

* ``linear`` (in_features, out_features, weight, bias|None): y = x W^T + b, over the last axis
* ``conv2d`` (in_channels, out_channels, kernel_size [kh, kw], stride [sh, sw],
  padding [ph, pw], dilation [dh, dw], groups, weight, bias|None)
* ``channel_affine`` (axis, weight, bias|None): y = x * w[c] + b[c] along ``axis``
  (axes of ``channel_affine``, ``softmax`` and ``concat`` count the batch as axis 0)
  (BatchNorm in inference: folded into the preceding conv/linear, else this op)
* ``relu``; ``leaky_relu`` (negative_slope)
* ``maxpool2d`` / ``avgpool2d`` (kernel_size, stride, padding); ``global_avgpool``
* ``flatten`` (start_dim); ``reshape`` (shape: target shape without the batch axis)
* ``add`` (two inputs, broadcasting); ``concat`` (axis, n inputs)
* ``sigmoid``; ``tanh``; ``gelu``; ``softmax`` (axis); ``layernorm`` (axis = -1, size,
  eps, weight = None, bias = None: the importers emit gamma/beta as a following
  ``channel_affine``); ``clip`` (bound: symmetric, used for DP releases)
* ``matmul`` (two secret inputs, batched ``torch.matmul`` semantics; attention)
* ``argmax`` (added by the engine when the client asks for it)

The engine (:mod:`secureinfer.engine.ops`) implements the ops; a graph whose ops it
cannot run is refused with one error listing every such node.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secureinfer.errors import InvalidArgumentError, UnsupportedModelError

__all__ = ["Graph", "Node", "SUPPORTED_OPS", "TensorSpec"]

SUPPORTED_OPS = (
    "linear", "conv2d", "channel_affine", "relu", "leaky_relu", "maxpool2d", "avgpool2d", "global_avgpool",
    "flatten", "reshape", "add", "concat", "sigmoid", "tanh", "gelu", "softmax", "layernorm", "matmul", "clip",
)
_PARAM_ATTRS = ("weight", "bias")
_FORMAT = "secureinfer.graph/1"


@dataclass(frozen=True)
class TensorSpec:
    """A named input or output: shape with ``-1`` for the batch dimension."""

    name: str
    shape: tuple[int, ...]

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "shape": list(self.shape)}


@dataclass(frozen=True)
class Node:
    name: str
    op: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {"name": self.name, "op": self.op, "inputs": list(self.inputs), "attrs": self.attrs}


@dataclass
class Graph:
    """Public model structure plus (optionally) plaintext parameters."""

    inputs: list[TensorSpec]
    nodes: list[Node]
    outputs: list[str]
    frac_bits: int = 16
    params: dict[str, np.ndarray] = field(default_factory=dict)
    param_shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for k, v in self.params.items():
            self.param_shapes.setdefault(k, tuple(v.shape))

    # ------------------------------------------------------------------ serialization
    def public_json(self) -> bytes:
        """Canonical JSON of the structure only (no weights): what the dealer sees."""
        doc = {
            "format": _FORMAT,
            "frac_bits": self.frac_bits,
            "inputs": [i.to_json() for i in self.inputs],
            "nodes": [n.to_json() for n in self.nodes],
            "outputs": list(self.outputs),
            "params": {k: list(v) for k, v in sorted(self.param_shapes.items())},
        }
        return json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()

    def digest(self) -> str:
        return hashlib.sha256(self.public_json()).hexdigest()

    @classmethod
    def from_public_json(cls, data: bytes) -> "Graph":
        """Parse and validate a public graph received from the network."""
        try:
            doc = json.loads(data.decode())
            if doc.get("format") != _FORMAT:
                raise ValueError(f"unknown graph format {doc.get('format')!r}")
            g = cls(
                inputs=[TensorSpec(str(i["name"]), tuple(int(d) for d in i["shape"])) for i in doc["inputs"]],
                nodes=[
                    Node(str(n["name"]), str(n["op"]), tuple(str(x) for x in n["inputs"]), dict(n.get("attrs", {})))
                    for n in doc["nodes"]
                ],
                outputs=[str(o) for o in doc["outputs"]],
                frac_bits=int(doc["frac_bits"]),
                param_shapes={str(k): tuple(int(d) for d in v) for k, v in doc["params"].items()},
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(f"malformed model graph: {exc}") from exc
        g.validate()
        return g

    # ------------------------------------------------------------------ validation
    def problems(self) -> list[str]:
        """Every problem of the graph (unsupported ops, dangling inputs, shape mismatches)."""
        out: list[str] = []
        known = {i.name for i in self.inputs}
        if len(self.inputs) != 1:
            out.append(f"exactly one model input is supported, got {len(self.inputs)}")
        for n in self.nodes:
            if n.op not in SUPPORTED_OPS:
                out.append(f"node {n.name!r}: unsupported op {n.op!r}")
            for i in n.inputs:
                if i not in known:
                    out.append(f"node {n.name!r}: input {i!r} is not defined before it")
            for attr in _PARAM_ATTRS:
                pname = n.attrs.get(attr)
                if pname is not None and pname not in self.param_shapes:
                    out.append(f"node {n.name!r}: parameter {pname!r} ({attr}) missing")
            if n.op == "linear" and n.attrs.get("weight") in self.param_shapes:
                if self.param_shapes[n.attrs["weight"]] != (n.attrs.get("out_features"), n.attrs.get("in_features")):
                    out.append(f"node {n.name!r}: weight shape {self.param_shapes[n.attrs['weight']]} does not match attrs")
            known.add(n.name)
        for o in self.outputs:
            if o not in known:
                out.append(f"output {o!r} is not produced by any node")
        if not 1 <= self.frac_bits <= 30:
            out.append(f"frac_bits {self.frac_bits} outside 1..30")
        return out

    def validate(self) -> None:
        probs = self.problems()
        if probs:
            raise UnsupportedModelError("the model cannot run under MPC", probs)

    def input_spec(self) -> TensorSpec:
        return self.inputs[0]
