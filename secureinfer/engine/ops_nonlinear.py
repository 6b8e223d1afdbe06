"""Secure ops for the nonlinear layers of modern models: sigmoid, tanh, GELU, softmax,
LayerNorm (normalization only), LeakyReLU and MatMul between two secret tensors.

Registered into :data:`secureinfer.engine.ops.OPS` on import (``engine.ops`` imports
this module at its end). The protocols, their methods, rounds and measured errors are in
:mod:`secureinfer.protocols.approx`; every face of an op (``infer``, ``material``,
``run``, ``rounds``) derives from the same protocol program, so the dealer, the planner
and the parties cannot disagree.

Scales: the approximations accept inputs up to scale 32 (a linear layer's ``2f`` with
f = 16: the input's truncation is folded into their first opening) and return more
fractional bits than ``f`` (28 for sigmoid/tanh/GELU, 32 for softmax/LayerNorm); the
planner truncates where a following op needs ``f``. LayerNorm's affine ``gamma, beta``
are not part of ``layernorm``: the importer emits ``channel_affine(axis=-1)`` after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch

from secureinfer.dealer.material import BundleBuilder
from secureinfer.engine.ops import Ctx, SecureOp, ValueSpec, gate_rounds, register
from secureinfer.errors import ShapeError, UnsupportedModelError
from secureinfer.graph.ir import Node
from secureinfer.protocols import approx

__all__ = ["Gelu", "LayerNorm", "LeakyRelu", "MatMul", "Sigmoid", "Softmax", "Tanh"]


class _Approx(SecureOp):
    """An op that runs one program of :mod:`secureinfer.protocols.approx` on one input."""

    kind: ClassVar[str]
    #: inputs above this scale are truncated by the planner first
    in_scale_cap: ClassVar[int] = 32

    def max_in_scale(self, node: Node, ctx: Ctx) -> int | None:
        return min(self.in_scale_cap, 2 * ctx.f)

    def options(self, node: Node, ins: Sequence[ValueSpec]) -> dict[str, Any]:
        return {}

    def _spec(self, node: Node, ins: Sequence[ValueSpec], ctx: Ctx) -> approx.Spec:
        return approx.describe(self.kind, ins[0].shape, scale=ins[0].scale, method=ctx.method,
                               **self.options(node, ins))

    def infer(self, node, ins, ctx) -> ValueSpec:
        spec = self._spec(node, ins, ctx)
        return ValueSpec(spec.shape, spec.scale)

    def material(self, b: BundleBuilder, name, node, ins, out, ctx, masks) -> None:
        approx.material(self.kind, b, name, shape=ins[0].shape, scale=ins[0].scale, method=ctx.method,
                        **self.options(node, ins))

    def run(self, s, bundle, name, node, xs, ins, out, ctx, fixed, shares) -> torch.Tensor:
        return approx.run(self.kind, s, xs[0], bundle, name, scale=ins[0].scale, method=ctx.method,
                          **self.options(node, ins))

    def rounds(self, node, ins, ctx) -> int:
        return self._spec(node, ins, ctx).rounds


@register
class Sigmoid(_Approx):
    op = kind = "sigmoid"


@register
class Tanh(_Approx):
    op = kind = "tanh"


@register
class Gelu(_Approx):
    """Exact (erf) GELU; the tanh approximation of ``approximate='tanh'`` differs from it
    by < 5e-4, inside the documented tolerance."""

    op = kind = "gelu"


@register
class Softmax(_Approx):
    op = kind = "softmax"

    def options(self, node, ins):
        ndim = len(ins[0].shape)
        axis = int(node.attrs.get("axis", -1))
        if not -ndim <= axis < ndim:
            raise ShapeError(f"node {node.name!r}: softmax axis {axis} out of range for {ins[0].shape}")
        return {"axis": axis}


@register
class LayerNorm(_Approx):
    """Normalization over the last axis; input scale capped at 16 (the mean's division
    by N needs the headroom)."""

    op = kind = "layernorm"
    in_scale_cap = 16

    def options(self, node, ins):
        a = node.attrs
        shape = ins[0].shape
        if a.get("weight") or a.get("bias"):
            raise UnsupportedModelError(
                f"node {node.name!r}: layernorm carries its affine parameters; emit them as a following "
                "channel_affine(axis=-1) node")
        if int(a.get("axis", -1)) not in (-1, len(shape) - 1):
            raise UnsupportedModelError(f"node {node.name!r}: layernorm over axis {a.get('axis')} (only the last)")
        size = a.get("size")
        if size is not None and int(size) != shape[-1]:
            raise ShapeError(f"node {node.name!r}: layernorm size {size} does not match the input {shape}")
        return {"eps": float(a.get("eps", 1e-5))}


@register
class LeakyRelu(SecureOp):
    """``a x + (1 - a) ReLU(x)``; ``a`` encoded with f bits: output scale ``s + f``."""

    op = "leaky_relu"

    def max_in_scale(self, node, ctx) -> int | None:
        return ctx.f

    def infer(self, node, ins, ctx) -> ValueSpec:
        return ValueSpec(ins[0].shape, ins[0].scale + ctx.f)

    def material(self, b, name, node, ins, out, ctx, masks) -> None:
        approx.leaky_relu_material(b, name, shape=ins[0].shape, scale=ins[0].scale, method=ctx.method)

    def run(self, s, bundle, name, node, xs, ins, out, ctx, fixed, shares) -> torch.Tensor:
        return approx.leaky_relu(s, xs[0], bundle, name, scale=ins[0].scale, method=ctx.method,
                                 slope=float(node.attrs.get("negative_slope", 0.01)), slope_bits=ctx.f)

    def rounds(self, node, ins, ctx) -> int:
        return gate_rounds(ctx.method, ins[0].scale)


@register
class MatMul(SecureOp):
    """``torch.matmul`` of two secret inputs (Beaver matrix triple); scale ``s_a + s_b``."""

    op = "matmul"

    def max_in_scale(self, node, ctx) -> int | None:
        return ctx.f

    def infer(self, node, ins, ctx) -> ValueSpec:
        if len(ins) != 2:
            raise ShapeError(f"node {node.name!r}: matmul takes two inputs, got {len(ins)}")
        try:
            shape = approx.matmul_shape(ins[0].shape, ins[1].shape)
        except RuntimeError as exc:
            raise ShapeError(f"node {node.name!r}: cannot multiply {ins[0].shape} by {ins[1].shape}") from exc
        return ValueSpec(shape, ins[0].scale + ins[1].scale)

    def material(self, b, name, node, ins, out, ctx, masks) -> None:
        approx.matmul_material(b, name, x_shape=ins[0].shape, y_shape=ins[1].shape)

    def run(self, s, bundle, name, node, xs, ins, out, ctx, fixed, shares) -> torch.Tensor:
        return approx.matmul(s, xs[0], xs[1], bundle, name)

    def rounds(self, node, ins, ctx) -> int:
        return 1
