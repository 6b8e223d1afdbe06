"""Validator: every reason a graph cannot run under MPC, all at once, with suggestions.

:func:`validate` returns one :class:`Finding` per problem — structural problems of the IR
(:meth:`Graph.problems`), shape errors, ops the secure engine has no protocol for (not in
:data:`secureinfer.engine.ops.OPS`) and engine caveats (warnings) — each with a suggested
rewrite where one exists. ``strict=True`` raises one
:class:`~secureinfer.errors.UnsupportedModelError` listing every error finding.

:func:`estimate_cost` gives the online cost of each step of the compiled plan: rounds
from :meth:`Plan.per_step` and an *estimate* of the bytes each party sends to each peer,
``8 x`` the number of ring elements the step opens (:func:`opened_elements`; the
protocols' docstrings give these counts). The counters of a real run are the ground truth.

:data:`SUGGESTIONS` maps an unsupported layer kind to its suggested rewrite; both
importers use it, so the advice is the same whichever way a model arrives.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from secureinfer.errors import ShapeError, UnsupportedModelError
from secureinfer.graph.ir import Graph

__all__ = ["Finding", "SUGGESTIONS", "StepCost", "estimate_cost", "opened_elements", "suggestion", "validate"]

#: layer kind (ATen op name, ONNX op type or IR op, lower case) -> suggested rewrite
SUGGESTIONS: dict[str, str] = {
    "elu": "replace nn.ELU by nn.ReLU or nn.GELU",
    "selu": "replace nn.SELU by nn.ReLU or nn.GELU",
    "celu": "replace nn.CELU by nn.ReLU or nn.GELU",
    "silu": "replace nn.SiLU by nn.GELU (similar shape) or nn.ReLU",
    "mish": "replace nn.Mish by nn.GELU (similar shape)",
    "softplus": "replace nn.Softplus by nn.ReLU",
    "hardswish": "replace nn.Hardswish by nn.ReLU or nn.GELU",
    "hardsigmoid": "replace nn.Hardsigmoid by nn.Sigmoid",
    "hardtanh": "replace nn.ReLU6/nn.Hardtanh by nn.ReLU",
    "relu6": "replace nn.ReLU6 by nn.ReLU",
    "lstm": "recurrent layers are not supported: use Conv2d over a (N, C, 1, L) sequence, or attention",
    "gru": "recurrent layers are not supported: use Conv2d over a (N, C, 1, L) sequence, or attention",
    "rnn": "recurrent layers are not supported: use Conv2d over a (N, C, 1, L) sequence, or attention",
    "multiheadattention": "write attention from nn.Linear projections, torch.matmul and softmax, keeping the batch "
                          "axis first and without transposes of activations",
    "clamp": "replace clamp/ReLU6 by nn.ReLU",
    "prelu": "use nn.PReLU(num_parameters=1) (imported as LeakyReLU) or nn.LeakyReLU",
    "log_softmax": "return the logits and apply log_softmax on the client after decryption",
    "logsoftmax": "return the logits and apply log_softmax on the client after decryption",
    "maxpool_ceil": "use MaxPool2d(ceil_mode=False) (pad the input if the last window matters)",
    "avgpool_ceil": "use AvgPool2d(ceil_mode=False)",
    "maxpool_dilation": "use MaxPool2d with dilation=1",
    "avgpool_exclude_pad": "use AvgPool2d(count_include_pad=True) or padding=0",
    "adaptive_avg_pool2d": "AdaptiveAvgPool2d to a size other than 1 (or a divisor of the input size): "
                           "use AvgPool2d with an explicit kernel and stride",
    "adaptive_max_pool": "use MaxPool2d with an explicit kernel, or AdaptiveAvgPool2d((1, 1))",
    "conv1d": "use Conv2d with a (1, k) kernel on a (N, C, 1, L) input",
    "conv_transpose": "transposed convolutions are not supported: use a Linear to the upsampled size, or a "
                      "design without upsampling",
    "convtranspose": "use a strided Conv, or reshape + Gemm",
    "conv_padding": "use symmetric padding (padding=k//2 with an odd kernel) and padding_mode='zeros'",
    "pad": "use Conv2d(padding=..., padding_mode='zeros') instead of explicit or reflect/replicate padding",
    "max_pool1d": "use MaxPool2d on a (N, C, 1, L) input",
    "avg_pool1d": "use AvgPool2d on a (N, C, 1, L) input",
    "upsample": "upsampling is not supported: use a Linear to the upsampled size, or avoid upsampling",
    "embedding": "an nn.Embedding of the model's own token-id input imports (the ids are sent one-hot, "
                 "secureinfer.client.sdk.one_hot); embed other lookups on the client",
    "transpose": "a transpose/permute must keep the batch axis first (perm[0] = 0); x.t() of a 2-D batch "
                 "swaps it: use x.transpose(1, 2) on a batch-first tensor, or fold the transpose into the weights",
    "mul": "multiply a secret tensor only by constants (x * c); for gating use a Linear/Conv",
    "div": "divide only by constants (x / c)",
    "sub": "subtract a constant or use add",
    "slice": "slices must keep the whole batch and use step 1 (x[:, a:b], x[:, i], split); indexing with a "
             "tensor is not supported",
    "mean": "use AdaptiveAvgPool2d((1, 1)) or x.mean((2, 3)) for global average pooling",
    "sum": "use a Linear with all-ones weights, or global average pooling",
    "exp": "use Softmax/Sigmoid (which the engine approximates) instead of raw exp",
    "sqrt": "use LayerNorm instead of hand-written normalisation",
    "pow": "use LayerNorm instead of hand-written normalisation",
    "layernorm_decomposed": "export with opset >= 17 so LayerNorm is one LayerNormalization node",
    "training": "call model.eval() before importing (BatchNorm/Dropout in training mode)",
    "gelu": "the secure engine has no GELU yet: use nn.ReLU",
    "sigmoid": "the secure engine has no sigmoid yet: return logits and apply it on the client",
    "tanh": "the secure engine has no tanh yet: use nn.ReLU",
    "softmax": "return the logits and apply softmax on the client after decryption",
    "leaky_relu": "the secure engine has no LeakyReLU yet: use nn.ReLU",
    "layernorm": "the secure engine has no LayerNorm yet: use BatchNorm (foldable) where possible",
    "matmul": "the secure engine has no secret x secret matmul yet",
}


def suggestion(kind: str) -> str | None:
    """The suggested rewrite for ``kind`` (ATen op, ONNX op type or IR op), if any."""
    k = kind.lower().removeprefix("aten::").removeprefix("aten.").split(".")[0].rstrip("_")
    if k in SUGGESTIONS:
        return SUGGESTIONS[k]
    for prefix in ("upsample", "conv_transpose", "max_pool1d", "avg_pool1d", "adaptive_max_pool", "log_softmax"):
        if k.startswith(prefix):
            return SUGGESTIONS[prefix]
    return None


@dataclass(frozen=True)
class Finding:
    """One problem of a graph: ``severity`` is ``"error"`` (cannot run) or ``"warning"``."""

    node: str
    op: str
    message: str
    suggestion: str | None = None
    severity: str = "error"

    def __str__(self) -> str:
        where = f"node {self.node!r} ({self.op})" if self.node else "graph"
        tail = f" -> {self.suggestion}" if self.suggestion else ""
        return f"{where}: {self.message}{tail}"


def _engine_ops() -> Mapping[str, Any]:
    from secureinfer.engine.ops import OPS  # the engine sits above the graph layer: import lazily

    return OPS


def validate(graph: Graph, *, strict: bool = False, ops: Mapping[str, Any] | None = None,
             origin: Mapping[str, str] | None = None) -> list[Finding]:
    """Every finding for ``graph`` (errors first). ``ops`` defaults to the engine registry;
    ``origin`` optionally names where each node came from (e.g. ``"nn.Sigmoid"``)."""
    ops = _engine_ops() if ops is None else ops
    origin = origin or {}
    found: list[Finding] = []
    for p in graph.problems():
        if "unsupported op" not in p:  # unknown ops are reported below, with suggestions
            found.append(Finding("", "", p))
    by_name = {n.name: n for n in graph.nodes}
    for n in graph.nodes:
        if n.op not in ops:
            where = f" [{origin[n.name]}]" if n.name in origin else ""
            found.append(Finding(n.name, n.op, f"op {n.op!r}{where} is not supported by the secure engine",
                                 suggestion(n.op)))
    if not any(f.severity == "error" for f in found):
        try:
            from secureinfer.graph.passes import infer_shapes

            infer_shapes(graph)
        except ShapeError as exc:
            found.append(Finding("", "", str(exc)))
    if ops is _engine_ops() and not any(f.severity == "error" for f in found):
        from secureinfer.engine.plan import compile_plan  # the engine's own constraints (scales, attributes)

        try:
            compile_plan(graph, batch=1, n_parties=2)
        except (UnsupportedModelError, ShapeError, ValueError) as exc:
            found.append(Finding("", "", f"the secure engine refuses the graph: {exc}"))
    for n in graph.nodes:
        if n.op == "maxpool2d" and any(n.attrs.get("padding", (0, 0))):
            src = by_name.get(n.inputs[0])
            if src is None or src.op != "relu":
                found.append(Finding(n.name, n.op, "the engine pads max pooling with 0 (PyTorch: -inf); the result "
                                     "differs where a window's real values are all negative",
                                     "put a ReLU before the padded MaxPool2d, or use padding=0",
                                     severity="warning"))
    found.sort(key=lambda f: f.severity != "error")
    if strict:
        errors = [str(f) for f in found if f.severity == "error"]
        if errors:
            raise UnsupportedModelError(f"{len(errors)} problem(s): the model cannot run under MPC", errors)
    return found


# ----------------------------------------------------------------------------- cost


@dataclass(frozen=True)
class StepCost:
    step: str
    op: str
    inputs: list[list[int]]
    output: list[int]
    scale: int
    rounds: int
    bytes_per_peer: int | None  # estimate; None when the op's traffic is unknown here


def _gate_elements(method: str, scale: int, k: int, *, diff: bool = False, int_bits: int | None = None) -> int:
    """Elements one comparison gate opens per input element (see protocols.compare);
    ``diff``: the gate compares a difference (max, argmax), one integer bit wider;
    ``int_bits``: a calibrated range (graph.ranges) instead of the default."""
    if method == "fss":
        return 1
    from secureinfer.protocols.compare import DEFAULT_INT_BITS, DIFF_INT_BITS, gate_params

    if int_bits is None:
        int_bits = DIFF_INT_BITS if diff else DEFAULT_INT_BITS
    ell, cut = gate_params(scale, int_bits=int_bits)
    n = ell - cut
    opened, s = 1, 1
    while s < n:  # Hillis-Steele prefix products: one Beaver product of n - s pairs
        opened += 2 * (n - s)
        s *= 2
    return opened + 1 + k  # d * beta: d (1) and beta (k)


def opened_elements(op: str, ins: list[tuple[int, ...]], out: tuple[int, ...], scale_in: int,
                    attrs: Mapping[str, Any], *, method: str, f: int) -> int | None:
    """Ring elements a step opens (each party sends this many 8-byte words to each peer)."""
    n_in = math.prod(ins[0]) if ins else 0
    if op in ("linear", "conv2d", "channel_affine", "trunc"):
        return n_in  # fixed-weight masks: only the input mask x - A is opened per request
    if op == "relu":
        return n_in * _gate_elements(method, scale_in, 3 if scale_in > f else 2,  # ReLU fused with truncation
                                     int_bits=attrs.get("int_bits"))
    if op == "maxpool2d":
        k = attrs["kernel_size"][0] * attrs["kernel_size"][1]
        total, windows = 0, math.prod(out)
        while k > 1:
            total += windows * (k // 2) * _gate_elements(
                method, scale_in, 2, diff=True, int_bits=attrs["int_bits"] + 1 if "int_bits" in attrs else None)
            k -= k // 2
        return total
    if op == "argmax":
        kdim = ins[0][-1]
        rows = n_in // max(kdim, 1)
        pairs = kdim * (kdim - 1) // 2 * _gate_elements(method, scale_in, 1, diff=True)
        return rows * (pairs + kdim * _gate_elements(method, 0, 1))
    if op in ("add", "concat", "flatten", "reshape", "avgpool2d", "global_avgpool"):
        return 0
    return None


def estimate_cost(graph: Graph, *, batch: int = 1, n_parties: int = 2, method: str | None = None,
                  argmax: bool = False) -> list[StepCost]:
    """Per-step online cost of ``graph`` (rounds exact from the plan; bytes estimated).

    Raises UnsupportedModelError when the engine cannot compile the graph."""
    from secureinfer.engine.plan import compile_plan

    plan = compile_plan(graph, batch=batch, n_parties=n_parties, method=method, argmax=argmax)
    out: list[StepCost] = []
    for s, row in zip(plan.steps, plan.per_step()):
        ins = [tuple(i.shape) for i in s.ins]
        scale_in = s.ins[0].scale if s.ins else 0
        n_open = opened_elements(s.node.op, ins, tuple(s.out.shape), scale_in, s.node.attrs, method=plan.method,
                                 f=plan.ctx.f)
        out.append(StepCost(str(row["step"]), str(row["op"]), [list(i) for i in ins], list(s.out.shape),
                            int(row["scale"]), int(row["rounds"]), None if n_open is None else 8 * n_open))
    return out
