"""ATen op -> IR op handlers of the PyTorch importer (see :mod:`secureinfer.graph.torch_import`).

Each ``op_<aten name>(node, args, base)`` receives the fx node, its arguments bound by
schema name (defaults filled in) and the op's base name (in-place ``_`` stripped); it
returns the IR value name (or a list for multi-output ops) or raises
:class:`~secureinfer.graph.builder.ImportProblem`. Helpers (``act``, ``const``,
``shape``, ``emit``, ...) come from the importer class that mixes this in.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import fx

from secureinfer.graph.builder import Builder, ImportProblem

__all__ = ["AtenOps"]


def _pair(v: Any) -> list[int]:
    if isinstance(v, (list, tuple)):
        return [int(v[0]), int(v[0])] if len(v) == 1 else [int(v[0]), int(v[1])]
    return [int(v), int(v)]


def _pool_floor(h: int, k: int, s: int, p: int, d: int = 1) -> int:
    return (h + 2 * p - d * (k - 1) - 1) // s + 1


class AtenOps:
    """The op handlers; mixed into the importer, which provides the helpers used here."""

    b: Builder

    def act(self, arg: Any) -> str | None:
        raise NotImplementedError

    def const(self, arg: Any) -> torch.Tensor | None:
        raise NotImplementedError

    def shape(self, node: fx.Node) -> tuple[int, ...]:
        raise NotImplementedError

    def where(self, node: fx.Node) -> str:
        raise NotImplementedError

    def base_name(self, node: fx.Node, a: dict[str, Any]) -> str:
        raise NotImplementedError

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
        if y is None and isinstance(p, str) and c is not None:  # position embeddings, attention masks
            y = self.b.add_tensor(p, coef * c.double().numpy(), name=name, origin=origin)
        if y is None:
            raise ImportProblem("adding a constant tensor that varies along the batch axis or does not broadcast")
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

    def op_embedding(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        """A lookup of token ids, which arrive one-hot (batch, ..., vocab): one-hot times the
        table, i.e. a Linear with the table as its (transposed) weight. The ids stay secret:
        nothing is indexed by them."""
        x, table = self.act(a["indices"]), self.const(a["weight"])
        if x != "input" or table is None or table.dim() != 2:
            raise ImportProblem("nn.Embedding other than of the model's token-id input", "embedding")
        attrs = {"in_features": int(table.shape[0]), "out_features": int(table.shape[1])}
        return self.emit(node, a, "linear", [x], attrs, {"weight": table.t().contiguous(), "bias": None})

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

    def _permute(self, node: fx.Node, a: dict[str, Any], perm: list[int]) -> str:
        x = self._x(a["self"])
        if perm[:1] != [0]:
            raise ImportProblem(f"a transpose/permute {perm} that moves the batch axis", "transpose")
        return x if perm == list(range(len(perm))) else self.emit(node, a, "transpose", [x], {"perm": perm})

    def op_transpose(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        nd = len(self.b.shapes[self._x(a["self"])])
        perm = list(range(nd))
        i, j = int(a["dim0"]) % nd, int(a["dim1"]) % nd
        perm[i], perm[j] = perm[j], perm[i]
        return self._permute(node, a, perm)

    def op_permute(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        nd = len(self.b.shapes[self._x(a["self"])])
        return self._permute(node, a, [int(d) % nd for d in a["dims"]])

    def op_t(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        raise ImportProblem(f"aten.{base} of a secret tensor (it swaps the batch axis)", "transpose")

    op_numpy_T = op_t

    def _narrow(self, node: fx.Node, a: dict[str, Any], x: str, dim: int, start: int, end: int,
                suffix: str = "") -> str:
        return self.b.narrow(x, dim, start, end, name=self.base_name(node, a) + suffix, origin=self.where(node))

    def op_slice(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        if int(a.get("step") or 1) != 1:
            raise ImportProblem("slicing with a step other than 1", "slice")
        big = 2 ** 62
        start = 0 if a.get("start") is None else max(-big, min(big, int(a["start"])))
        end = big if a.get("end") is None else max(-big, min(big, int(a["end"])))
        return self._narrow(node, a, self._x(a["self"]), int(a.get("dim") or 0), start, end)

    def op_narrow(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        start = int(a["start"])
        return self._narrow(node, a, self._x(a["self"]), int(a["dim"]), start, start + int(a["length"]))

    def op_select(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        x = self._x(a["self"])
        dim = int(a["dim"]) % len(self.b.shapes[x])
        i = int(a["index"])
        y = self._narrow(node, a, x, dim, i, i + 1 if i != -1 else self.b.shapes[x][dim])
        return self.b.reshape(y, self.shape(node), name=f"{self.base_name(node, a)}.squeeze", origin=self.where(node))

    def op_split(self, node: fx.Node, a: dict[str, Any], base: str) -> list[str]:
        x = self._x(a["self"])
        dim = int(a.get("dim") or 0) % len(self.b.shapes[x])
        n = self.b.shapes[x][dim]
        size = a.get("split_size", a.get("split_sizes"))
        sizes = [int(v) for v in size] if isinstance(size, (list, tuple)) else \
            [min(int(size), n - k) for k in range(0, n, int(size))]
        if sum(sizes) != n:
            raise ImportProblem(f"split sizes {sizes} of an axis of {n}")
        out, start = [], 0
        for i, sz in enumerate(sizes):
            out.append(self._narrow(node, a, x, dim, start, start + sz, f".{i}"))
            start += sz
        return out

    op_split_with_sizes = op_split

    def op_index(self, node: fx.Node, a: dict[str, Any], base: str) -> str:
        raise ImportProblem(f"aten.{base} (indexing a secret tensor with a tensor)", "slice")

    op_chunk = op_unbind = op_index
