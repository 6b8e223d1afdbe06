"""Secure operators: the registry that maps each IR op to its protocols.

Every op is a :class:`SecureOp` with four faces, all pure functions of public data except
``run``:

* ``infer``    — output shape and fixed-point scale from the inputs' (the planner uses
                 it to insert truncations where an op needs a smaller scale);
* ``masks`` / ``encode`` — which parameters are *fixed-weight operands* (deployment
                 masks ``B``, opened ``E = W - B``) and how the owner encodes them;
* ``material`` — the dealer's side: correlated randomness for one request;
* ``run``      — the party's side: the protocol on shares.

Scales: a value with scale ``s`` represents ``v / 2^s``. Ops never truncate implicitly;
an op that needs inputs at most at scale ``f`` says so with ``max_in_scale`` and the
planner inserts a truncation step. Upscaling (``x << k``) is local and exact, so residual
adds and concatenations align their inputs to the larger scale for free.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from secureinfer import ring
from secureinfer.dealer.material import BundleBuilder, PartyBundle, gate_material, linear_material, trunc_material
from secureinfer.errors import ShapeError, UnsupportedModelError
from secureinfer.graph.ir import Node
from secureinfer.protocols.arith import linear_fixed, linear_offline, truncate
from secureinfer.protocols.compare import (
    DEFAULT_INT_BITS,
    argmax_material,
    argmax_onehot,
    argmax_rounds,
    clip,
    clip_material,
    clip_rounds,
    full_range_int_bits,
    gate,
    gate_params,
    gate_rounds,
    max_pair,
    max_pair_material,
    max_pair_rounds,
)
from secureinfer.protocols.session import Session

__all__ = ["OPS", "Ctx", "FixedOperand", "SecureOp", "ValueSpec", "register"]


@dataclass(frozen=True)
class ValueSpec:
    shape: tuple[int, ...]
    scale: int


@dataclass(frozen=True)
class Ctx:
    f: int
    n_parties: int
    method: str


@dataclass
class FixedOperand:
    """A party's fixed-weight operand: prepared ``E`` (public) and ``[B] (+E at party 0)``."""

    public: Any
    local: Any
    raw_public: torch.Tensor
    raw_local: torch.Tensor


class SecureOp:
    op: ClassVar[str]
    #: attribute names whose parameters are fixed-weight operands (masked at deployment)
    fixed: ClassVar[tuple[str, ...]] = ()

    def max_in_scale(self, node: Node, ctx: Ctx) -> int | None:
        return None

    def infer(self, node: Node, ins: Sequence[ValueSpec], ctx: Ctx) -> ValueSpec:
        raise NotImplementedError

    def masks(self, node: Node, param_shapes: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
        """Engine-layout shape of each fixed operand, keyed by parameter name."""
        return {}

    def encode(self, node: Node, params: dict[str, Any], f: int) -> dict[str, torch.Tensor]:
        return {}

    def prepare(self, node: Node, param: str, t: torch.Tensor) -> Any:
        """Precompute a fixed operand for fast repeated products (default: as is)."""
        return t

    def material(self, b: BundleBuilder, name: str, node: Node, ins: Sequence[ValueSpec], out: ValueSpec,
                 ctx: Ctx, masks: dict[str, torch.Tensor]) -> None:
        return None

    def run(self, s: Session, bundle: PartyBundle, name: str, node: Node, xs: list[torch.Tensor],
            ins: Sequence[ValueSpec], out: ValueSpec, ctx: Ctx, fixed: dict[str, FixedOperand],
            shares: dict[str, torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError

    def rounds(self, node: Node, ins: Sequence[ValueSpec], ctx: Ctx) -> int:
        return 0


OPS: dict[str, SecureOp] = {}


def register(cls: type[SecureOp]) -> type[SecureOp]:
    OPS[cls.op] = cls()
    return cls


def upscale(x: torch.Tensor, by: int) -> torch.Tensor:
    """``x * 2^by`` — exact and local (by >= 0)."""
    return x * (1 << by) if by else x


def _encode_param(value: Any, frac: int) -> torch.Tensor:
    return ring.encode(torch.as_tensor(value, dtype=torch.float64), frac_bits=frac, max_abs=2.0 ** 15)


def calibrated_int_bits(node: Node, scale: int, *, what: str) -> int:
    """A gated node's integer bits: its calibrated ``int_bits`` (see
    :mod:`secureinfer.graph.ranges`) or :data:`DEFAULT_INT_BITS`, in ``1..62 - scale``
    (a ReLU fused with truncation needs ``ell <= 62``, a max pool's difference gate
    ``scale + int_bits + 1 <= 63``); UnsupportedModelError naming the node otherwise."""
    bits = node.attrs.get("int_bits", DEFAULT_INT_BITS)
    top = full_range_int_bits(scale) - 1
    if not isinstance(bits, int) or isinstance(bits, bool) or not 1 <= bits <= top:
        raise UnsupportedModelError(
            f"node {node.name!r}: {what} int_bits {bits!r} outside 1..{top} for an input with {scale} "
            "fractional bits")
    return bits


# ----------------------------------------------------------------------------- linear family


class _FixedBilinear(SecureOp):
    """``op(x, W) + b`` with a fixed secret ``W`` (see protocols.arith.linear_fixed)."""

    fixed = ("weight",)

    def max_in_scale(self, node: Node, ctx: Ctx) -> int | None:
        return ctx.f

    def bilinear(self, node: Node) -> Callable[[torch.Tensor, Any], torch.Tensor]:
        raise NotImplementedError

    def encode_weight(self, node: Node, w: torch.Tensor) -> torch.Tensor:
        return w

    def encode(self, node: Node, params: dict[str, Any], f: int) -> dict[str, torch.Tensor]:
        w = torch.as_tensor(params[node.attrs["weight"]], dtype=torch.float64)
        out = {node.attrs["weight"]: _encode_param(self.encode_weight(node, w), f)}
        if node.attrs.get("bias"):
            out[node.attrs["bias"]] = _encode_param(params[node.attrs["bias"]], 2 * f)
        return out

    def material(self, b, name, node, ins, out, ctx, masks) -> None:
        op = self.bilinear(node)
        linear_material(b, name, input_shape=ins[0].shape, mask=masks["weight"], op=op)

    def run(self, s, bundle, name, node, xs, ins, out, ctx, fixed, shares) -> torch.Tensor:
        fo = fixed["weight"]
        y = linear_fixed(s, xs[0], bundle=bundle, name=name, public_mask_diff=fo.public, local_operand=fo.local,
                         op=self.bilinear_prepared(node), out_shape=out.shape, offline=bundle.precomputed.get(name))
        if node.attrs.get("bias"):
            y = y + self.bias_view(node, shares[node.attrs["bias"]], y.dim())
        return y

    def bilinear_prepared(self, node: Node) -> Callable[[torch.Tensor, Any], torch.Tensor]:
        return self.bilinear(node)

    def precompute(self, bundle: PartyBundle, name: str, node: Node, ins: Sequence[ValueSpec], out: ValueSpec,
                   fixed: dict[str, FixedOperand]) -> None:
        """Ahead of a request: the input-independent part of the layer (one ring product)."""
        bundle.precomputed[name] = linear_offline(
            bundle, name=name, in_shape=ins[0].shape, out_shape=out.shape,
            public_mask_diff=fixed["weight"].public, op=self.bilinear_prepared(node))

    def bias_view(self, node: Node, b: torch.Tensor, ndim: int) -> torch.Tensor:
        return b

    def rounds(self, node, ins, ctx) -> int:
        return 1


@register
class Linear(_FixedBilinear):
    op = "linear"

    def infer(self, node, ins, ctx) -> ValueSpec:
        shp = ins[0].shape
        if shp[-1] != node.attrs["in_features"]:
            raise ShapeError(f"node {node.name!r} expects (..., {node.attrs['in_features']}), gets {shp}")
        return ValueSpec((*shp[:-1], node.attrs["out_features"]), ins[0].scale + ctx.f)

    def masks(self, node, param_shapes):
        return {"weight": (node.attrs["in_features"], node.attrs["out_features"])}

    def encode_weight(self, node, w):
        return w.t().contiguous()

    def bilinear(self, node):
        return ring.matmul

    def prepare(self, node, param, t):
        return ring.prepare(t)


@register
class Conv2d(_FixedBilinear):
    op = "conv2d"

    def _kw(self, node: Node) -> dict[str, Any]:
        a = node.attrs
        return {"stride": tuple(a["stride"]), "padding": tuple(a["padding"]), "dilation": tuple(a["dilation"]),
                "groups": a["groups"]}

    def infer(self, node, ins, ctx) -> ValueSpec:
        n, c, h, w = ins[0].shape
        a = node.attrs
        if c != a["in_channels"]:
            raise ShapeError(f"node {node.name!r} expects {a['in_channels']} channels, gets {c}")
        kh, kw = a["kernel_size"]
        (sh, sw), (ph, pw), (dh, dw) = a["stride"], a["padding"], a["dilation"]
        oh = (h + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        ow = (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        return ValueSpec((n, a["out_channels"], oh, ow), ins[0].scale + ctx.f)

    def masks(self, node, param_shapes):
        return {"weight": tuple(param_shapes[node.attrs["weight"]])}

    def bilinear(self, node):
        kw = self._kw(node)
        return lambda x, w: ring.conv2d(x, w, **kw)

    def prepare(self, node, param, t):
        return ring.prepare_conv2d(t, groups=node.attrs["groups"])

    def bias_view(self, node, b, ndim):
        return b.view(1, -1, 1, 1)


@register
class ChannelScale(_FixedBilinear):
    """Per-channel affine ``x * w[c] + b[c]`` (BatchNorm that could not be folded)."""

    op = "channel_affine"

    def infer(self, node, ins, ctx) -> ValueSpec:
        return ValueSpec(ins[0].shape, ins[0].scale + ctx.f)

    def masks(self, node, param_shapes):
        return {"weight": tuple(param_shapes[node.attrs["weight"]])}

    def bilinear(self, node):
        axis = node.attrs.get("axis", 1)

        def mul(x: torch.Tensor, w: Any) -> torch.Tensor:
            shape = [1] * x.dim()
            shape[axis] = -1
            return x * w.view(shape)

        return mul

    def bias_view(self, node, b, ndim):
        shape = [1] * ndim
        shape[node.attrs.get("axis", 1)] = -1
        return b.view(shape)


# ----------------------------------------------------------------------------- nonlinear


@register
class Relu(SecureOp):
    op = "relu"

    def infer(self, node, ins, ctx) -> ValueSpec:
        self._int_bits(node, ins[0].scale)  # a bad calibrated range is refused at planning (deploy)
        return ValueSpec(ins[0].shape, min(ins[0].scale, ctx.f))

    def _payload(self, ins: Sequence[ValueSpec], ctx: Ctx) -> tuple[str, int]:
        s = ins[0].scale
        return ("relu_trunc", s - ctx.f) if s > ctx.f else ("relu", 0)

    def _int_bits(self, node: Node, scale: int) -> int:
        """The gate's integer bits (relu_trunc's wrap bit needs ell <= 62)."""
        return calibrated_int_bits(node, scale, what="relu")

    def material(self, b, name, node, ins, out, ctx, masks) -> None:
        payload, frac = self._payload(ins, ctx)
        ell, cut = gate_params(ins[0].scale, int_bits=self._int_bits(node, ins[0].scale))
        gate_material(b, name, shape=ins[0].shape, ell=ell, cut=cut, payload=payload, frac=frac, method=ctx.method)

    def run(self, s, bundle, name, node, xs, ins, out, ctx, fixed, shares) -> torch.Tensor:
        payload, frac = self._payload(ins, ctx)
        return gate(s, xs[0], bundle=bundle, name=name, payload=payload, scale=ins[0].scale, frac=frac,
                    method=ctx.method, int_bits=self._int_bits(node, ins[0].scale))

    def rounds(self, node, ins, ctx) -> int:
        return gate_rounds(ctx.method, ins[0].scale, int_bits=self._int_bits(node, ins[0].scale))


@register
class Clip(SecureOp):
    """``clip(x, -C, C)`` for any ring value (protocols.compare.clip): two full-range gates."""

    op = "clip"

    def infer(self, node, ins, ctx) -> ValueSpec:
        return ValueSpec(ins[0].shape, ins[0].scale)

    def material(self, b, name, node, ins, out, ctx, masks) -> None:
        clip_material(b, name, shape=ins[0].shape, scale=ins[0].scale, method=ctx.method)

    def run(self, s, bundle, name, node, xs, ins, out, ctx, fixed, shares) -> torch.Tensor:
        bound = round(node.attrs["bound"] * 2 ** ins[0].scale)
        return clip(s, xs[0], bound=bound, bundle=bundle, name=name, scale=ins[0].scale, method=ctx.method)

    def rounds(self, node, ins, ctx) -> int:
        return clip_rounds(ctx.method, ins[0].scale)


@register
class Trunc(SecureOp):
    op = "trunc"

    def infer(self, node, ins, ctx) -> ValueSpec:
        return ValueSpec(ins[0].shape, ins[0].scale - node.attrs["frac"])

    def material(self, b, name, node, ins, out, ctx, masks) -> None:
        trunc_material(b, name, shape=ins[0].shape, frac=node.attrs["frac"])

    def run(self, s, bundle, name, node, xs, ins, out, ctx, fixed, shares) -> torch.Tensor:
        return truncate(s, xs[0], bundle=bundle, name=name, frac=node.attrs["frac"])

    def rounds(self, node, ins, ctx) -> int:
        return 1


@register
class Argmax(SecureOp):
    op = "argmax"

    def infer(self, node, ins, ctx) -> ValueSpec:
        return ValueSpec(ins[0].shape, 0)

    def material(self, b, name, node, ins, out, ctx, masks) -> None:
        shp = ins[0].shape
        argmax_material(b, name, batch_shape=shp[:-1], kdim=shp[-1], scale=ins[0].scale, method=ctx.method)

    def run(self, s, bundle, name, node, xs, ins, out, ctx, fixed, shares) -> torch.Tensor:
        return argmax_onehot(s, xs[0], bundle=bundle, name=name, scale=ins[0].scale, method=ctx.method)

    def rounds(self, node, ins, ctx) -> int:
        return argmax_rounds(ctx.method, ins[0].scale)


@register
class ClassLabel(SecureOp):
    """``labels[argmax]`` from the argmax's one-hot shares: their dot product with the
    public labels (``attrs["labels"]``). Local, exact: no rounds, no material."""

    op = "class_label"

    def infer(self, node, ins, ctx) -> ValueSpec:
        if len(node.attrs["labels"]) != ins[0].shape[-1]:
            raise ShapeError(f"{len(node.attrs['labels'])} class labels for {ins[0].shape[-1]} scores")
        return ValueSpec(ins[0].shape[:-1], 0)

    def run(self, s, bundle, name, node, xs, ins, out, ctx, fixed, shares) -> torch.Tensor:
        labels = torch.tensor([int(c) for c in node.attrs["labels"]], dtype=torch.int64, device=xs[0].device)
        return (xs[0] * labels).sum(dim=-1)


# ----------------------------------------------------------------------------- pooling


def _unfold_int(x: torch.Tensor, node: Node, *, pad_value: int = 0) -> torch.Tensor:
    a = node.attrs
    kh, kw = a["kernel_size"]
    sh, sw = a["stride"]
    ph, pw = a["padding"]
    nc, _, h, w = x.shape
    if ph or pw:
        x = torch.nn.functional.pad(x, (pw, pw, ph, ph), value=pad_value)
    patches = x.unfold(2, kh, sh).unfold(3, kw, sw)  # (nc, 1, oh, ow, kh, kw)
    oh, ow = patches.shape[2], patches.shape[3]
    return patches.reshape(nc, oh, ow, kh * kw)


def _pool_out(node: Node, shape: tuple[int, ...]) -> tuple[int, ...]:
    a = node.attrs
    n, c, h, w = shape
    kh, kw = a["kernel_size"]
    (sh, sw), (ph, pw) = a["stride"], a["padding"]
    return (n, c, (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1)


@register
class MaxPool2d(SecureOp):
    """Max over each window by a tournament of ``max_pair`` gates: ceil(log2 k^2) rounds.

    The values' range is the node's calibrated ``int_bits`` (:mod:`secureinfer.graph.ranges`:
    ``|x| < 2^int_bits``) or :data:`DEFAULT_INT_BITS`; padding is ``-2^int_bits`` (the
    most negative value in range) and each gate compares a difference on one bit more."""

    op = "maxpool2d"

    def infer(self, node, ins, ctx) -> ValueSpec:
        self._int_bits(node, ins[0].scale)  # a bad calibrated range is refused at planning (deploy)
        return ValueSpec(_pool_out(node, ins[0].shape), ins[0].scale)

    def _int_bits(self, node: Node, scale: int) -> int:
        """Integer bits of the values (the difference's gate has one more: ell <= 63)."""
        return calibrated_int_bits(node, scale, what="maxpool")

    def _levels(self, k: int) -> list[int]:
        sizes = []
        while k > 1:
            sizes.append(k // 2)
            k = k - k // 2
        return sizes

    def material(self, b, name, node, ins, out, ctx, masks) -> None:
        n, c, oh, ow = out.shape
        k = node.attrs["kernel_size"][0] * node.attrs["kernel_size"][1]
        bits = self._int_bits(node, ins[0].scale) + 1
        for lvl, pairs in enumerate(self._levels(k)):
            max_pair_material(b, f"{name}/l{lvl}", shape=(n * c, oh, ow, pairs), scale=ins[0].scale,
                              method=ctx.method, int_bits=bits)

    def run(self, s, bundle, name, node, xs, ins, out, ctx, fixed, shares) -> torch.Tensor:
        # max pooling pads with "minus infinity": -2^int_bits, the most negative value in range
        # (max_pair compares differences of in-range values exactly), added by party 0 only
        bits = self._int_bits(node, ins[0].scale)
        pad = -(1 << (ins[0].scale + bits)) if s.party_id == 0 else 0
        win = _unfold_int(xs[0].reshape(-1, 1, *ins[0].shape[2:]), node, pad_value=pad)
        lvl = 0
        while win.shape[-1] > 1:
            k = win.shape[-1]
            half = k // 2
            m = max_pair(s, win[..., :half], win[..., half : 2 * half], bundle=bundle, name=f"{name}/l{lvl}",
                         scale=ins[0].scale, method=ctx.method, int_bits=bits + 1)
            win = torch.cat([m, win[..., 2 * half :]], dim=-1)
            lvl += 1
        return win[..., 0].reshape(out.shape)

    def rounds(self, node, ins, ctx) -> int:
        k = node.attrs["kernel_size"][0] * node.attrs["kernel_size"][1]
        bits = self._int_bits(node, ins[0].scale) + 1
        return len(self._levels(k)) * max_pair_rounds(ctx.method, ins[0].scale, int_bits=bits)


@register
class AvgPool2d(SecureOp):
    """Window sums (local) times the public 1/k^2 encoded with ``f`` bits (scale + f)."""

    op = "avgpool2d"

    def max_in_scale(self, node, ctx) -> int | None:
        return ctx.f

    def infer(self, node, ins, ctx) -> ValueSpec:
        return ValueSpec(_pool_out(node, ins[0].shape), ins[0].scale + ctx.f)

    def run(self, s, bundle, name, node, xs, ins, out, ctx, fixed, shares) -> torch.Tensor:
        win = _unfold_int(xs[0].reshape(-1, 1, *ins[0].shape[2:]), node)
        k = node.attrs["kernel_size"][0] * node.attrs["kernel_size"][1]
        inv = round(2**ctx.f / k)
        return (win.sum(-1) * inv).reshape(out.shape)


@register
class GlobalAvgPool(SecureOp):
    op = "global_avgpool"

    def max_in_scale(self, node, ctx) -> int | None:
        return ctx.f

    def infer(self, node, ins, ctx) -> ValueSpec:
        n, c = ins[0].shape[:2]
        return ValueSpec((n, c, 1, 1), ins[0].scale + ctx.f)

    def run(self, s, bundle, name, node, xs, ins, out, ctx, fixed, shares) -> torch.Tensor:
        k = math.prod(ins[0].shape[2:])
        return xs[0].sum(dim=(2, 3), keepdim=True) * round(2**ctx.f / k)


# ----------------------------------------------------------------------------- local structure


@register
class Flatten(SecureOp):
    op = "flatten"

    def infer(self, node, ins, ctx) -> ValueSpec:
        shp = ins[0].shape
        start = node.attrs.get("start_dim", 1)
        return ValueSpec((*shp[:start], math.prod(shp[start:])), ins[0].scale)

    def run(self, s, bundle, name, node, xs, ins, out, ctx, fixed, shares) -> torch.Tensor:
        return xs[0].reshape(out.shape)


@register
class Reshape(SecureOp):
    op = "reshape"

    def infer(self, node, ins, ctx) -> ValueSpec:
        shp = ins[0].shape
        tgt = [shp[0], *node.attrs["shape"]]
        if -1 in tgt[1:]:
            known = math.prod(d for d in tgt[1:] if d != -1)
            tgt[tgt.index(-1, 1)] = math.prod(shp[1:]) // max(known, 1)
        if math.prod(tgt) != math.prod(shp):
            raise ShapeError(f"node {node.name!r} cannot reshape {shp} to {tuple(tgt)}")
        return ValueSpec(tuple(tgt), ins[0].scale)

    def run(self, s, bundle, name, node, xs, ins, out, ctx, fixed, shares) -> torch.Tensor:
        return xs[0].reshape(out.shape)


@register
class Transpose(SecureOp):
    """A permutation of the axes (batch kept first): local, on each share."""

    op = "transpose"

    def infer(self, node, ins, ctx) -> ValueSpec:
        perm = [int(p) for p in node.attrs["perm"]]
        shp = ins[0].shape
        if sorted(perm) != list(range(len(shp))) or perm[0] != 0:
            raise ShapeError(f"node {node.name!r}: perm {perm} does not permute the axes of {shp} keeping the batch")
        return ValueSpec(tuple(shp[p] for p in perm), ins[0].scale)

    def run(self, s, bundle, name, node, xs, ins, out, ctx, fixed, shares) -> torch.Tensor:
        return xs[0].permute(*node.attrs["perm"]).contiguous()


@register
class Slice(SecureOp):
    """``x[..., start:end, ...]`` along one non-batch axis: local, on each share."""

    op = "slice"

    def infer(self, node, ins, ctx) -> ValueSpec:
        shp = list(ins[0].shape)
        axis, start, end = (int(node.attrs[k]) for k in ("axis", "start", "end"))
        if not 1 <= axis < len(shp) or not 0 <= start < end <= shp[axis]:
            raise ShapeError(f"node {node.name!r}: slice {start}:{end} of axis {axis} of {tuple(shp)}")
        shp[axis] = end - start
        return ValueSpec(tuple(shp), ins[0].scale)

    def run(self, s, bundle, name, node, xs, ins, out, ctx, fixed, shares) -> torch.Tensor:
        a = node.attrs
        return xs[0].narrow(int(a["axis"]), int(a["start"]), int(a["end"]) - int(a["start"])).contiguous()


@register
class Add(SecureOp):
    """Residual add: align both inputs to the larger scale (exact local upscale), add."""

    op = "add"

    def infer(self, node, ins, ctx) -> ValueSpec:
        if ins[0].shape != ins[1].shape:
            shape = tuple(torch.broadcast_shapes(ins[0].shape, ins[1].shape))
        else:
            shape = ins[0].shape
        return ValueSpec(shape, max(i.scale for i in ins))

    def run(self, s, bundle, name, node, xs, ins, out, ctx, fixed, shares) -> torch.Tensor:
        return upscale(xs[0], out.scale - ins[0].scale) + upscale(xs[1], out.scale - ins[1].scale)


@register
class AddTensor(SecureOp):
    """``x + P`` for a secret parameter tensor ``P`` broadcast over the batch (position
    embeddings, additive attention masks): each party adds its share of ``P``, encoded
    with ``f`` bits and shifted up to the input's scale (exact). Local: no rounds."""

    op = "add_tensor"

    def infer(self, node, ins, ctx) -> ValueSpec:
        if ins[0].scale < ctx.f:
            raise ShapeError(f"node {node.name!r}: input scale {ins[0].scale} below f = {ctx.f}")
        return ValueSpec(ins[0].shape, ins[0].scale)

    def encode(self, node, params, f) -> dict[str, torch.Tensor]:
        return {node.attrs["bias"]: _encode_param(params[node.attrs["bias"]], f)}

    def run(self, s, bundle, name, node, xs, ins, out, ctx, fixed, shares) -> torch.Tensor:
        return xs[0] + upscale(shares[node.attrs["bias"]], ins[0].scale - ctx.f)


@register
class Concat(SecureOp):
    op = "concat"

    def infer(self, node, ins, ctx) -> ValueSpec:
        axis = node.attrs.get("axis", 1)
        base = list(ins[0].shape)
        base[axis] = sum(i.shape[axis] for i in ins)
        return ValueSpec(tuple(base), max(i.scale for i in ins))

    def run(self, s, bundle, name, node, xs, ins, out, ctx, fixed, shares) -> torch.Tensor:
        return torch.cat([upscale(x, out.scale - i.scale) for x, i in zip(xs, ins)], dim=node.attrs.get("axis", 1))


import secureinfer.engine.ops_nonlinear  # noqa: F401  (registers ops)
