"""Shared machinery of the importers: build an IR :class:`Graph` node by node.

A :class:`Builder` keeps the nodes, the parameters (float64 numpy, PyTorch layout), the
shape of every value (with a concrete batch axis, ``batch``) and the list of problems.
Each emitted node's output shape is computed by the IR's own shape rules
(:func:`secureinfer.graph.passes.node_shape`), so an importer can cross-check it against
the framework's shape and a wrong mapping is caught at import time, not at inference.

Importers never stop at the first unsupported node: they record a problem, give the
node's output an *opaque* value (known shape, no IR node) and continue, so that one
:class:`~secureinfer.errors.UnsupportedModelError` can list every problem at the end.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from secureinfer.errors import ShapeError, UnsupportedModelError
from secureinfer.graph.ir import MAX_NAME_LENGTH, RESERVED_NAMES, Graph, Node, TensorSpec, safe_name

__all__ = ["Builder", "ImportProblem", "OPAQUE"]

#: prefix of values produced by unsupported nodes (they never reach the graph)
OPAQUE = "\x00opaque:"


class ImportProblem(Exception):
    """A node the importer cannot map; ``kind`` keys :data:`secureinfer.graph.validate.SUGGESTIONS`."""

    def __init__(self, message: str, kind: str | None = None) -> None:
        super().__init__(message)
        self.kind = kind


class Builder:
    """Accumulates IR nodes, parameters, value shapes and problems."""

    def __init__(self, *, input_name: str, input_shape: Sequence[int], frac_bits: int) -> None:
        self.input_name = input_name
        self.batch = int(input_shape[0])
        self.frac_bits = frac_bits
        self.nodes: list[Node] = []
        self.params: dict[str, np.ndarray] = {}
        self.shapes: dict[str, tuple[int, ...]] = {input_name: tuple(int(d) for d in input_shape)}
        self.problems: list[str] = []
        self.origin: dict[str, str] = {}  # node name -> where it came from (for messages)
        self._names: set[str] = {input_name}

    # ------------------------------------------------------------------ naming
    def unique(self, base: str) -> str:
        """A node name not used yet, derived from ``base``, that obeys the IR's name rule.

        :func:`~secureinfer.graph.ir.safe_name` maps ``"/"`` (ONNX node names) and other
        characters to ``_`` and steers clear of reserved names; a ``_<k>`` suffix makes
        it unique (the base is shortened so the result stays within the length limit).
        """
        base = safe_name(base)
        name, k = base, 1
        while name in self._names or name in RESERVED_NAMES or f"{name}.weight" in self.params:
            suffix = f"_{k}"
            name = base[: MAX_NAME_LENGTH - len(suffix)] + suffix
            k += 1
        self._names.add(name)
        return name

    # ------------------------------------------------------------------ values
    def is_opaque(self, value: str) -> bool:
        return value.startswith(OPAQUE)

    def opaque(self, shape: Sequence[int], tag: str) -> str:
        """A placeholder value for the output of an unsupported node."""
        v = f"{OPAQUE}{tag}:{len(self.shapes)}"
        self.shapes[v] = tuple(int(d) for d in shape)
        return v

    def problem(self, message: str) -> None:
        self.problems.append(message)

    # ------------------------------------------------------------------ emission
    def emit(
        self, op: str, inputs: Sequence[str], attrs: dict[str, Any] | None = None, *, name: str,
        params: dict[str, np.ndarray | None] | None = None, origin: str = "", expect: Sequence[int] | None = None,
    ) -> str:
        """Append a node; returns its value name. Opaque inputs make the output opaque.

        ``params`` maps a parameter attribute (``weight``/``bias``) to its value; it is
        stored as ``"<node>.<attr>"``. ``expect`` is the framework's output shape: a
        disagreement with the IR's shape rule is recorded as a problem.
        """
        from secureinfer.graph.passes import node_shape

        attrs = dict(attrs or {})
        node_name = self.unique(name)
        staged: dict[str, np.ndarray] = {}
        for attr, value in (params or {}).items():
            if value is None:
                attrs[attr] = None
                continue
            pname = f"{node_name}.{attr}"
            staged[pname] = np.asarray(value, dtype=np.float64)
            attrs[attr] = pname
        if any(self.is_opaque(i) for i in inputs):
            return self.opaque(expect if expect is not None else self.shapes[inputs[0]], node_name)
        node = Node(node_name, op, tuple(inputs), attrs)
        try:
            shape = node_shape(node, [self.shapes[i] for i in inputs], {k: v.shape for k, v in staged.items()})
        except ShapeError as exc:
            self.problem(f"{origin or node_name}: {exc}")
            return self.opaque(expect if expect is not None else self.shapes[inputs[0]], node_name)
        if expect is not None and tuple(expect) != shape:
            self.problem(f"{origin or node_name}: importer bug — IR shape {shape} differs from the model's "
                         f"{tuple(expect)} ({op})")
        self.params.update(staged)
        self.nodes.append(node)
        self.shapes[node_name] = shape
        if origin:
            self.origin[node_name] = origin
        return node_name

    def affine(self, x: str, *, weight: np.ndarray, bias: np.ndarray | None, axis: int, name: str,
               origin: str = "") -> str:
        """``x * w + b`` along ``axis`` (positive) as ``channel_affine``; w, b broadcast to the axis."""
        n = self.shapes[x][axis]
        w = np.broadcast_to(np.asarray(weight, dtype=np.float64), (n,)).copy()
        b = None if bias is None else np.broadcast_to(np.asarray(bias, dtype=np.float64), (n,)).copy()
        if b is not None and not b.any():
            b = None
        if b is None and np.all(w == 1.0):
            return x
        return self.emit("channel_affine", [x], {"axis": axis}, name=name, params={"weight": w, "bias": b},
                         origin=origin)

    def const_affine(self, x: str, const: np.ndarray, *, mul: bool, name: str, origin: str) -> str | None:
        """``x * c`` (``mul``) or ``x + c`` for a constant ``c`` that varies along at most one axis.

        Returns None (and records nothing) when ``c`` varies along two axes or would
        broadcast ``x`` to a larger shape.
        """
        shape = self.shapes[x]
        c = np.asarray(const, dtype=np.float64)
        if c.ndim > len(shape):
            return None
        c = c.reshape((1,) * (len(shape) - c.ndim) + c.shape)
        if any(cd not in (1, xd) for cd, xd in zip(c.shape, shape)):
            return None
        varying = [i for i, d in enumerate(c.shape) if d != 1]
        if (varying and varying[0] == 0) or len(varying) > 1:
            return None
        axis = varying[0] if varying else (1 if len(shape) > 1 else 0)
        if axis == 0:
            return None
        vec = c.reshape(-1) if varying else np.full(shape[axis], float(c.reshape(-1)[0]))
        if mul:
            return self.affine(x, weight=vec, bias=None, axis=axis, name=name, origin=origin)
        return self.affine(x, weight=np.ones_like(vec), bias=vec, axis=axis, name=name, origin=origin)

    def add_tensor(self, x: str, c: np.ndarray, *, name: str, origin: str) -> str | None:
        """``x + c`` as ``add_tensor`` when the constant ``c`` broadcasts over ``x`` without
        touching the batch axis (a leading 1 allowed); None otherwise (nothing recorded)."""
        shape = tuple(self.shapes[x])
        if c.ndim == len(shape):
            if c.shape[0] != 1:
                return None
            c = c[0]
        try:
            if np.broadcast_shapes(c.shape, shape[1:]) != shape[1:]:
                return None
        except ValueError:
            return None
        return self.emit("add_tensor", [x], name=name, params={"bias": c}, origin=origin)

    def narrow(self, x: str, axis: int, start: int, end: int, *, name: str, origin: str) -> str:
        """``x[..., start:end, ...]`` along ``axis`` (Python slice semantics: negative and
        out-of-range bounds clamp) as ``slice``, or ``x`` itself for the whole axis;
        ImportProblem for a part of the batch axis."""
        shape = self.shapes[x]
        axis %= len(shape)
        n = shape[axis]
        start, end = max(0, min(n, start + n if start < 0 else start)), max(0, min(n, end + n if end < 0 else end))
        if (start, end) == (0, n):
            return x
        if axis == 0:
            raise ImportProblem("slicing the batch axis", "slice")
        return self.emit("slice", [x], {"axis": axis, "start": start, "end": end}, name=name, origin=origin)

    def reshape(self, x: str, out_shape: Sequence[int], *, name: str, origin: str) -> str:
        """A batch-preserving reshape of ``x`` to ``out_shape`` as ``flatten``/``reshape`` (or nothing);
        ImportProblem if it would move data across the batch axis."""
        src = self.shapes[x]
        out = tuple(int(d) for d in out_shape)
        if self.is_opaque(x):
            return self.opaque(out, name)
        if out == src:
            return x
        if not out or out[0] != src[0] or math.prod(out) != math.prod(src):
            raise ImportProblem(f"reshape {src} -> {out} mixes the batch axis with the others "
                                "(keep the batch first: x.flatten(1) or x.reshape(x.shape[0], ...))")
        for s in range(1, len(src)):
            if out == (*src[:s], math.prod(src[s:])):
                return self.emit("flatten", [x], {"start_dim": s}, name=name, origin=origin, expect=out)
        return self.emit("reshape", [x], {"shape": list(out[1:])}, name=name, origin=origin, expect=out)

    # ------------------------------------------------------------------ result
    def check_engine_ops(self) -> None:
        """Record every emitted node whose IR op the secure engine cannot run (with advice)."""
        from secureinfer.graph.validate import _engine_ops, suggestion

        ops = _engine_ops()
        for n in self.nodes:
            if n.op not in ops:
                hint = suggestion(n.op)
                self.problem(f"{self.origin.get(n.name, n.name)}: IR op {n.op!r} is not supported by the "
                             "secure engine yet" + (f" -> {hint}" if hint else ""))

    def finish(self, outputs: Sequence[str], *, what: str = "model") -> Graph:
        """The graph, or one UnsupportedModelError listing every recorded problem."""
        if not outputs:
            self.problem(f"the {what} has no tensor output")
        for o in outputs:
            if o == self.input_name:
                self.problem(f"the {what} returns its input unchanged")
        if self.problems:
            raise UnsupportedModelError(f"{len(self.problems)} unsupported layer(s) in the {what}", self.problems)
        spec = TensorSpec(self.input_name, (-1, *self.shapes[self.input_name][1:]))
        return Graph(inputs=[spec], nodes=list(self.nodes), outputs=list(outputs), frac_bits=self.frac_bits,
                     params=dict(self.params))
