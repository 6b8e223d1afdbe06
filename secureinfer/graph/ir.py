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
* ``flatten`` (start_dim); ``reshape`` (shape: target shape without the batch axis);
  ``transpose`` (perm: a permutation of every axis that keeps the batch first, perm[0] = 0);
  ``slice`` (axis >= 1, start, end: ``x[..., start:end, ...]``, step 1)
* ``add`` (two inputs, broadcasting); ``concat`` (axis, n inputs); ``add_tensor`` (bias:
  a parameter tensor broadcast over the batch, e.g. position embeddings or an additive
  attention mask)
* ``sigmoid``; ``tanh``; ``gelu``; ``softmax`` (axis); ``layernorm`` (axis = -1, size,
  eps, weight = None, bias = None: the importers emit gamma/beta as a following
  ``channel_affine``); ``clip`` (bound: symmetric, used for DP releases)
* ``matmul`` (two secret inputs, batched ``torch.matmul`` semantics; attention)
* ``argmax`` (added by the engine when the client asks for it)

Outputs. ``outputs[0]`` is the model's output (the engine's ``logits``). A classifier
may also declare ``labels``: the class label of each column of the *label scores*,
``outputs[1]`` if there is one (e.g. the scores before a softmax: the same argmax, and
no approximation between it and the label) else ``outputs[0]``; the engine's ``label``
output is then ``labels[argmax(scores)]`` (an integer). ``output_names`` maps the model's
own output names (an ONNX file's) to the engine outputs ``logits`` and ``label``, so a
client may ask for them by those names.

The engine (:mod:`secureinfer.engine.ops`) implements the ops; a graph whose ops it
cannot run is refused with one error listing every such node.

Names. Node and input names are *value names* (a node's output is referred to by its
name) and node names are also the namespace of the node's dealer material: the planner
names a step's items ``"<step>/<field>"`` and inserts steps of its own (``"<node>/pre0"``
truncations, ``"dp/trunc"``, ``"dp/clip"``, ``"argmax"``; the audit
uses ``"audit/..."``). Two steps with one name would draw the *same* mask and open
``X - A`` and ``Y - A``, which reveals ``X - Y``. So every graph obeys
:data:`NAME_RULE`: node and input names are unique, match :data:`NAME_PATTERN` (which has
no ``"/"``, the separator of every internal name) and are not one of
:data:`RESERVED_NAMES` (the internal names and namespaces without a ``"/"``). A user
name therefore never equals an internal step name nor the namespace (``dp``, ``audit``)
of the planner's own steps; steps derived from a node (``<node>/pre0``) live inside that
node's namespace, and :class:`~secureinfer.dealer.material.BundleBuilder` refuses any
item name generated twice, so a collision is an error, never a shared mask.
Parameter names match :data:`PARAM_NAME_PATTERN`. :meth:`Graph.name_problems` lists
every violation; constructing or parsing a graph that has any raises one
:class:`~secureinfer.errors.InvalidArgumentError` listing them all. Importers produce
conforming names with :func:`safe_name`.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from secureinfer.errors import InvalidArgumentError, UnsupportedModelError

__all__ = [
    "Graph", "MAX_NAME_LENGTH", "NAME_PATTERN", "NAME_RULE", "Node", "PARAM_NAME_PATTERN", "RESERVED_NAMES",
    "SUPPORTED_OPS", "TensorSpec", "safe_name",
]

SUPPORTED_OPS = (
    "linear", "conv2d", "channel_affine", "relu", "leaky_relu", "maxpool2d", "avgpool2d", "global_avgpool",
    "flatten", "reshape", "add", "concat", "sigmoid", "tanh", "gelu", "softmax", "layernorm", "matmul", "clip",
    "transpose", "add_tensor", "slice",
)
_PARAM_ATTRS = ("weight", "bias")
_FORMAT = "secureinfer.graph/1"

#: longest node, input or parameter name (parameter names may be twice as long: ``"<node>.<attr>"``)
MAX_NAME_LENGTH = 128
#: node and input names: a letter, digit or ``_``, then letters, digits, ``_ . -``; never ``"/"``
NAME_PATTERN = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.\-]{{0,{MAX_NAME_LENGTH - 1}}}")
#: parameter names (``"<node>.weight"``, possibly with ``_`` suffixes after folding)
PARAM_NAME_PATTERN = re.compile(rf"[A-Za-z0-9_][A-Za-z0-9_.\-]{{0,{2 * MAX_NAME_LENGTH - 1}}}")
#: names the planner, the DP release and the audit use for steps or namespaces of their own
#: most class labels a classifier may declare (its label is a dot product with them)
MAX_LABELS = 4096
#: largest vocabulary of a one-hot (token id) input
MAX_VOCAB = 1 << 17
RESERVED_NAMES = frozenset({"argmax", "dp", "audit"})
NAME_RULE = (f"names must be unique, match {NAME_PATTERN.pattern} (no '/') and not be one of "
             f"{sorted(RESERVED_NAMES)}")
_UNSAFE = re.compile(r"[^A-Za-z0-9_.\-]")
_MAX_MESSAGE = 4000  # characters of name problems in one error message


def safe_name(base: str) -> str:
    """A name matching :data:`NAME_PATTERN` derived from ``base`` (not checked for uniqueness).

    Every character outside ``[A-Za-z0-9_.-]`` (``"/"`` of ONNX node names, ``":"``, spaces)
    becomes ``_``; a name starting with ``.`` or ``-`` gets a ``_`` prefix; it is cut to
    :data:`MAX_NAME_LENGTH`; a reserved name gets a ``_`` suffix.
    """
    name = _UNSAFE.sub("_", base) or "node"
    if not NAME_PATTERN.fullmatch(name[:1]):
        name = "_" + name
    name = name[:MAX_NAME_LENGTH]
    if name in RESERVED_NAMES:
        name += "_"
    return name


def _show(name: str) -> str:
    """``repr`` of a name, cut to 80 characters (names come from the network)."""
    return repr(name) if len(name) <= 80 else f"{name[:80]!r}..."


def _bad_name(kind: str, name: str, pattern: re.Pattern[str]) -> str | None:
    if not isinstance(name, str) or not pattern.fullmatch(name):
        why = " (contains '/', the separator of internal names)" if "/" in str(name) else ""
        return f"{kind} name {_show(str(name))} does not match {pattern.pattern}{why}"
    if pattern is NAME_PATTERN and name in RESERVED_NAMES:
        return f"{kind} name {name!r} is reserved (one of {sorted(RESERVED_NAMES)})"
    return None


@dataclass(frozen=True)
class TensorSpec:
    """A named input or output: shape with ``-1`` for the batch dimension."""

    name: str
    shape: tuple[int, ...]
    #: the input is token ids sent one-hot: (batch, ..., one_hot) rows of 0/1 (see
    #: ``secureinfer.client.sdk.one_hot``); None for a numeric input
    one_hot: int | None = None

    def to_json(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"name": self.name, "shape": list(self.shape)}
        if self.one_hot is not None:  # only when set: older graphs keep their digests
            doc["one_hot"] = int(self.one_hot)
        return doc


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
    labels: tuple[int, ...] | None = None  # class label per column of the label scores
    output_names: dict[str, str] = field(default_factory=dict)  # model output name -> "logits" | "label"

    def __post_init__(self) -> None:
        for k, v in self.params.items():
            self.param_shapes.setdefault(k, tuple(v.shape))
        self.check_names()

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
        if self.labels is not None:  # only when set: older graphs keep their digests
            doc["labels"] = [int(c) for c in self.labels]
        if self.output_names:
            doc["output_names"] = dict(sorted(self.output_names.items()))
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
                inputs=[TensorSpec(str(i["name"]), tuple(int(d) for d in i["shape"]),
                                   one_hot=int(i["one_hot"]) if i.get("one_hot") is not None else None)
                        for i in doc["inputs"]],
                nodes=[
                    Node(str(n["name"]), str(n["op"]), tuple(str(x) for x in n["inputs"]), dict(n.get("attrs", {})))
                    for n in doc["nodes"]
                ],
                outputs=[str(o) for o in doc["outputs"]],
                frac_bits=int(doc["frac_bits"]),
                param_shapes={str(k): tuple(int(d) for d in v) for k, v in doc["params"].items()},
                labels=tuple(int(c) for c in doc["labels"]) if doc.get("labels") is not None else None,
                output_names={str(k): str(v) for k, v in dict(doc.get("output_names") or {}).items()},
            )
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as exc:
            raise InvalidArgumentError(f"malformed model graph: {exc}") from exc
        g.validate()
        return g

    # ------------------------------------------------------------------ validation
    def name_problems(self) -> list[str]:
        """Every violation of :data:`NAME_RULE` (bad, reserved or repeated names), all of them."""
        out: list[str] = []
        values = [("input", i.name) for i in self.inputs] + [("node", n.name) for n in self.nodes]
        for kind, name in values:
            bad = _bad_name(kind, name, NAME_PATTERN)
            if bad is not None:
                out.append(bad)
        for pname in self.param_shapes:
            bad = _bad_name("parameter", pname, PARAM_NAME_PATTERN)
            if bad is not None:
                out.append(bad)
        kinds: dict[str, dict[str, int]] = {}
        for kind, name in values:
            per = kinds.setdefault(name, {})
            per[kind] = per.get(kind, 0) + 1
        for name, per in kinds.items():
            k = sum(per.values())
            if k > 1:
                by = ", ".join(f"{c} {kind}{'s' if c > 1 else ''}" for kind, c in per.items())
                out.append(f"name {_show(name)} is used {k} times (by {by}); names must be unique")
        return out

    def check_names(self) -> None:
        """Raise one :class:`InvalidArgumentError` listing every name problem, if any.

        The message lists them all up to :data:`_MAX_MESSAGE` characters (it travels in a
        gRPC status, whose metadata is limited to a few KiB) and then says how many more
        there are; :meth:`name_problems` always has the full list.
        """
        probs = self.name_problems()
        if not probs:
            return
        lines: list[str] = []
        size = 0
        for p in probs:
            size += len(p) + 5
            if size > _MAX_MESSAGE and lines:
                lines.append(f"  ... and {len(probs) - len(lines)} more")
                break
            lines.append(f"  - {p}")
        raise InvalidArgumentError(f"the model graph has {len(probs)} invalid name(s) ({NAME_RULE}):\n"
                                   + "\n".join(lines))

    def problems(self) -> list[str]:
        """Every problem of the graph (names, unsupported ops, dangling inputs, shape mismatches)."""
        out: list[str] = self.name_problems()
        known = {i.name for i in self.inputs}
        if len(self.inputs) != 1:
            out.append(f"exactly one model input is supported, got {len(self.inputs)}")
        for i in self.inputs:
            if i.one_hot is not None and (not 2 <= i.one_hot <= MAX_VOCAB or i.shape[-1:] != (i.one_hot,)):
                out.append(f"input {i.name!r}: one_hot {i.one_hot} must be 2..{MAX_VOCAB} and its last dimension")
        for n in self.nodes:
            if n.op not in SUPPORTED_OPS:
                out.append(f"node {n.name!r}: unsupported op {n.op!r}")
            for i in n.inputs:
                if i not in known:
                    out.append(f"node {n.name!r}: input {i!r} is not defined before it")
            for attr in _PARAM_ATTRS:
                pname = n.attrs.get(attr)
                if pname is not None and (not isinstance(pname, str) or pname not in self.param_shapes):
                    out.append(f"node {n.name!r}: parameter {pname!r} ({attr}) missing")
            if n.op == "linear" and n.attrs.get("weight") in self.param_shapes:
                if self.param_shapes[n.attrs["weight"]] != (n.attrs.get("out_features"), n.attrs.get("in_features")):
                    out.append(f"node {n.name!r}: weight shape {self.param_shapes[n.attrs['weight']]} does not match attrs")
            if n.op == "transpose":
                perm = n.attrs.get("perm")
                if not isinstance(perm, list) or sorted(perm) != list(range(len(perm))) or perm[:1] != [0]:
                    out.append(f"node {n.name!r}: transpose perm {perm!r} is not a permutation with perm[0] = 0")
            if n.op in ("relu", "maxpool2d") and "int_bits" in n.attrs:
                b = n.attrs["int_bits"]
                if not isinstance(b, int) or isinstance(b, bool) or not 1 <= b <= 62:
                    out.append(f"node {n.name!r}: {n.op} int_bits {b!r} is not an integer in 1..62")
            known.add(n.name)
        for o in self.outputs:
            if o not in known:
                out.append(f"output {_show(str(o))} is not produced by any node")
        out.extend(self._output_problems())
        if not 1 <= self.frac_bits <= 30:
            out.append(f"frac_bits {self.frac_bits} outside 1..30")
        return out

    def _output_problems(self) -> list[str]:
        out: list[str] = []
        if not 1 <= len(self.outputs) <= (2 if self.labels is not None else 1):
            out.append(f"{len(self.outputs)} outputs: a graph has one, or two with labels (the second: the "
                       "label scores)")
        if self.labels is not None and not 2 <= len(self.labels) <= MAX_LABELS:
            out.append(f"{len(self.labels)} class labels (2..{MAX_LABELS})")
        if self.labels is not None and any(not -2**31 <= c < 2**31 for c in self.labels):
            out.append("class labels must be integers in [-2^31, 2^31)")
        if len(self.output_names) > 8:
            out.append(f"{len(self.output_names)} output names (at most 8)")
        for name, target in self.output_names.items():
            if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_LENGTH or not name.isprintable():
                out.append(f"output name {_show(str(name))} is not 1..{MAX_NAME_LENGTH} printable characters")
            if target not in ("logits", "label") or (target == "label" and self.labels is None):
                out.append(f"output name {_show(str(name))} maps to {_show(str(target))}: not 'logits'"
                           + (" or 'label'" if self.labels is not None else " (the graph has no labels)"))
        return out

    def validate(self) -> None:
        """Raise :class:`InvalidArgumentError` for bad names, else one
        :class:`UnsupportedModelError` listing every other problem."""
        self.check_names()
        probs = self.problems()
        if probs:
            raise UnsupportedModelError("the model cannot run under MPC", probs)

    def input_spec(self) -> TensorSpec:
        return self.inputs[0]
