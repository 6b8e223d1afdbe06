"""PyTorch importer: any ``nn.Module`` (or ``ExportedProgram``, or TorchScript) -> IR.

Tracing: ``torch.export.export(module, (x,), strict=False)``. We chose torch.export over
``torch.fx.symbolic_trace`` because on current PyTorch (2.5+) it is the supported capture
path: it runs the model's Python normally (non-strict), so shape-dependent code
(``x.view(x.size(0), -1)``, ``if x.dim() == 4``) works where symbolic tracing fails, and
it yields a small, normalized ATen vocabulary (``aten.conv2d``, ``aten.linear``,
``aten.batch_norm``, ...) with every argument explicit and every value's shape attached
(``node.meta["val"]``) — the shape propagation the IR needs. fx would give us the user's
spelling instead (``F.relu``, ``torch.relu``, ``x.relu()``, ``nn.ReLU`` ...). The price
is a one-time warm-up of a few seconds per process and ~0.2 s per model after that.

The model is traced on a batch of 2 so that the batch axis cannot be confused with a
feature axis of size 1: every value must keep the batch first (a ``view(1, -1)`` is
reported). Constant subexpressions (parameter transposes, ``x.size(0)``, ``torch.tensor``
constants) are folded while importing. Module -> IR op:

==========================================  =======================================
PyTorch                                     IR
==========================================  =======================================
nn.Linear, x @ W (constant W), F.linear     linear
nn.Conv2d (stride, padding int/tuple/       conv2d
'same'/'valid', dilation, groups)
nn.BatchNorm1d/2d (eval)                    channel_affine (folded by the passes)
x * c, x / c, x + c, x - c (c constant      channel_affine (folded by the passes)
per channel or scalar), -x
nn.ReLU, F.relu, torch.relu, clamp(min=0)   relu
nn.LeakyReLU, nn.PReLU(1)                   leaky_relu
nn.MaxPool2d                                maxpool2d
nn.AvgPool2d, AdaptiveAvgPool2d(divisor)    avgpool2d
nn.AdaptiveAvgPool2d(1), x.mean((2, 3))     global_avgpool
nn.Flatten, flatten, view, reshape,         flatten / reshape (batch axis kept)
unsqueeze, squeeze
a + b, torch.add, a - b                     add
torch.cat                                   concat
nn.Softmax, F.softmax; nn.Sigmoid;          softmax; sigmoid; tanh; gelu
nn.Tanh; nn.GELU
nn.LayerNorm (last axis)                    layernorm
a @ b, torch.matmul (two activations)       matmul
nn.Dropout, nn.Identity, clone, casts       (dropped)
==========================================  =======================================

``nn.GELU(approximate='tanh')`` is imported as the IR's exact ``gelu`` (they differ by
< 5e-4). Everything else is reported — every node, in one
:class:`~secureinfer.errors.UnsupportedModelError`, with a suggested rewrite from
:data:`secureinfer.graph.validate.SUGGESTIONS` where one exists.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from secureinfer.errors import InvalidArgumentError, UnsupportedModelError
from secureinfer.graph.builder import Builder, ImportProblem
from secureinfer.graph.ir import Graph
from secureinfer.graph.validate import suggestion

__all__ = ["from_exported", "from_script", "from_torch"]

_ALIAS = {"clone", "contiguous", "detach", "alias", "lift_fresh_copy", "_to_copy", "to", "type_as", "view_as_real"}
_RESHAPE = {"view", "reshape", "_unsafe_view", "flatten", "unsqueeze", "squeeze", "view_as", "expand_as"}
_DROPOUT = {"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "native_dropout"}


def _pair(v: Any) -> list[int]:
    if isinstance(v, (list, tuple)):
        return [int(v[0]), int(v[0])] if len(v) == 1 else [int(v[0]), int(v[1])]
    return [int(v), int(v)]


def _bind(target: Any, args: Sequence[Any], kwargs: dict[str, Any]) -> dict[str, Any]:
    """Arguments of an ATen call by schema name, defaults filled in."""
    out: dict[str, Any] = {}
    for i, a in enumerate(target._schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


def _pool_floor(h: int, k: int, s: int, p: int, d: int = 1) -> int:
    return (h + 2 * p - d * (k - 1) - 1) // s + 1


class _Importer:
    """Walks an ExportedProgram's ATen graph and emits IR nodes into a Builder."""

    def __init__(self, ep: torch.export.ExportedProgram, frac_bits: int) -> None:
        self.ep = ep
        self.frac_bits = frac_bits
        self.consts: dict[str, Any] = {}
        self.fqn: dict[str, str] = {}
        self.vals: dict[str, Any] = {}
        self.b: Builder | None = None
        self.module_problems: dict[str, list[tuple[str, str | None]]] = {}

    # ------------------------------------------------------------------ helpers
    def act(self, arg: Any) -> str | None:
        return self.vals.get(arg.name) if isinstance(arg, fx.Node) else None

    def const(self, arg: Any) -> torch.Tensor | None:
        if isinstance(arg, fx.Node):
            v = self.consts.get(arg.name)
            return v if isinstance(v, torch.Tensor) else None
        if isinstance(arg, (int, float)) and not isinstance(arg, bool):
            return torch.tensor(float(arg), dtype=torch.float64)
        return None

    @staticmethod
    def shape(node: fx.Node) -> tuple[int, ...]:
        val = node.meta.get("val")
        if not isinstance(val, torch.Tensor):
            raise ImportProblem("produces a value that is not a tensor")
        try:
            return tuple(int(d) for d in val.shape)
        except (TypeError, ValueError) as exc:
            raise ImportProblem("has a dynamic (symbolic) shape; export with static shapes") from exc

    def where(self, node: fx.Node) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        path, typ = next(reversed(stack.values())) if stack else ("", "")
        typ = typ if isinstance(typ, str) else getattr(typ, "__name__", str(typ))
        short = ("nn." + typ.rsplit(".", 1)[-1]) if typ.startswith("torch.nn.modules.") else typ.rsplit(".", 1)[-1]
        if path and typ.startswith("torch.nn.modules."):
            return f"{path} ({short})"
        lines = [ln.strip() for ln in str(node.meta.get("stack_trace") or "").strip().splitlines()]
        src = ""
        if len(lines) >= 2 and lines[-2].startswith("File "):
            loc = lines[-2].split('"')
            fname = loc[1].rsplit("/", 1)[-1] if len(loc) > 1 else "?"
            lineno = lines[-2].split("line ")[-1].split(",")[0]
            src = f" at {fname}:{lineno} `{lines[-1]}`"
        return f"node {node.name!r}{(' in ' + path) if path else ''}{src}"

    def base_name(self, node: fx.Node, a: dict[str, Any]) -> str:
        stack = node.meta.get("nn_module_stack") or {}
        if stack:
            path, typ = next(reversed(stack.values()))
            if path and str(typ).startswith("torch.nn.modules."):
                return path
        w = a.get("weight")
        if isinstance(w, fx.Node) and self.fqn.get(w.name, "").endswith(".weight"):
            return self.fqn[w.name][: -len(".weight")]
        if stack:
            path = next(reversed(stack.values()))[0]
            return f"{path}.{node.name}" if path else node.name
        return node.name

    # ------------------------------------------------------------------ walk
    def run(self, *, strict: bool) -> tuple[Builder, list[str], dict[str, str]]:
        from torch.export.graph_signature import InputKind, OutputKind

        sig = self.ep.graph_signature
        user_inputs: list[str] = []
        for spec in sig.input_specs:
            name = spec.arg.name
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
                src = self.ep.state_dict if spec.target in self.ep.state_dict else self.ep.constants
                self.consts[name] = src[spec.target].detach()
                self.fqn[name] = str(spec.target)
            elif spec.kind == InputKind.USER_INPUT:
                user_inputs.append(name)
        nodes = {n.name: n for n in self.ep.graph.nodes}
        if not user_inputs:
            raise UnsupportedModelError("the model takes no tensor input")
        self.b = Builder(input_name="input", input_shape=self.shape(nodes[user_inputs[0]]), frac_bits=self.frac_bits)
        self.vals[user_inputs[0]] = "input"
        for extra in user_inputs[1:]:
            self.b.problem(f"input {extra!r}: only models with one tensor input are supported")
            self.vals[extra] = self.b.opaque(self.shape(nodes[extra]), extra)
        for node in self.ep.graph.nodes:
            if node.op == "call_function":
                self.call(node)
            elif node.op == "get_attr":
                self.b.problem(f"{self.where(node)}: control flow / submodule calls are not supported")
        for where, items in self.module_problems.items():
            if len(items) == 1:
                msg, hint = items[0]
            else:
                kind = where.rsplit("(", 1)[-1].rstrip(")").removeprefix("nn.")
                msg = f"{kind} is not supported ({'; '.join(dict.fromkeys(m for m, _ in items))})"
                hint = suggestion(kind)
            self.b.problem(f"{where}: {msg}" + (f" -> {hint}" if hint else ""))
        outs = [s.arg.name for s in sig.output_specs if s.kind == OutputKind.USER_OUTPUT]
        values: list[str] = []
        for o in outs:
            v = self.vals.get(o)
            if not isinstance(v, str):
                self.b.problem(f"output {o!r} is not a secret tensor computed from the input")
            else:
                values.append(v)
        if len(values) > 1:
            self.b.problem(f"the model returns {len(values)} tensors; only one output is supported")
        if strict:
            from secureinfer.graph.validate import _engine_ops

            ops = _engine_ops()
            for n in self.b.nodes:
                if n.op not in ops:
                    hint = suggestion(n.op)
                    self.b.problem(f"{self.b.origin.get(n.name, n.name)}: IR op {n.op!r} is not supported by the "
                                   f"secure engine yet" + (f" -> {hint}" if hint else ""))
        return self.b, values[:1], dict(self.b.origin)

    def call(self, node: fx.Node) -> None:
        b = self.b
        target = node.target
        if target is operator.getitem:
            src, idx = node.args[0], node.args[1]
            if src.name in self.consts:
                self.consts[node.name] = self.consts[src.name][idx]
            elif isinstance(self.vals.get(src.name), str):  # an unsupported multi-output op: stay opaque
                self.vals[node.name] = self.vals[src.name]
            elif isinstance(self.vals.get(src.name), (list, tuple)):
                v = self.vals[src.name][idx]
                if v is None and node.users:
                    b.problem(f"{self.where(node)}: uses output {idx} of a multi-output op (only output 0 is supported)")
                    v = self._opaque(node)
                self.vals[node.name] = v
            return
        if not isinstance(target, torch._ops.OpOverload):
            if node.users:
                b.problem(f"{self.where(node)}: {target} is not supported")
                self.vals[node.name] = self._opaque(node)
            return
        name = target._schema.name.split("::")[-1]
        inplace = name.endswith("_") and not name.endswith("__")
        base = name.rstrip("_") if inplace else name
        in_nodes = [a for a in node.all_input_nodes]
        if all(a.name in self.consts for a in in_nodes):
            if node.users or inplace:
                try:
                    self.consts[node.name] = self._fold(node)
                except Exception as exc:  # noqa: BLE001 - report, don't crash
                    b.problem(f"{self.where(node)}: constant folding of aten.{base} failed: {exc}")
                    self.vals[node.name] = self._opaque(node)
                    return
                if inplace and in_nodes:
                    self.consts[in_nodes[0].name] = self.consts[node.name]
            return
        if not node.users and not inplace:
            return
        a = _bind(target, node.args, node.kwargs)
        try:
            handler = getattr(self, f"op_{base}", None)
            if handler is not None:
                value = handler(node, a, base)
            elif base in _ALIAS:
                value = self.act(node.args[0])
            elif base in _RESHAPE:
                value = b.reshape(self._x(node.args[0]), self.shape(node), name=self.base_name(node, a),
                                  origin=self.where(node))
            elif base in _DROPOUT:
                if a.get("train"):
                    raise ImportProblem("dropout in training mode", "training")
                value = self.act(node.args[0])
                if base == "native_dropout":
                    value = [value, None]
            else:
                raise ImportProblem(f"aten.{base} is not supported", base)
        except ImportProblem as exc:
            hint = suggestion(exc.kind) if exc.kind else None
            where = self.where(node)
            if " (" in where and not where.startswith("node "):  # inside a leaf nn module: one entry per module
                self.module_problems.setdefault(where, []).append((str(exc), hint))
            else:
                b.problem(f"{where}: {exc}" + (f" -> {hint}" if hint else ""))
            value = self._opaque(node)
        self.vals[node.name] = value
        if inplace and in_nodes:
            self.vals[in_nodes[0].name] = value

    def _opaque(self, node: fx.Node) -> Any:
        """Placeholder value(s) for the output(s) of a node that could not be imported."""

        def one(v: Any) -> str | None:
            if not isinstance(v, torch.Tensor):
                return None
            try:
                shape = tuple(int(d) for d in v.shape)
            except (TypeError, ValueError):
                shape = (self.b.batch,)
            return self.b.opaque(shape, node.name)

        val = node.meta.get("val")
        return [one(v) for v in val] if isinstance(val, (list, tuple)) else one(val)

    def _fold(self, node: fx.Node) -> Any:
        def mat(v: Any) -> Any:
            if isinstance(v, fx.Node):
                return self.consts[v.name]
            if isinstance(v, (list, tuple)):
                return type(v)(mat(t) for t in v)
            return v

        with torch.no_grad():
            return node.target(*mat(node.args), **{k: mat(v) for k, v in node.kwargs.items()})

    def _x(self, arg: Any) -> str:
        x = self.act(arg)
        if not isinstance(x, str):
            raise ImportProblem("operates on a value the importer could not map")
        return x

    def emit(self, node: fx.Node, a: dict[str, Any], op: str, inputs: list[str], attrs: dict[str, Any] | None = None,
             params: dict[str, Any] | None = None, expect: bool = True) -> str:
        np_params = {k: (None if v is None else v.detach().double().cpu().numpy()) for k, v in (params or {}).items()}
        return self.b.emit(op, inputs, attrs, name=self.base_name(node, a), params=np_params,
                           origin=self.where(node), expect=self.shape(node) if expect else None)

    # ------------------------------------------------------------------ linear family
    def op_linear(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        w, bias = self.const(a["weight"]), self.const(a["bias"]) if a.get("bias") is not None else None
        if w is None or w.dim() != 2:
            raise ImportProblem("linear layer with a non-constant weight", "matmul")
        attrs = {"in_features": int(w.shape[1]), "out_features": int(w.shape[0])}
        return self.emit(node, a, "linear", [self._x(a["input"])], attrs, {"weight": w, "bias": bias})

    def op_conv2d(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        w = self.const(a["weight"])
        bias = self.const(a["bias"]) if a.get("bias") is not None else None
        if w is None:
            raise ImportProblem("convolution with a non-constant kernel")
        if w.dim() != 4:
            raise ImportProblem(f"{w.dim() - 2}-D convolution", "conv1d")
        if a.get("transposed"):
            raise ImportProblem("transposed convolution", "conv_transpose2d")
        kh, kw = int(w.shape[2]), int(w.shape[3])
        stride, dilation = _pair(a["stride"]), _pair(a["dilation"])
        pad = a["padding"]
        if isinstance(pad, str):
            if pad == "valid":
                pad = [0, 0]
            elif (dilation[0] * (kh - 1)) % 2 or (dilation[1] * (kw - 1)) % 2:
                raise ImportProblem("padding='same' with an even kernel (asymmetric padding)", "conv_padding")
            else:
                pad = [dilation[0] * (kh - 1) // 2, dilation[1] * (kw - 1) // 2]
        groups = int(a["groups"])
        attrs = {"in_channels": int(w.shape[1]) * groups, "out_channels": int(w.shape[0]), "kernel_size": [kh, kw],
                 "stride": stride, "padding": _pair(pad), "dilation": dilation, "groups": groups}
        return self.emit(node, a, "conv2d", [self._x(a["input"])], attrs, {"weight": w, "bias": bias})

    op_convolution = op_conv2d
    op__convolution = op_conv2d

    def op_conv1d(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        raise ImportProblem("1-D convolution", "conv1d")

    def op_batch_norm(self, node: fx.Node, a: dict[str, Any], base: str) -> Any:
        if a.get("training"):
            raise ImportProblem("BatchNorm in training mode", "training")
        mean, var = self.const(a["running_mean"]), self.const(a["running_var"])
        if mean is None or var is None:
            raise ImportProblem("BatchNorm without running statistics (track_running_stats=False)")
        x = self._x(a["input"])
        g = self.const(a["weight"]) if a.get("weight") is not None else torch.ones_like(mean)
        beta = self.const(a["bias"]) if a.get("bias") is not None else torch.zeros_like(mean)
        scale = g.double() / torch.sqrt(var.double() + float(a["eps"]))
        shift = beta.double() - mean.double() * scale
        y = self.b.affine(x, weight=scale.numpy(), bias=shift.numpy(), axis=1, name=self.base_name(node, a),
                          origin=self.where(node))
        return y if base == "batch_norm" else [y, None, None]

    op__native_batch_norm_legit_no_training = op_batch_norm

    # ------------------------------------------------------------------ elementwise
    def op_relu(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        return self.emit(node, a, "relu", [self._x(node.args[0])])

    def op_clamp(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        if a.get("min") in (0, 0.0) and a.get("max") is None:
            return self.op_relu(node, a, base)
        raise ImportProblem(f"aten.{base} (clamp) is not supported", "clamp")

    op_clamp_min = op_clamp

    def op_leaky_relu(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        return self.emit(node, a, "leaky_relu", [self._x(a["self"])], {"negative_slope": float(a["negative_slope"])})

    def op_prelu(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        w = self.const(a["weight"])
        if w is None or w.numel() != 1:
            raise ImportProblem("PReLU with one slope per channel", "prelu")
        return self.emit(node, a, "leaky_relu", [self._x(a["self"])], {"negative_slope": float(w.reshape(-1)[0])})

    def op_sigmoid(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        return self.emit(node, a, "sigmoid", [self._x(a["self"])])

    def op_tanh(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        return self.emit(node, a, "tanh", [self._x(a["self"])])

    def op_gelu(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        return self.emit(node, a, "gelu", [self._x(a["self"])])

    def op_softmax(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        nd = len(self.shape(node))
        axis = int(a["dim"]) % nd
        if axis == 0:
            raise ImportProblem("softmax over the batch axis")
        return self.emit(node, a, "softmax", [self._x(a["self"])], {"axis": axis})

    op__softmax = op_softmax

    def op_layer_norm(self, node: fx.Node, a: dict[str, Any], base: str) -> Any:
        ns = list(a["normalized_shape"])
        shp = self.shape(node.args[0])
        if len(ns) != 1 or ns[0] != shp[-1]:
            raise ImportProblem(f"LayerNorm over {ns} (only the last axis is supported; flatten the others first)")
        w = self.const(a["weight"]) if a.get("weight") is not None else None
        bias = self.const(a["bias"]) if a.get("bias") is not None else None
        name, origin = self.base_name(node, a), self.where(node)
        attrs = {"axis": -1, "size": int(ns[0]), "eps": float(a["eps"])}
        y = self.b.emit("layernorm", [self._x(a["input"])], attrs, name=f"{name}.norm",
                        params={"weight": None, "bias": None}, origin=origin)
        # gamma, beta: a separate channel_affine on the last axis (the engine's convention)
        y = self.b.affine(y, weight=np.ones(ns[0]) if w is None else w.double().numpy(),
                          bias=None if bias is None else bias.double().numpy(), axis=len(shp) - 1, name=name,
                          origin=origin)
        return y if base == "layer_norm" else [y, None, None]

    op_native_layer_norm = op_layer_norm

    # ------------------------------------------------------------------ pooling
    def _pool(self, node: fx.Node, a: dict[str, Any], op: str) -> str:
        x = self._x(a["self"])
        _, _, h, w = self.b.shapes[x]
        k = _pair(a["kernel_size"])
        s = _pair(a["stride"]) if a.get("stride") else list(k)
        p = _pair(a["padding"])
        d = _pair(a.get("dilation", 1))
        if d != [1, 1]:
            raise ImportProblem("max pooling with dilation", "maxpool_dilation")
        if a.get("divisor_override"):
            raise ImportProblem("AvgPool2d(divisor_override=...)")
        if op == "avgpool2d" and not a.get("count_include_pad", True) and any(p):
            raise ImportProblem("AvgPool2d(count_include_pad=False) with padding", "avgpool_exclude_pad")
        floor = (_pool_floor(h, k[0], s[0], p[0]), _pool_floor(w, k[1], s[1], p[1]))
        if a.get("ceil_mode") and floor != self.shape(node)[2:]:
            raise ImportProblem(f"{'MaxPool2d' if op == 'maxpool2d' else 'AvgPool2d'}(ceil_mode=True) that changes "
                               f"the output size", "maxpool_ceil" if op == "maxpool2d" else "avgpool_ceil")
        return self.emit(node, a, op, [x], {"kernel_size": k, "stride": s, "padding": p}, expect=op != "max_pool2d_with_indices")

    def op_max_pool2d(self, node: fx.Node, a: dict[str, Any], base: str) -> Any:
        y = self._pool(node, a, "maxpool2d")
        return [y, None] if base == "max_pool2d_with_indices" else y

    op_max_pool2d_with_indices = op_max_pool2d

    def op_avg_pool2d(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        return self._pool(node, a, "avgpool2d")

    def op_adaptive_avg_pool2d(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        x = self._x(a["self"])
        shp = self.b.shapes[x]
        oh, ow = self.shape(node)[2:]
        if (oh, ow) == (1, 1):
            return self.emit(node, a, "global_avgpool", [x])
        if shp[2] % oh or shp[3] % ow:
            raise ImportProblem(f"AdaptiveAvgPool2d({oh}, {ow}) on a {shp[2]}x{shp[3]} input", "adaptive_avg_pool2d")
        k = [shp[2] // oh, shp[3] // ow]
        return self.emit(node, a, "avgpool2d", [x], {"kernel_size": k, "stride": k, "padding": [0, 0]})

    op__adaptive_avg_pool2d = op_adaptive_avg_pool2d

    def op_mean(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        x = self._x(a["self"])
        shp = self.b.shapes[x]
        dims = {int(d) % len(shp) for d in (a.get("dim") or [])}
        if len(shp) != 4 or dims != {2, 3}:
            raise ImportProblem(f"mean over axes {sorted(dims)}", "mean")
        y = self.b.emit("global_avgpool", [x], name=self.base_name(node, a), origin=self.where(node))
        return self.b.reshape(y, self.shape(node), name=f"{self.base_name(node, a)}.flat", origin=self.where(node))

    # ------------------------------------------------------------------ arithmetic
    def _binary(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        """``p + coef * q``: add/sub (p = self, q = other, coef = +-alpha), rsub (p = other, q = self)."""
        p_arg, q_arg = (a["other"], a["self"]) if base == "rsub" else (a["self"], a["other"])
        coef = float(a.get("alpha") or 1) * (1.0 if base == "add" else -1.0)
        p, q = self.act(p_arg), self.act(q_arg)
        name, origin = self.base_name(node, a), self.where(node)
        if isinstance(p, str) and isinstance(q, str):
            if coef != 1.0:
                q = self.b.affine(q, weight=np.array(coef), bias=None, axis=1, name=f"{name}.scale", origin=origin)
            return self.emit(node, a, "add", [p, q])
        if isinstance(p, str):
            c = self.const(q_arg)
            y = None if c is None else self.b.const_affine(p, coef * c.double().numpy(), mul=False, name=name,
                                                           origin=origin)
        elif isinstance(q, str):
            c = self.const(p_arg)
            y = self.b.const_affine(q, np.array(coef), mul=True, name=f"{name}.scale", origin=origin)
            y = None if c is None or y is None else self.b.const_affine(y, c.double().numpy(), mul=False, name=name,
                                                                        origin=origin)
        else:
            raise ImportProblem(f"aten.{base} on values the importer could not map")
        if y is None:
            raise ImportProblem("adding a constant tensor that varies along more than one axis (the IR adds "
                               "constants per channel only)")
        return y

    op_add = op_sub = op_rsub = _binary

    def _scale(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        xa, xb = self.act(a["self"]), self.act(a.get("other"))
        if isinstance(xa, str) and isinstance(xb, str):
            raise ImportProblem(f"element-wise {base} of two secret tensors", base)
        if base == "neg":
            c: torch.Tensor | None = torch.tensor(-1.0, dtype=torch.float64)
        elif base == "div":
            if not isinstance(xa, str) or a.get("rounding_mode") is not None:
                raise ImportProblem("division by a secret tensor", "div")
            c = self.const(a["other"])
            c = None if c is None else 1.0 / c.double()
        else:
            c = self.const(a["other"]) if isinstance(xa, str) else self.const(a["self"])
        x = xa if isinstance(xa, str) else xb
        if c is None or not isinstance(x, str):
            raise ImportProblem(f"aten.{base} on values the importer could not map")
        y = self.b.const_affine(x, c.double().numpy(), mul=True, name=self.base_name(node, a), origin=self.where(node))
        if y is None:
            raise ImportProblem(f"multiplying by a constant of shape {tuple(c.shape)} that varies along more than one "
                               "axis", "mul")
        return y

    op_mul = op_div = op_neg = _scale

    def op_cat(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        xs = [self.act(t) for t in a["tensors"]]
        if not all(isinstance(x, str) for x in xs):
            raise ImportProblem("concatenating a constant with secret tensors")
        axis = int(a["dim"]) % len(self.shape(node))
        if axis == 0:
            raise ImportProblem("concatenation along the batch axis")
        if len(xs) == 1:
            return xs[0]
        return self.emit(node, a, "concat", xs, {"axis": axis})

    op_concat = op_cat

    def op_matmul(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        xa, xb = self.act(a["self"]), self.act(a.get("other", a.get("mat2")))
        if isinstance(xa, str) and isinstance(xb, str):
            return self.emit(node, a, "matmul", [xa, xb])
        w = self.const(a.get("other", a.get("mat2")))
        if isinstance(xa, str) and w is not None and w.dim() == 2:
            attrs = {"in_features": int(w.shape[0]), "out_features": int(w.shape[1])}
            return self.emit(node, a, "linear", [xa], attrs, {"weight": w.t().contiguous(), "bias": None})
        raise ImportProblem("matrix product with a constant on the left (W @ x) or a batched constant", "transpose")

    op_mm = op_bmm = op_matmul

    def op_transpose(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        raise ImportProblem(f"aten.{base} of a secret tensor", "transpose")

    op_t = op_permute = op_numpy_T = op_transpose

    def op_select(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        raise ImportProblem(f"aten.{base} (indexing a secret tensor)", "slice")

    op_slice = op_index = op_narrow = op_split = op_chunk = op_split_with_sizes = op_unbind = op_select


def _example(example_input: torch.Tensor | Sequence[int], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A batch of 2 built from the example (or zeros of its shape) for tracing."""
    if isinstance(example_input, torch.Tensor):
        if example_input.dim() < 1 or example_input.shape[0] < 1:
            raise InvalidArgumentError("example_input must have a batch axis first")
        t = example_input.detach()
        t = t[:2] if t.shape[0] >= 2 else torch.cat([t[:1], t[:1]])
        return t.to(device=device, dtype=dtype if t.is_floating_point() else t.dtype)
    shape = tuple(int(d) for d in example_input)
    if len(shape) < 2 or any(d < 1 for d in shape):
        raise InvalidArgumentError(f"example input shape {shape} must be (batch, ...) with positive sizes")
    # non-secret: a zero input only drives the shape capture
    return torch.zeros((2, *shape[1:]), dtype=dtype, device=device)


def from_exported(ep: torch.export.ExportedProgram, *, frac_bits: int = 16, optimize: bool = True,
                  strict: bool = True) -> Graph:
    """Import an ``ExportedProgram`` captured with static shapes and a batch axis first."""
    from secureinfer.graph.passes import optimize as run_passes
    from secureinfer.graph.validate import validate

    user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
    vals = [n.meta.get("val") for n in ep.graph.nodes if n.name in user]
    if vals and isinstance(vals[0], torch.Tensor) and not all(isinstance(d, int) for d in vals[0].shape):
        # dynamic shapes: re-capture with the program's own example input (static shapes)
        examples = ep.example_inputs[0] if ep.example_inputs else ()
        if not examples or not isinstance(examples[0], torch.Tensor):
            raise UnsupportedModelError("the exported program has dynamic shapes and no example input",
                                        ["export with static shapes, or pass the module to from_torch"])
        return from_torch(ep.module(), (1, *examples[0].shape[1:]), frac_bits=frac_bits, optimize=optimize,
                          strict=strict)
    builder, outputs, origin = _Importer(ep, frac_bits).run(strict=strict)
    graph = builder.finish(outputs)
    if optimize:
        graph = run_passes(graph)
    if strict:
        validate(graph, strict=True, origin=origin)
    return graph


def from_torch(module: nn.Module, example_input: torch.Tensor | Sequence[int], *, frac_bits: int = 16,
               optimize: bool = True, strict: bool = True) -> Graph:
    """Import a PyTorch model in eval mode. ``example_input`` (a tensor, or its shape with
    the batch axis first) fixes the per-sample input shape.

    Raises one UnsupportedModelError listing every node that cannot be imported and,
    with ``strict`` (default), every imported op the secure engine cannot run yet.
    ``optimize`` runs :func:`secureinfer.graph.passes.optimize` (BatchNorm folding, ...).
    """
    if isinstance(module, torch.jit.ScriptModule):
        shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else tuple(example_input)
        return from_script(module, frac_bits=frac_bits, input_shape=shape[1:], strict=strict)
    if not isinstance(module, nn.Module):
        raise InvalidArgumentError(f"expected an nn.Module, got {type(module).__name__}")
    first = next(iter(module.parameters()), None)
    ref = first if first is not None and first.is_floating_point() else torch.empty(0)
    x = _example(example_input, ref.dtype if ref.is_floating_point() else torch.float32, ref.device)
    try:
        with torch.no_grad():
            ep = torch.export.export(module, (x,), strict=False)
    except Exception as exc:  # torch raises many types (Unsupported, UserError, RuntimeError, ...)
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModelError("torch.export could not capture the model",
                                    [f"{type(exc).__name__}: {msg} (data-dependent control flow or "
                                     "non-tensor inputs cannot be traced)"]) from exc
    return from_exported(ep, frac_bits=frac_bits, optimize=optimize, strict=strict)


# ----------------------------------------------------------------------------- TorchScript


def _rebuild(module: torch.nn.Module, problems: list[str], prefix: str = "") -> nn.Module:
    """An eager copy of a TorchScript ``nn.Sequential`` of Linear/ReLU/Flatten/Identity/Dropout."""
    kind = getattr(module, "original_name", type(module).__name__)
    if kind == "Sequential":
        return nn.Sequential(*[_rebuild(c, problems, f"{prefix}{n}.") for n, c in module.named_children()])
    if kind == "Linear":
        w = module.weight.detach()
        lin = nn.Linear(w.shape[1], w.shape[0], bias=getattr(module, "bias", None) is not None)
        with torch.no_grad():
            lin.weight.copy_(w)
            if lin.bias is not None:
                lin.bias.copy_(module.bias.detach())
        return lin
    if kind in ("ReLU", "Identity", "Dropout"):
        return {"ReLU": nn.ReLU, "Identity": nn.Identity, "Dropout": nn.Identity}[kind]()
    if kind == "Flatten":
        return nn.Flatten()
    problems.append(f"{prefix.rstrip('.') or 'model'}: {kind} is not supported")
    return nn.Identity()


def _script_input_shape(module: torch.nn.Module) -> tuple[int, ...]:
    for m in module.modules():
        if getattr(m, "original_name", "") == "Linear":
            return (int(m.weight.shape[1]),)
        if getattr(m, "original_name", "") in ("Conv2d", "Conv1d"):
            break
    raise InvalidArgumentError("cannot infer the input shape of this TorchScript model: pass input_shape "
                               "(per sample, e.g. (1, 28, 28))")


def from_script(module: torch.nn.Module, *, frac_bits: int = 16, input_shape: Sequence[int] | None = None,
                optimize: bool = True, strict: bool = True) -> Graph:
    """Import a TorchScript module: converted to an ExportedProgram (torch's TS->export
    converter), or — if that fails — rebuilt eagerly when it is an ``nn.Sequential`` of
    Linear/ReLU/Flatten. ``input_shape`` is per sample; for MLPs it defaults to the first
    Linear's ``in_features``."""
    shape = tuple(int(d) for d in input_shape) if input_shape is not None else _script_input_shape(module)
    x = torch.zeros((2, *shape))  # non-secret: shape-only example for the conversion
    try:
        from torch._export.converter import TS2EPConverter

        with torch.no_grad():
            ep = TS2EPConverter(module, (x,)).convert()
        eager: nn.Module = ep.module()
    except Exception:  # noqa: BLE001 - a private converter: fall back to the Sequential rebuild
        problems: list[str] = []
        eager = _rebuild(module, problems)
        if problems:
            raise UnsupportedModelError(f"{len(problems)} unsupported layer(s) in the model", problems) from None
    return from_torch(eager, (1, *shape), frac_bits=frac_bits, optimize=optimize, strict=strict)

