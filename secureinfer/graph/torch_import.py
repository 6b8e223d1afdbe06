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

Op handlers live in :mod:`secureinfer.graph.torch_ops`. The model is traced on a batch of 2 so that the batch axis cannot be confused with a
feature axis of size 1: every value must keep the batch first (a ``view(1, -1)`` is
reported). Constant subexpressions (parameter transposes, ``x.size(0)``, ``torch.tensor``
constants) are folded while importing. Module -> IR op:

==========================================  ==========================================
PyTorch                                     IR
==========================================  ==========================================
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
nn.LayerNorm (last axis)                    layernorm + channel_affine (gamma, beta)
a @ b, torch.matmul (two activations)       matmul
nn.Dropout, nn.Identity, clone, casts       (dropped)
==========================================  ==========================================

``nn.GELU(approximate='tanh')`` is imported as the IR's exact ``gelu`` (they differ by
< 5e-4). Everything else is reported — every node, in one
:class:`~secureinfer.errors.UnsupportedModelError`, with a suggested rewrite from
:data:`secureinfer.graph.validate.SUGGESTIONS` where one exists.
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Sequence
from typing import Any

import torch
from torch import fx, nn

from secureinfer.errors import InvalidArgumentError, UnsupportedModelError
from secureinfer.graph.builder import Builder, ImportProblem
from secureinfer.graph.ir import Graph, TensorSpec
from secureinfer.graph.torch_ops import AtenOps
from secureinfer.graph.validate import suggestion

__all__ = ["from_exported", "from_script", "from_torch"]

_ALIAS = {"clone", "contiguous", "detach", "alias", "lift_fresh_copy", "_to_copy", "to", "type_as", "view_as_real"}
_RESHAPE = {"view", "reshape", "_unsafe_view", "flatten", "unsqueeze", "squeeze", "view_as", "expand_as"}
_DROPOUT = {"dropout", "feature_dropout", "alpha_dropout", "feature_alpha_dropout", "native_dropout"}


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


class _Importer(AtenOps):
    """Walks an ExportedProgram's ATen graph and emits IR nodes into a Builder."""

    def __init__(self, ep: torch.export.ExportedProgram, frac_bits: int) -> None:
        self.ep = ep
        self.frac_bits = frac_bits
        self.consts: dict[str, Any] = {}
        self.fqn: dict[str, str] = {}
        self.vals: dict[str, Any] = {}
        self.b: Builder | None = None
        self.module_problems: dict[str, list[tuple[str, str | None]]] = {}
        self.one_hot: int | None = None  # vocabulary of a token-id input (sent one-hot)

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
        in_shape = self.shape(nodes[user_inputs[0]])
        self.one_hot = self._token_vocab(nodes[user_inputs[0]])
        if self.one_hot is not None:  # token ids: the client sends them one-hot (batch, ..., vocab)
            in_shape = (*in_shape, self.one_hot)
        self.b = Builder(input_name="input", input_shape=in_shape, frac_bits=self.frac_bits)
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
            self.b.check_engine_ops()
        return self.b, values[:1], dict(self.b.origin)

    def _token_vocab(self, inp: fx.Node) -> int | None:
        """The vocabulary of an integer input that only ``nn.Embedding`` lookups read (token
        ids: they become a one-hot input times the table, a Linear); None for a float input.
        UnsupportedModelError for an integer input used otherwise (a secret index cannot
        address memory)."""
        val = inp.meta.get("val")
        if not isinstance(val, torch.Tensor) or val.is_floating_point():
            return None
        sizes = set()
        for user in inp.users:
            name = getattr(user.target, "_schema", None)
            weight = user.args[0] if user.args else None
            if name is None or name.name.split("::")[-1] != "embedding" or getattr(weight, "name", None) not in self.consts:
                raise UnsupportedModelError(
                    "the model's integer input is used by other ops than nn.Embedding lookups",
                    [f"{self.where(user)}: token ids are supported as nn.Embedding inputs only (they are sent one-hot)"])
            sizes.add(int(self.consts[weight.name].shape[0]))
        if len(sizes) != 1:
            raise UnsupportedModelError("the token ids index embedding tables of different sizes", [str(sorted(sizes))])
        return sizes.pop()

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
    imp = _Importer(ep, frac_bits)
    builder, outputs, origin = imp.run(strict=strict)
    graph = builder.finish(outputs)
    if imp.one_hot is not None:
        spec = graph.inputs[0]
        graph = dataclasses.replace(graph, inputs=[TensorSpec(spec.name, spec.shape, one_hot=imp.one_hot)])
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

