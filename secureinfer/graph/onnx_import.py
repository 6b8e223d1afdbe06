"""ONNX importer: an ONNX model (``onnx`` package) -> IR.

Supported opsets of the default domain: **13 to 25** (:data:`SUPPORTED_OPSETS`). Opset 13
is the floor because Softmax became axis-wise and Squeeze/Unsqueeze/ReduceMean-style
axes moved to inputs there; every later version of the ops below (Reshape-14
``allowzero``, BatchNormalization-14/15 ``training_mode``, Shape-15 ``start``/``end``,
ReduceMean-18 axes input, AveragePool-19 ``dilations``, Gelu-20, types-only changes in
21-25) is handled. A model of opset 7-12 (skl2onnx picks the lowest opset that will do)
is first converted to 13 with ``onnx.version_converter``. The ``ai.onnx.ml`` domain's
linear models, scaler and label plumbing are mapped by :mod:`secureinfer.graph.onnx_ml`
(a classifier's label and probabilities become the graph's ``label`` and ``logits``
outputs). Other domains are refused.

ONNX op -> IR op:

=========================================  =========================================
ONNX                                       IR
=========================================  =========================================
Gemm / MatMul with a constant weight,      linear (bias folded by the passes)
  MatMul + Add(constant)
MatMul of two activations                  matmul
Conv (2-D, symmetric pads or SAME_* with   conv2d
  even total padding)
BatchNormalization (inference)             channel_affine (folded into the conv)
Mul / Div / Add / Sub by a per-channel     channel_affine (folded when possible)
  or scalar constant
Relu, Clip(min=0); LeakyRelu, PRelu(1)     relu; leaky_relu
MaxPool; AveragePool; GlobalAveragePool,   maxpool2d; avgpool2d; global_avgpool
  ReduceMean over (2, 3)
Flatten, Reshape, Squeeze, Unsqueeze       flatten / reshape (batch axis kept)
Add / Sub of two activations               add
Concat                                     concat
Softmax; Sigmoid; Tanh                     softmax; sigmoid; tanh
Gelu; x*0.5*(1+Erf(x/sqrt 2)) pattern;     gelu
  the tanh-form pattern (gelu_new)
LayerNormalization (last axis); the        layernorm + channel_affine (scale, bias)
  ReduceMean/Sub/Pow/Sqrt/Div pattern
Identity, Dropout, Cast                    (dropped)
ArgMax over the classes                    the ``label`` output (see onnx_ml)
Gather(constant table, the integer input)  ``linear`` of a one-hot input (token ids
                                           sent one-hot; ``TensorSpec.one_hot``)
=========================================  =========================================

Constant subgraphs (initializers, ``Constant``, and anything computed only from
them — including ``Shape`` of an activation, whose value is known because every shape
is concrete) are folded with ``onnx.reference``; that is how
Shape/Gather/Unsqueeze/Concat chains feeding a Reshape become a fixed target shape.
A symbolic batch dimension is given the value 2 while importing, so a reshape that
would mix the batch axis with the others is detected. ``onnx.shape_inference`` runs
first; its shapes are cross-checked against the IR's shape rules.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from secureinfer.errors import InvalidArgumentError, UnsupportedModelError
from secureinfer.graph.builder import Builder, ImportProblem
from secureinfer.graph.ir import Graph, TensorSpec
from secureinfer.graph.onnx_ml import ML_DOMAIN, OnnxMlOps
from secureinfer.graph.onnx_ops import OnnxOps, Patterns, attrs_of
from secureinfer.graph.validate import suggestion

__all__ = ["SUPPORTED_OPSETS", "from_onnx"]

SUPPORTED_OPSETS = range(13, 26)
_ALIAS = {"Identity", "Dropout", "Cast", "CastLike"}


def _load(model_or_path: Any) -> Any:
    import onnx

    if isinstance(model_or_path, onnx.ModelProto):
        return model_or_path
    try:
        if isinstance(model_or_path, (bytes, bytearray)):
            model = onnx.load_from_string(bytes(model_or_path))
        else:
            path = Path(model_or_path)
            if not path.is_file():
                raise InvalidArgumentError(f"ONNX model file {path} does not exist")
            model = onnx.load(str(path))
    except InvalidArgumentError:
        raise
    except Exception as exc:  # protobuf DecodeError, external-data errors, ...
        raise InvalidArgumentError(f"not a readable ONNX model: {exc}") from exc
    if not model.opset_import or not model.graph.node:
        raise InvalidArgumentError("not an ONNX model (no opset or no nodes)")
    return model


class _Importer(OnnxOps, OnnxMlOps):
    def __init__(self, model: Any, *, frac_bits: int, input_shape: Sequence[int] | None) -> None:
        import onnx

        self.onnx = onnx
        self.model = model
        self.frac_bits = frac_bits
        self.input_shape = input_shape
        self.consts: dict[str, np.ndarray] = {}
        self.vals: dict[str, str] = {}
        self.labels_of: dict[str, tuple[str, tuple[int, ...]]] = {}  # label values (onnx_ml)
        self.labels: tuple[int, ...] | None = None  # a classifier's class labels (outputs())
        self.one_hot: int | None = None  # vocabulary of a token-id input (sent one-hot)
        self.output_names: dict[str, str] = {}
        self.opset = 0
        self.inferred: dict[str, tuple[Any, ...]] = {}
        self.b: Builder | None = None

    # ------------------------------------------------------------------ setup
    def prepare(self) -> Any:
        onnx = self.onnx
        for imp in self.model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                self.opset = int(imp.version)
        if 7 <= self.opset < SUPPORTED_OPSETS.start:  # e.g. skl2onnx picks the lowest opset that will do
            try:
                self.model = onnx.version_converter.convert_version(self.model, SUPPORTED_OPSETS.start)
                self.opset = SUPPORTED_OPSETS.start
            except Exception:  # noqa: BLE001 - refused below with the opset advice
                pass
        if self.opset not in SUPPORTED_OPSETS:
            raise UnsupportedModelError(f"ONNX opset {self.opset} is not supported",
                                        [f"re-export with an opset in {SUPPORTED_OPSETS.start}.."
                                         f"{SUPPORTED_OPSETS.stop - 1} (e.g. torch.onnx.export(..., opset_version=17))"])
        try:
            model = onnx.shape_inference.infer_shapes(self.model, check_type=False, strict_mode=False, data_prop=True)
        except Exception:  # noqa: BLE001 - shape inference is a cross-check only
            model = self.model
        for vi in (*model.graph.value_info, *model.graph.output, *model.graph.input):
            dims = vi.type.tensor_type.shape.dim
            self.inferred[vi.name] = tuple(d.dim_value if d.HasField("dim_value") else None for d in dims)
        return model.graph

    def expect(self, name: str) -> tuple[int, ...] | None:
        dims = self.inferred.get(name)
        if not dims or any(d is None for d in dims[1:]) or dims[0] not in (None, self.b.batch):
            return None
        return (self.b.batch, *dims[1:])

    # ------------------------------------------------------------------ helpers
    def const(self, name: str) -> np.ndarray | None:
        return self.consts.get(name) if name else None

    def act(self, name: str) -> str | None:
        return self.vals.get(name)

    def where(self, node: Any) -> str:
        return f"node {node.name or node.output[0]!r} ({node.op_type})"

    def base_name(self, node: Any) -> str:
        for i in node.input[1:2]:
            if i.endswith(".weight"):
                return i[: -len(".weight")]
        parts = [p for p in (node.name or "").split("/") if p]
        if len(parts) > 1:
            return ".".join(parts[:-1]) if parts[-1].startswith(node.op_type) else ".".join(parts)
        return parts[0] if parts else node.op_type.lower()

    def emit(self, node: Any, op: str, inputs: list[str], attrs: dict[str, Any] | None = None,
             params: dict[str, np.ndarray | None] | None = None) -> str:
        return self.b.emit(op, inputs, attrs, name=self.base_name(node), params=params, origin=self.where(node),
                           expect=self.expect(node.output[0]))

    def x(self, node: Any, k: int = 0) -> str:
        v = self.act(node.input[k]) if k < len(node.input) else None
        if v is None:
            raise ImportProblem(f"input {k} is not an activation computed from the model input")
        return v

    # ------------------------------------------------------------------ walk
    def run(self, *, strict: bool) -> tuple[Builder, list[str], dict[str, str]]:
        from onnx import numpy_helper

        graph = self.prepare()
        for init in graph.initializer:
            self.consts[init.name] = numpy_helper.to_array(init)
        user = [i for i in graph.input if i.name not in self.consts]
        if len(user) != 1:
            raise UnsupportedModelError(f"the ONNX model has {len(user)} non-constant inputs; exactly one is supported")
        dims = [d.dim_value if d.HasField("dim_value") else None for d in user[0].type.tensor_type.shape.dim]
        batch = dims[0] if dims and dims[0] else 2
        rest = list(self.input_shape) if self.input_shape is not None else dims[1:]
        if not dims or any(d is None for d in rest):
            raise InvalidArgumentError(f"input {user[0].name!r} has shape {dims}: pass input_shape (per sample)")
        self.one_hot = self._token_vocab(graph, user[0])
        if self.one_hot is not None:  # token ids: the client sends them one-hot (batch, ..., vocab)
            rest = [*rest, self.one_hot]
        self.b = Builder(input_name="input", input_shape=(batch, *rest), frac_bits=self.frac_bits)
        self.vals[user[0].name] = "input"
        fused = Patterns(graph, self.consts, self.inferred).find()
        used = {i for n in graph.node for i in n.input} | {o.name for o in graph.output}
        for node in graph.node:
            if id(node) in fused.skip:
                continue
            try:
                if id(node) in fused.final:
                    kind, src, extra = fused.final[id(node)]
                    value = self.fused(node, kind, src, extra)
                elif node.domain not in ("", "ai.onnx", ML_DOMAIN):
                    raise ImportProblem(f"operator of domain {node.domain!r}")
                elif self.pass_label(node):
                    continue
                elif all(i == "" or i in self.consts for i in node.input) and node.op_type != "Shape":
                    self.fold(node)
                    continue
                elif node.op_type == "Shape":
                    self.shape_of(node)
                    continue
                elif node.op_type in _ALIAS:
                    if node.op_type == "Dropout" and len(node.input) > 2 and self.const(node.input[2]) is not None \
                            and bool(self.const(node.input[2])):
                        raise ImportProblem("Dropout in training mode", "training")
                    value = self.x(node)
                else:
                    prefix = "ml_" if node.domain == ML_DOMAIN else "op_"
                    handler = getattr(self, f"{prefix}{node.op_type}", None)
                    if handler is None:
                        where = f" (domain {ML_DOMAIN})" if node.domain == ML_DOMAIN else ""
                        raise ImportProblem(f"ONNX op {node.op_type}{where} is not supported", node.op_type)
                    value = handler(node, attrs_of(node))
                    if isinstance(value, dict):  # several outputs (or a label value only)
                        self.vals.update(value)
                        continue
            except ImportProblem as exc:
                hint = suggestion(exc.kind) if exc.kind else None
                after_problem = any(self.b.is_opaque(self.vals.get(i, "")) for i in node.input)
                if exc.kind or not after_problem:  # shape complaints downstream of a problem are noise
                    self.b.problem(f"{self.where(node)}: {exc}" + (f" -> {hint}" if hint else ""))
                first = next((self.vals[i] for i in node.input if i in self.vals), None)
                guess = self.b.shapes.get(first, (self.b.batch,)) if first else (self.b.batch,)
                value = self.b.opaque(self.expect(node.output[0]) or guess, node.output[0])
            self.vals[node.output[0]] = value
            for extra_out in node.output[1:]:
                if extra_out and extra_out in used:
                    self.b.problem(f"{self.where(node)}: its output {extra_out!r} is used (only the first output "
                                   "of a multi-output op is supported)")
        outs = self.outputs(graph)
        if strict:
            self.b.check_engine_ops()
        return self.b, outs, dict(self.b.origin)

    def _token_vocab(self, graph: Any, inp: Any) -> int | None:
        """The vocabulary of an integer input that only ``Gather(table, ids)`` lookups of
        constant tables read (token ids; see the PyTorch importer's twin); None for a float
        input. UnsupportedModelError for an integer input used otherwise."""
        elem = inp.type.tensor_type.elem_type
        if elem in (self.onnx.TensorProto.FLOAT, self.onnx.TensorProto.DOUBLE, self.onnx.TensorProto.FLOAT16):
            return None
        sizes = set()
        for n in graph.node:
            if inp.name not in n.input:
                continue
            table = self.const(n.input[0]) if n.op_type == "Gather" else None
            if table is None or list(n.input).index(inp.name) != 1 or table.ndim != 2 or attrs_of(n).get("axis", 0):
                raise UnsupportedModelError("the model's integer input is used by other ops than embedding lookups",
                                            [f"{self.where(n)}: token ids are supported as Gather(table, ids) "
                                             "indices only (they are sent one-hot)"])
            sizes.add(int(table.shape[0]))
        if len(sizes) != 1:
            raise UnsupportedModelError("the token ids index embedding tables of different sizes", [str(sorted(sizes))])
        return sizes.pop()

    def outputs(self, graph: Any) -> list[str]:
        """The IR outputs; sets ``self.labels`` and ``self.output_names`` for a classifier.

        At most one output is an activation (the engine's ``logits``) and at most one a
        label; the label's scores become the second IR output where they differ from
        the first (see :class:`~secureinfer.graph.ir.Graph`)."""
        acts = [o.name for o in graph.output if o.name in self.vals]
        labels = [o.name for o in graph.output if o.name in self.labels_of and o.name not in self.vals]
        for o in graph.output:
            if o.name not in self.vals and o.name not in self.labels_of:
                self.b.problem(f"output {o.name!r} is not computed from the model input")
        if len(acts) > 1:
            self.b.problem(f"the model has {len(acts)} tensor outputs ({', '.join(acts)}); one is supported "
                           "(plus a classifier's label)")
        if len(labels) > 1:
            self.b.problem(f"the model has {len(labels)} label outputs; one is supported")
        self.labels, self.output_names = None, {}
        if not labels:
            return [self.vals[a] for a in acts[:1]]
        src, classes = self.labels_of[labels[0]]
        self.labels = classes
        main = self.vals[acts[0]] if acts else src
        self.output_names = {labels[0]: "label", **({acts[0]: "logits"} if acts else {})}
        return [main] if main == src else [main, src]

    def fold(self, node: Any) -> None:
        from onnx.reference import ReferenceEvaluator

        if node.op_type == "Constant":
            from onnx import numpy_helper

            a = node.attribute[0]
            val = attrs_of(node)[a.name]
            self.consts[node.output[0]] = numpy_helper.to_array(val) if hasattr(val, "dims") else np.asarray(val)
            return
        feeds = {i: self.consts[i] for i in node.input if i}
        try:
            outs = ReferenceEvaluator(node, opsets={"": self.opset}).run(None, feeds)
        except Exception as exc:  # noqa: BLE001 - report, don't crash
            self.b.problem(f"{self.where(node)}: constant folding failed: {exc}")
            return
        for name, val in zip(node.output, outs):
            if name:
                self.consts[name] = np.asarray(val)

    def shape_of(self, node: Any) -> None:
        src = node.input[0]
        shape = self.b.shapes.get(self.act(src) or "") if src not in self.consts else self.consts[src].shape
        if shape is None:
            self.b.problem(f"{self.where(node)}: shape of an unknown value")
            return
        a = attrs_of(node)
        start, end = a.get("start", 0), a.get("end", len(shape))
        self.consts[node.output[0]] = np.asarray(shape[start:end], dtype=np.int64)

    def fused(self, node: Any, kind: str, src: str, extra: dict[str, Any]) -> str:
        x = self.act(src)
        if x is None:
            raise ImportProblem(f"{kind} of a value that is not an activation")
        if kind == "gelu":
            return self.emit(node, "gelu", [x])
        size = self.b.shapes[x][-1]
        return self.emit(node, "layernorm", [x], {"axis": -1, "size": int(size), "eps": float(extra["eps"])},
                         {"weight": None, "bias": None})


def from_onnx(model_or_path: Any, *, frac_bits: int = 16, input_shape: Sequence[int] | None = None,
              optimize: bool = True, strict: bool = True) -> Graph:
    """Import an ONNX model (``ModelProto``, path or bytes).

    ``input_shape`` (per sample, without the batch axis) is needed only when the model's
    input has symbolic non-batch dimensions. Raises one UnsupportedModelError listing every
    node that cannot be imported and, with ``strict``, every op the engine cannot run yet.
    """
    from secureinfer.graph.passes import optimize as run_passes
    from secureinfer.graph.validate import validate

    imp = _Importer(_load(model_or_path), frac_bits=frac_bits, input_shape=input_shape)
    builder, outputs, origin = imp.run(strict=strict)
    graph = builder.finish(outputs)
    if imp.labels is not None:
        graph = dataclasses.replace(graph, labels=imp.labels, output_names=imp.output_names)
    if imp.one_hot is not None:
        spec = graph.inputs[0]
        graph = dataclasses.replace(graph, inputs=[TensorSpec(spec.name, spec.shape, one_hot=imp.one_hot)])
    if optimize:
        graph = run_passes(graph)
    if strict:
        validate(graph, strict=True, origin=origin)
    return graph
