"""ONNX op -> IR op handlers and subgraph patterns of the ONNX importer
(see :mod:`secureinfer.graph.onnx_import` for the supported-op table and opsets).

Each ``op_<OpType>(node, attrs)`` returns the IR value name of the node's first output or
raises :class:`~secureinfer.graph.builder.ImportProblem`. :class:`Patterns` finds the
subgraphs that exporters emit for one layer — the erf form of GELU and the
ReduceMean/Sub/Pow/Sqrt/Div form of LayerNorm (opset < 17) — so the importer can emit one
IR node for each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from secureinfer.graph.builder import Builder, ImportProblem

__all__ = ["OnnxOps", "Patterns", "attrs_of"]


def attrs_of(node: Any) -> dict[str, Any]:
    import onnx

    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _near(c: np.ndarray | None, value: float) -> bool:
    return c is not None and c.size == 1 and abs(float(c.reshape(-1)[0]) - value) < 1e-4 * max(1.0, abs(value))


class OnnxOps:
    """The op handlers; mixed into the importer, which provides the helpers used here."""

    b: Builder

    def const(self, name: str) -> np.ndarray | None:
        raise NotImplementedError

    def act(self, name: str) -> str | None:
        raise NotImplementedError

    def where(self, node: Any) -> str:
        raise NotImplementedError

    def base_name(self, node: Any) -> str:
        raise NotImplementedError

    def expect(self, name: str) -> tuple[int, ...] | None:
        raise NotImplementedError

    def emit(self, node: Any, op: str, inputs: list[str], attrs: dict[str, Any] | None = None,
             params: dict[str, np.ndarray | None] | None = None) -> str:
        raise NotImplementedError

    def x(self, node: Any, k: int = 0) -> str:
        raise NotImplementedError

    # ------------------------------------------------------------------ linear family
    def _linear(self, node: Any, x: str, w_in_out: np.ndarray, bias: np.ndarray | None) -> str:
        attrs = {"in_features": int(w_in_out.shape[0]), "out_features": int(w_in_out.shape[1])}
        return self.emit(node, "linear", [x], attrs, {"weight": w_in_out.T, "bias": bias})

    def op_Gemm(self, node: Any, a: dict[str, Any]) -> str:
        if a.get("transA", 0):
            raise ImportProblem("Gemm with transA=1 (transposed activation)", "transpose")
        w = self.const(node.input[1])
        if w is None:
            raise ImportProblem("Gemm with a non-constant B", "matmul")
        w = float(a.get("alpha", 1.0)) * (w.T if a.get("transB", 0) else w)
        c = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if len(node.input) > 2 and node.input[2] and c is None:
            raise ImportProblem("Gemm with a non-constant C")
        bias = None
        if c is not None:
            if c.ndim == 2 and c.shape[0] != 1:
                raise ImportProblem("Gemm with a per-row C")
            bias = np.broadcast_to(float(a.get("beta", 1.0)) * c.reshape(-1), (w.shape[1],))
        return self._linear(node, self.x(node), w, bias)

    def op_MatMul(self, node: Any, a: dict[str, Any]) -> str:
        xa, xb = self.act(node.input[0]), self.act(node.input[1])
        if xa is not None and xb is not None:
            return self.emit(node, "matmul", [xa, xb])
        w = self.const(node.input[1])
        if xa is not None and w is not None and w.ndim == 2:
            return self._linear(node, xa, w, None)
        raise ImportProblem("MatMul with a constant on the left or a batched constant", "transpose")

    def _pads(self, node: Any, a: dict[str, Any], spatial: Sequence[int], k: Sequence[int], s: Sequence[int],
              d: Sequence[int]) -> list[int]:
        auto = a.get("auto_pad", b"NOTSET")
        auto = auto.decode() if isinstance(auto, bytes) else str(auto)
        if auto == "VALID":
            return [0, 0]
        if auto in ("SAME_UPPER", "SAME_LOWER"):
            out = []
            for n, kk, ss, dd in zip(spatial, k, s, d):
                total = max((-(-n // ss) - 1) * ss + (kk - 1) * dd + 1 - n, 0)
                if total % 2:
                    raise ImportProblem(f"auto_pad={auto} with asymmetric padding", "conv_padding")
                out.append(total // 2)
            return out
        pads = list(a.get("pads", [0, 0, 0, 0]))
        if pads[:2] != pads[2:]:
            raise ImportProblem(f"asymmetric pads {pads}", "conv_padding")
        return [int(p) for p in pads[:2]]

    def op_Conv(self, node: Any, a: dict[str, Any]) -> str:
        x = self.x(node)
        w = self.const(node.input[1])
        if w is None:
            raise ImportProblem("Conv with a non-constant kernel")
        if w.ndim != 4:
            raise ImportProblem(f"{w.ndim - 2}-D Conv", "conv1d")
        k = [int(w.shape[2]), int(w.shape[3])]
        s, d = list(a.get("strides", [1, 1])), list(a.get("dilations", [1, 1]))
        pads = self._pads(node, a, self.b.shapes[x][2:], k, s, d)
        bias = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        g = int(a.get("group", 1))
        attrs = {"in_channels": int(w.shape[1]) * g, "out_channels": int(w.shape[0]), "kernel_size": k,
                 "stride": [int(v) for v in s], "padding": pads, "dilation": [int(v) for v in d], "groups": g}
        return self.emit(node, "conv2d", [x], attrs, {"weight": w, "bias": bias})

    def op_BatchNormalization(self, node: Any, a: dict[str, Any]) -> str:
        if a.get("training_mode", 0):
            raise ImportProblem("BatchNormalization in training mode", "training")
        scale, bias, mean, var = (self.const(i) for i in node.input[1:5])
        if any(v is None for v in (scale, bias, mean, var)):
            raise ImportProblem("BatchNormalization with non-constant statistics")
        w = scale.astype(np.float64) / np.sqrt(var.astype(np.float64) + float(a.get("epsilon", 1e-5)))
        return self.b.affine(self.x(node), weight=w, bias=bias - mean * w, axis=1, name=self.base_name(node),
                             origin=self.where(node))

    # ------------------------------------------------------------------ elementwise
    def op_Relu(self, node: Any, a: dict[str, Any]) -> str:
        return self.emit(node, "relu", [self.x(node)])

    def op_Clip(self, node: Any, a: dict[str, Any]) -> str:
        lo = self.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        hi = node.input[2] if len(node.input) > 2 else ""
        if _near(lo, 0.0) and not hi:
            return self.op_Relu(node, a)
        raise ImportProblem("Clip other than Clip(min=0)", "clamp")

    def op_LeakyRelu(self, node: Any, a: dict[str, Any]) -> str:
        return self.emit(node, "leaky_relu", [self.x(node)], {"negative_slope": float(a.get("alpha", 0.01))})

    def op_PRelu(self, node: Any, a: dict[str, Any]) -> str:
        slope = self.const(node.input[1])
        if slope is None or slope.size != 1:
            raise ImportProblem("PRelu with one slope per channel", "prelu")
        return self.emit(node, "leaky_relu", [self.x(node)], {"negative_slope": float(slope.reshape(-1)[0])})

    def op_Sigmoid(self, node: Any, a: dict[str, Any]) -> str:
        return self.emit(node, "sigmoid", [self.x(node)])

    def op_Tanh(self, node: Any, a: dict[str, Any]) -> str:
        return self.emit(node, "tanh", [self.x(node)])

    def op_Gelu(self, node: Any, a: dict[str, Any]) -> str:
        return self.emit(node, "gelu", [self.x(node)])

    def op_Softmax(self, node: Any, a: dict[str, Any]) -> str:
        x = self.x(node)
        axis = int(a.get("axis", -1)) % len(self.b.shapes[x])
        if axis == 0:
            raise ImportProblem("Softmax over the batch axis")
        return self.emit(node, "softmax", [x], {"axis": axis})

    def op_LayerNormalization(self, node: Any, a: dict[str, Any]) -> str:
        x = self.x(node)
        nd = len(self.b.shapes[x])
        if int(a.get("axis", -1)) % nd != nd - 1:
            raise ImportProblem("LayerNormalization over more than the last axis")
        scale = self.const(node.input[1])
        bias = self.const(node.input[2]) if len(node.input) > 2 and node.input[2] else None
        if scale is None or (len(node.input) > 2 and node.input[2] and bias is None):
            raise ImportProblem("LayerNormalization with non-constant scale or bias")
        attrs = {"axis": -1, "size": int(self.b.shapes[x][-1]), "eps": float(a.get("epsilon", 1e-5))}
        name, origin = self.base_name(node), self.where(node)
        y = self.b.emit("layernorm", [x], attrs, name=f"{name}.norm", params={"weight": None, "bias": None},
                        origin=origin)
        # scale, bias: a separate channel_affine on the last axis (the engine's convention)
        return self.b.affine(y, weight=scale, bias=bias, axis=nd - 1, name=name, origin=origin)

    def _binary(self, node: Any, a: dict[str, Any]) -> str:
        op = node.op_type
        p, q = self.act(node.input[0]), self.act(node.input[1])
        name, origin = self.base_name(node), self.where(node)
        if p is not None and q is not None:
            if op in ("Mul", "Div"):
                raise ImportProblem(f"element-wise {op} of two activations", op.lower())
            if op == "Sub":
                q = self.b.affine(q, weight=np.array(-1.0), bias=None, axis=1, name=f"{name}.neg", origin=origin)
            return self.emit(node, "add", [p, q])
        if p is None and q is None:
            raise ImportProblem(f"{op} of values the importer could not map")
        x, c = (p, self.const(node.input[1])) if p is not None else (q, self.const(node.input[0]))
        if c is None:
            raise ImportProblem(f"{op} with an input the importer could not map")
        c = c.astype(np.float64)
        if op == "Div" and p is None:
            raise ImportProblem("division by an activation", "div")
        if op in ("Mul", "Div"):
            y = self.b.const_affine(x, c if op == "Mul" else 1.0 / c, mul=True, name=name, origin=origin)
        elif op == "Sub" and p is None:  # c - x
            y = self.b.const_affine(x, np.array(-1.0), mul=True, name=f"{name}.neg", origin=origin)
            y = y and self.b.const_affine(y, c, mul=False, name=name, origin=origin)
        else:
            y = self.b.const_affine(x, -c if op == "Sub" else c, mul=False, name=name, origin=origin)
        if y is None and (op == "Add" or (op == "Sub" and p is not None)):
            # a full constant tensor: position embeddings, additive attention masks
            y = self.b.add_tensor(x, c if op == "Add" else -c, name=name, origin=origin)
        if y is None:
            raise ImportProblem(f"{op} with a constant that varies along more than one axis (the IR multiplies "
                               "by constants per channel only)")
        return y

    op_Add = op_Sub = op_Mul = op_Div = _binary

    def op_Neg(self, node: Any, a: dict[str, Any]) -> str:
        return self.b.affine(self.x(node), weight=np.array(-1.0), bias=None, axis=1, name=self.base_name(node),
                             origin=self.where(node))

    def op_Concat(self, node: Any, a: dict[str, Any]) -> str:
        xs = [self.act(i) for i in node.input]
        if any(v is None for v in xs):
            raise ImportProblem("Concat of a constant with activations")
        axis = int(a["axis"]) % len(self.b.shapes[xs[0]])
        if axis == 0:
            raise ImportProblem("Concat along the batch axis")
        return xs[0] if len(xs) == 1 else self.emit(node, "concat", xs, {"axis": axis})

    def _slice(self, node: Any, x: str, axis: int, start: int, end: int, suffix: str = "") -> str:
        return self.b.narrow(x, axis, start, end, name=self.base_name(node) + suffix, origin=self.where(node))

    def op_Split(self, node: Any, a: dict[str, Any]) -> dict[str, str]:
        x = self.x(node)
        nd = len(self.b.shapes[x])
        axis = int(a.get("axis", 0)) % nd
        n = self.b.shapes[x][axis]
        sizes = self.const(node.input[1]) if len(node.input) > 1 and node.input[1] else None
        if sizes is None:
            sizes = a.get("split")  # opset < 13
        if sizes is None:
            k = int(a.get("num_outputs", len(node.output)))
            sizes = [-(-n // k)] * (k - 1) + [n - (k - 1) * -(-n // k)]
        sizes = [int(v) for v in np.asarray(sizes).reshape(-1)]
        if sum(sizes) != n or len(sizes) != len(node.output):
            raise ImportProblem(f"Split sizes {sizes} of an axis of {n}")
        out, start = {}, 0
        for i, (o, size) in enumerate(zip(node.output, sizes)):
            out[o] = self._slice(node, x, axis, start, start + size, f".{i}")
            start += size
        return out

    def op_Slice(self, node: Any, a: dict[str, Any]) -> str:
        x = self.x(node)
        nd = len(self.b.shapes[x])
        starts, ends = self.const(node.input[1]), self.const(node.input[2])
        axes = self.const(node.input[3]) if len(node.input) > 3 and node.input[3] else np.arange(nd)[: len(starts)]
        steps = self.const(node.input[4]) if len(node.input) > 4 and node.input[4] else None
        if starts is None or ends is None or axes is None:
            raise ImportProblem("Slice with non-constant bounds")
        if steps is not None and (steps != 1).any():
            raise ImportProblem("Slice with a step other than 1")
        for k, (ax, st, en) in enumerate(zip(axes.reshape(-1), starts.reshape(-1), ends.reshape(-1))):
            big = 2 ** 62
            x = self._slice(node, x, int(ax) % nd, int(max(-big, min(big, st))), int(max(-big, min(big, en))),
                            f".{k}" if k else "")
        return x

    def op_Gather(self, node: Any, a: dict[str, Any]) -> str:
        table = self.const(node.input[0])
        if table is not None and self.act(node.input[1]) == "input" and getattr(self, "one_hot", None):
            # token ids, sent one-hot: one-hot rows times the table (a Linear), nothing indexed
            attrs = {"in_features": int(table.shape[0]), "out_features": int(table.shape[1])}
            return self.emit(node, "linear", ["input"], attrs, {"weight": table.T, "bias": None})
        x = self.act(node.input[0])
        idx = self.const(node.input[1])
        if x is None or idx is None or idx.size != 1:
            raise ImportProblem("Gather other than one constant index of an activation (embedding lookups: "
                                "send one-hot inputs and use a Linear)", "embedding")
        shape = self.b.shapes[x]
        axis = int(a.get("axis", 0)) % len(shape)
        i = int(idx.reshape(-1)[0])
        y = self._slice(node, x, axis, i, i + 1 if i != -1 else shape[axis])
        if idx.ndim == 0:  # a scalar index drops the axis
            out = tuple(d for k, d in enumerate(self.b.shapes[y]) if k != axis)
            y = self.b.reshape(y, out, name=f"{self.base_name(node)}.squeeze", origin=self.where(node))
        return y

    # ------------------------------------------------------------------ pooling
    def _pool(self, node: Any, a: dict[str, Any], op: str) -> str:
        x = self.x(node)
        k = [int(v) for v in a["kernel_shape"]]
        if len(k) != 2:
            raise ImportProblem(f"{len(k)}-D pooling", "max_pool1d" if op == "maxpool2d" else "avg_pool1d")
        s = [int(v) for v in a.get("strides", [1, 1])]
        if list(a.get("dilations", [1, 1])) != [1, 1]:
            raise ImportProblem("pooling with dilations", "maxpool_dilation")
        pads = self._pads(node, a, self.b.shapes[x][2:], k, s, [1, 1])
        if op == "avgpool2d" and any(pads) and not a.get("count_include_pad", 0):
            raise ImportProblem("AveragePool with pads and count_include_pad=0", "avgpool_exclude_pad")
        h, w = self.b.shapes[x][2:]
        floor = ((h + 2 * pads[0] - k[0]) // s[0] + 1, (w + 2 * pads[1] - k[1]) // s[1] + 1)
        exp = self.expect(node.output[0])
        if a.get("ceil_mode", 0) and exp is not None and tuple(exp[2:]) != floor:
            raise ImportProblem("ceil_mode=1 that changes the output size",
                               "maxpool_ceil" if op == "maxpool2d" else "avgpool_ceil")
        return self.emit(node, op, [x], {"kernel_size": k, "stride": s, "padding": pads})

    def op_MaxPool(self, node: Any, a: dict[str, Any]) -> str:
        return self._pool(node, a, "maxpool2d")

    def op_AveragePool(self, node: Any, a: dict[str, Any]) -> str:
        return self._pool(node, a, "avgpool2d")

    def op_GlobalAveragePool(self, node: Any, a: dict[str, Any]) -> str:
        return self.emit(node, "global_avgpool", [self.x(node)])

    def op_ReduceMean(self, node: Any, a: dict[str, Any]) -> str:
        x = self.x(node)
        shp = self.b.shapes[x]
        axes = a.get("axes")
        if axes is None and len(node.input) > 1 and node.input[1]:
            axes = self.const(node.input[1])
        dims = {int(v) % len(shp) for v in (axes if axes is not None else range(len(shp)))}
        if len(shp) != 4 or dims != {2, 3}:
            raise ImportProblem(f"ReduceMean over axes {sorted(dims)}", "mean")
        y = self.b.emit("global_avgpool", [x], name=self.base_name(node), origin=self.where(node))
        if not a.get("keepdims", 1):
            y = self.b.reshape(y, shp[:2], name=f"{self.base_name(node)}.flat", origin=self.where(node))
        return y

    # ------------------------------------------------------------------ shapes
    def _reshape(self, node: Any, out: Sequence[int]) -> str:
        return self.b.reshape(self.x(node), out, name=self.base_name(node), origin=self.where(node))

    def op_Flatten(self, node: Any, a: dict[str, Any]) -> str:
        shp = self.b.shapes[self.x(node)]
        axis = int(a.get("axis", 1)) % (len(shp) + 1)
        return self._reshape(node, (int(np.prod(shp[:axis])), int(np.prod(shp[axis:]))))

    def op_Reshape(self, node: Any, a: dict[str, Any]) -> str:
        shp = self.b.shapes[self.x(node)]
        target = self.const(node.input[1])
        if target is None:
            raise ImportProblem("Reshape to a shape computed from activations")
        tgt = [int(v) for v in target.reshape(-1)]
        if not a.get("allowzero", 0):
            tgt = [shp[i] if v == 0 else v for i, v in enumerate(tgt)]
        if -1 in tgt:
            known = int(np.prod([v for v in tgt if v != -1]))
            tgt[tgt.index(-1)] = int(np.prod(shp)) // max(known, 1)
        return self._reshape(node, tgt)

    def _axes(self, node: Any, a: dict[str, Any]) -> list[int] | None:
        if "axes" in a:
            return [int(v) for v in a["axes"]]
        if len(node.input) > 1 and node.input[1]:
            c = self.const(node.input[1])
            if c is None:
                raise ImportProblem("axes computed from activations")
            return [int(v) for v in c.reshape(-1)]
        return None

    def op_Squeeze(self, node: Any, a: dict[str, Any]) -> str:
        shp = list(self.b.shapes[self.x(node)])
        axes = self._axes(node, a)
        drop = {v % len(shp) for v in axes} if axes is not None else {i for i, d in enumerate(shp) if d == 1}
        return self._reshape(node, [d for i, d in enumerate(shp) if i not in drop])

    def op_Unsqueeze(self, node: Any, a: dict[str, Any]) -> str:
        out = list(self.b.shapes[self.x(node)])
        axes = self._axes(node, a) or []
        n = len(out) + len(axes)
        for ax in sorted(v % n for v in axes):
            out.insert(ax, 1)
        return self._reshape(node, out)

    def op_Transpose(self, node: Any, a: dict[str, Any]) -> str:
        x = self.x(node)
        nd = len(self.b.shapes[x])
        perm = [int(p) for p in a.get("perm", list(range(nd))[::-1])]
        if perm[:1] != [0]:
            raise ImportProblem(f"Transpose with perm {perm} moves the batch axis", "transpose")
        return x if perm == list(range(nd)) else self.emit(node, "transpose", [x], {"perm": perm})


class Patterns:
    """Finds GELU (``x * 0.5 * (1 + erf(x / sqrt 2))``) and decomposed LayerNorm subgraphs."""

    def __init__(self, graph: Any, consts: dict[str, np.ndarray], inferred: dict[str, tuple[Any, ...]]) -> None:
        self.graph, self.consts, self.inferred = graph, consts, inferred
        self.prod = {o: n for n in graph.node for o in n.output}
        self.cons: dict[str, list[Any]] = {}
        for n in graph.node:
            for i in n.input:
                self.cons.setdefault(i, []).append(n)
        self.skip: set[int] = set()
        self.final: dict[int, tuple[str, str, dict[str, Any]]] = {}

    def c(self, name: str) -> np.ndarray | None:
        """A constant input (initializer or Constant node) seen before folding."""
        if name in self.consts:
            return self.consts[name]
        n = self.prod.get(name)
        if n is not None and n.op_type == "Constant":
            from onnx import numpy_helper

            val = attrs_of(n)[n.attribute[0].name]
            return numpy_helper.to_array(val) if hasattr(val, "dims") else np.asarray(val)
        return None

    def only(self, name: str, op: str) -> Any | None:
        users = self.cons.get(name, [])
        return users[0] if len(users) == 1 and users[0].op_type == op else None

    def other(self, node: Any, name: str) -> str:
        return node.input[1] if node.input[0] == name else node.input[0]

    def find(self) -> "Patterns":
        for n in self.graph.node:
            if n.op_type == "Erf":
                self._gelu(n)
            elif n.op_type == "Tanh":
                self._gelu_tanh(n)
            elif n.op_type == "ReduceMean":
                self._layernorm(n)
        return self

    def _gelu(self, erf: Any) -> None:
        d = self.prod.get(erf.input[0])
        if d is None or d.op_type not in ("Div", "Mul"):
            return
        if d.op_type == "Div":
            x, ok = d.input[0], _near(self.c(d.input[1]), 2 ** 0.5)
        else:
            x = d.input[1] if self.c(d.input[0]) is not None else d.input[0]
            ok = _near(self.c(self.other(d, x)), 2 ** -0.5)
        if not ok:
            return
        add = self.only(erf.output[0], "Add")
        if add is None or not _near(self.c(self.other(add, erf.output[0])), 1.0):
            return
        m1 = self.only(add.output[0], "Mul")
        if m1 is None:
            return
        o = self.other(m1, add.output[0])
        chain = [d, erf, add, m1]
        if o == x:  # (x * (1 + erf)) * 0.5
            m2 = self.only(m1.output[0], "Mul")
            if m2 is None or not _near(self.c(self.other(m2, m1.output[0])), 0.5):
                return
            chain.append(m2)
        elif _near(self.c(o), 0.5):  # x * ((1 + erf) * 0.5)
            m2 = self.only(m1.output[0], "Mul")
            if m2 is None or self.other(m2, m1.output[0]) != x:
                return
            chain.append(m2)
        else:  # (x * 0.5) * (1 + erf)
            h = self.prod.get(o)
            if h is None or h.op_type != "Mul" or x not in h.input or not _near(self.c(self.other(h, x)), 0.5) \
                    or len(self.cons.get(h.output[0], [])) != 1:
                return
            chain.insert(0, h)
        if any(len(self.cons.get(n.output[0], [])) != 1 for n in chain[:-1] if n is not d) or \
                len(self.cons.get(d.output[0], [])) != 1:
            return
        self.skip.update(id(n) for n in chain[:-1])
        self.final[id(chain[-1])] = ("gelu", x, {})

    def _cube_of(self, name: str) -> tuple[str, list[Any]] | None:
        """``(x, nodes)`` if ``name`` is x^3: ``Pow(x, 3)`` or ``x * (x * x)`` in either order."""
        n = self.prod.get(name)
        if n is not None and n.op_type == "Pow" and _near(self.c(n.input[1]), 3.0):
            return n.input[0], [n]
        if n is None or n.op_type != "Mul":
            return None
        for x, sq in ((n.input[0], n.input[1]), (n.input[1], n.input[0])):
            q = self.prod.get(sq)
            if q is not None and q.op_type == "Mul" and list(q.input) == [x, x]:
                return x, [q, n]
        return None

    def _gelu_tanh(self, tanh: Any) -> None:
        """``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))`` (GELU's tanh form, as
        ``torch.onnx`` writes ``nn.GELU(approximate="tanh")`` below opset 20) -> one gelu
        (the exact GELU: they differ by < 5e-4, see ``engine.ops_nonlinear.Gelu``)."""
        m3 = self.prod.get(tanh.input[0])
        if m3 is None or m3.op_type != "Mul":
            return
        inner = next((i for i in m3.input if self.c(i) is None), None)
        if inner is None or not _near(self.c(self.other(m3, inner)), (2 / 3.141592653589793) ** 0.5):
            return
        add = self.prod.get(inner)
        if add is None or add.op_type != "Add":
            return
        x, m2, cube_nodes = None, None, []
        for cand in add.input:  # Add(x, 0.044715 * x^3), either order
            m = self.prod.get(self.other(add, cand))
            cube = next((i for i in m.input if self.c(i) is None), None) if m is not None and m.op_type == "Mul" else None
            found = self._cube_of(cube) if cube is not None and _near(self.c(self.other(m, cube)), 0.044715) else None
            if found is not None and found[0] == cand:
                x, m2, cube_nodes = cand, m, found[1]
                break
        if x is None or m2 is None:
            return
        one = self.only(tanh.output[0], "Add")
        if one is None or not _near(self.c(self.other(one, tanh.output[0])), 1.0):
            return
        m4 = self.only(one.output[0], "Mul")
        if m4 is None or self.other(m4, one.output[0]) != x:
            return
        m5 = self.only(m4.output[0], "Mul")
        if m5 is None or not _near(self.c(self.other(m5, m4.output[0])), 0.5):
            return
        chain = [*cube_nodes, m2, add, m3, tanh, one, m4]
        if any(len(self.cons.get(n.output[0], [])) != 1 for n in chain):
            return
        self.skip.update(id(n) for n in chain)
        self.final[id(m5)] = ("gelu", x, {})

    def _layernorm(self, rm1: Any) -> None:
        x = rm1.input[0]
        sub = next((n for n in self.cons.get(rm1.output[0], [])
                    if n.op_type == "Sub" and list(n.input) == [x, rm1.output[0]]), None)
        if sub is None or len(self.cons.get(rm1.output[0], [])) != 1:
            return
        users = self.cons.get(sub.output[0], [])
        pw = next((n for n in users if n.op_type == "Pow" and _near(self.c(n.input[1]), 2.0)), None)
        div = next((n for n in users if n.op_type == "Div" and n.input[0] == sub.output[0]), None)
        if pw is None or div is None or len(users) != 2:
            return
        rm2 = self.only(pw.output[0], "ReduceMean")
        add = rm2 and self.only(rm2.output[0], "Add")
        eps = add and self.c(self.other(add, rm2.output[0]))
        sq = add and self.only(add.output[0], "Sqrt")
        if sq is None or eps is None or div.input[1] != sq.output[0] or len(self.cons.get(sq.output[0], [])) != 1:
            return
        for rm in (rm1, rm2):
            axes = attrs_of(rm).get("axes")
            if axes is None and len(rm.input) > 1:
                axes = self.c(rm.input[1])
            rank = len(self.inferred.get(x, ()))
            if axes is None or [int(v) for v in np.asarray(axes).reshape(-1)] not in ([-1], [rank - 1]):
                return
        self.skip.update(id(n) for n in (rm1, sub, pw, rm2, add, sq))
        self.final[id(div)] = ("layernorm", x, {"eps": float(np.asarray(eps).reshape(-1)[0])})
