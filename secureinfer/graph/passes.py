"""Graph passes on the IR, shape inference, and a float64 plaintext reference evaluator.

* :func:`node_shape` / :func:`infer_shapes` — the IR's shape rules. They run each op's
  reference implementation on ``meta`` tensors (shapes only, no data, no arithmetic), so
  shapes and values can never follow different rules.
* :func:`evaluate` — runs a graph in float64 with ``torch.nn.functional`` (PyTorch
  semantics of every op; max pooling pads with -inf, average pooling counts the padding as
  PyTorch's default ``count_include_pad=True`` does). Tests use it to check that importers
  and passes preserve a model's function.
* Passes (each returns a new graph; the input graph is not modified):
  :func:`fold_affine` folds a ``channel_affine`` (BatchNorm in inference, or an import of
  ``x * c + d`` with per-channel constants) into the preceding ``conv2d``/``linear`` when
  that node's output has no other consumer — W' = W * w[o], b' = b * w[o] + d[o]
  (exact in real arithmetic, one rounding in float64) — and merges chains of affines
  (LayerNorm's gamma/beta stay a ``channel_affine`` after ``layernorm``, the engine's
  convention);
  :func:`fold_shapes` drops reshapes that do not change the shape and collapses chains
  of ``flatten``/``reshape`` into one node; :func:`eliminate_dead` removes nodes no output
  depends on; :func:`optimize` runs these until nothing changes.
  :func:`pool_before_relu` moves a ReLU from before a max pool to after it (exact; ``k^2``
  times fewer comparison gates); the planner applies it to every graph it compiles and
  range calibration to the graph it calibrates, so importers leave the order as written.

Dropout and Identity never reach the IR: the importers alias their output to their
input. Shape arithmetic (``x.size(0)``, ONNX ``Shape``/``Gather``/``Concat`` feeding a
``Reshape``) is constant-folded by the importers while they build the graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from secureinfer.errors import InvalidArgumentError, ShapeError
from secureinfer.graph.ir import Graph, Node

__all__ = [
    "eliminate_dead",
    "evaluate",
    "fold_affine",
    "fold_shapes",
    "infer_shapes",
    "node_shape",
    "optimize",
    "pool_before_relu",
    "run_node",
]


def run_node(node: Node, xs: Sequence[torch.Tensor], params: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """One IR op with PyTorch semantics (any dtype/device, including ``meta``)."""
    a = node.attrs
    op = node.op

    def p(attr: str) -> torch.Tensor | None:
        name = a.get(attr)
        return None if name is None else params[name]

    x = xs[0]
    if op == "linear":
        return F.linear(x, p("weight"), p("bias"))
    if op == "conv2d":
        return F.conv2d(x, p("weight"), p("bias"), stride=tuple(a["stride"]), padding=tuple(a["padding"]),
                        dilation=tuple(a["dilation"]), groups=a["groups"])
    if op == "channel_affine":
        axis = a.get("axis", 1) % x.dim()
        view = [1] * x.dim()
        view[axis] = -1
        w = p("weight")
        if w.numel() != x.shape[axis]:
            raise ShapeError(f"channel_affine {node.name!r}: {w.numel()} weights for axis {axis} of {tuple(x.shape)}")
        b = p("bias")
        y = x * w.reshape(view)
        return y if b is None else y + b.reshape(view)
    if op == "relu":
        return F.relu(x)
    if op == "leaky_relu":
        return F.leaky_relu(x, a.get("negative_slope", 0.01))
    if op in ("maxpool2d", "avgpool2d"):
        kw = {"kernel_size": tuple(a["kernel_size"]), "stride": tuple(a["stride"]), "padding": tuple(a["padding"])}
        return F.max_pool2d(x, **kw) if op == "maxpool2d" else F.avg_pool2d(x, **kw, count_include_pad=True)
    if op == "global_avgpool":
        if x.dim() != 4:
            raise ShapeError(f"global_avgpool {node.name!r} needs NCHW input, gets {tuple(x.shape)}")
        return x.mean(dim=(2, 3), keepdim=True)
    if op == "flatten":
        return torch.flatten(x, a.get("start_dim", 1))
    if op == "reshape":
        return x.reshape(x.shape[0], *a["shape"])
    if op == "transpose":
        return x.permute(*a["perm"])
    if op == "slice":
        if not 1 <= a["axis"] < x.dim() or not 0 <= a["start"] < a["end"] <= x.shape[a["axis"]]:
            raise ShapeError(f"slice {node.name!r}: {a['start']}:{a['end']} of axis {a['axis']} of {tuple(x.shape)}")
        return x.narrow(a["axis"], a["start"], a["end"] - a["start"])
    if op == "add_tensor":
        return x + p("bias")
    if op == "add":
        return xs[0] + xs[1]
    if op == "concat":
        return torch.cat(list(xs), dim=a.get("axis", 1))
    if op == "sigmoid":
        return torch.sigmoid(x)
    if op == "tanh":
        return torch.tanh(x)
    if op == "gelu":
        return F.gelu(x)
    if op == "softmax":
        return torch.softmax(x, dim=a.get("axis", -1))
    if op == "layernorm":
        size = a.get("size", x.shape[-1])
        return F.layer_norm(x, (size,), p("weight"), p("bias"), a.get("eps", 1e-5))
    if op == "matmul":
        return torch.matmul(xs[0], xs[1])
    if op == "argmax":
        return F.one_hot(x.argmax(dim=-1), x.shape[-1]).to(x.dtype)
    raise InvalidArgumentError(f"node {node.name!r}: unknown op {op!r}")


def node_shape(node: Node, in_shapes: Sequence[Sequence[int]], param_shapes: Mapping[str, Sequence[int]]) -> tuple[int, ...]:
    """Output shape of ``node`` for the given input shapes; ShapeError if they do not fit."""
    meta = [torch.empty(tuple(s), device="meta", dtype=torch.float64) for s in in_shapes]
    pm = {k: torch.empty(tuple(v), device="meta", dtype=torch.float64) for k, v in param_shapes.items()}
    try:
        return tuple(int(d) for d in run_node(node, meta, pm).shape)
    except ShapeError:
        raise
    except (RuntimeError, ValueError, IndexError, KeyError, TypeError) as exc:
        raise ShapeError(f"node {node.name!r} ({node.op}) cannot take inputs {[tuple(s) for s in in_shapes]}: "
                         f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc


def infer_shapes(graph: Graph, *, batch: int = 1) -> dict[str, tuple[int, ...]]:
    """Shape of every value (input and node outputs) for a batch of ``batch``."""
    spec = graph.input_spec()
    shapes: dict[str, tuple[int, ...]] = {spec.name: (batch, *spec.shape[1:])}
    for n in graph.nodes:
        shapes[n.name] = node_shape(n, [shapes[i] for i in n.inputs], graph.param_shapes)
    return shapes


def evaluate(graph: Graph, x: np.ndarray | torch.Tensor, *, all_values: bool = False
             ) -> np.ndarray | dict[str, np.ndarray]:
    """Plaintext float64 reference of ``graph`` on the batch ``x``: the first output
    (or every value, with ``all_values``)."""
    t = torch.as_tensor(np.asarray(x), dtype=torch.float64)
    params = {k: torch.as_tensor(np.asarray(v), dtype=torch.float64) for k, v in graph.params.items()}
    env: dict[str, torch.Tensor] = {graph.input_spec().name: t}
    with torch.no_grad():
        for n in graph.nodes:
            env[n.name] = run_node(n, [env[i] for i in n.inputs], params)
    if all_values:
        return {k: v.numpy() for k, v in env.items()}
    return env[graph.outputs[0]].numpy()


# ----------------------------------------------------------------------------- passes


def _consumers(graph: Graph) -> dict[str, list[Node]]:
    out: dict[str, list[Node]] = {}
    for n in graph.nodes:
        for i in n.inputs:
            out.setdefault(i, []).append(n)
    return out


def _rewire(nodes: list[Node], outputs: list[str], old: str, new: str) -> tuple[list[Node], list[str]]:
    nodes = [replace(n, inputs=tuple(new if i == old else i for i in n.inputs)) if old in n.inputs else n
             for n in nodes]
    return nodes, [new if o == old else o for o in outputs]


def _param_users(graph: Graph) -> dict[str, int]:
    users: dict[str, int] = {}
    for n in graph.nodes:
        for attr in ("weight", "bias"):
            if n.attrs.get(attr):
                users[n.attrs[attr]] = users.get(n.attrs[attr], 0) + 1
    return users


def _copy(graph: Graph, nodes: list[Node], outputs: list[str], params: dict[str, np.ndarray]) -> Graph:
    used = {n.attrs[a] for n in nodes for a in ("weight", "bias") if n.attrs.get(a)}
    kept = {k: v for k, v in params.items() if k in used}
    shapes = {k: tuple(v.shape) for k, v in kept.items()}
    if not graph.params:  # structure-only graph: keep the declared shapes
        shapes = {k: v for k, v in graph.param_shapes.items() if k in used}
    return Graph(inputs=list(graph.inputs), nodes=nodes, outputs=outputs, frac_bits=graph.frac_bits,
                 params=kept, param_shapes=shapes, labels=graph.labels, output_names=dict(graph.output_names))


def _store_params(node: Node, values: dict[str, np.ndarray], params: dict[str, np.ndarray],
                  users: dict[str, int]) -> dict[str, Any]:
    """``node``'s attrs with its parameters replaced by ``values`` (in ``params``): a
    parameter only ``node`` uses is overwritten, a shared one keeps its old value and
    ``node`` gets a fresh name."""
    attrs = dict(node.attrs)
    for attr, val in values.items():
        old = node.attrs.get(attr)
        pname = old if old and users.get(old, 0) == 1 else f"{node.name}.{attr}"
        while pname != old and pname in params:
            pname += "_"
        params[pname] = val
        attrs[attr] = pname
    return attrs


_FoldStep = Callable[[list[Node], list[str], dict[str, tuple[int, ...]], dict[str, np.ndarray],
                      dict[str, list[Node]], dict[str, int]], "tuple[list[Node], list[str]] | None"]


def _fold_until_fixpoint(graph: Graph, step: _FoldStep) -> Graph:
    """Apply ``step`` (one fold: new nodes and outputs, ``params`` updated in place, or
    None when nothing is left to fold) until it finds nothing; shapes are the input's."""
    if not graph.params:
        return graph
    shapes = infer_shapes(graph)
    params = dict(graph.params)
    nodes, outputs = list(graph.nodes), list(graph.outputs)
    while True:
        g = Graph(inputs=graph.inputs, nodes=nodes, outputs=outputs)
        done = step(nodes, outputs, shapes, params, _consumers(g), _param_users(g))
        if done is None:
            return _copy(graph, nodes, outputs, params)
        nodes, outputs = done


def fold_affine(graph: Graph) -> Graph:
    """Fold each ``channel_affine`` into its producer (conv2d, linear or another affine)
    along the producer's output-channel axis, when it is the producer's only consumer."""

    def step(nodes: list[Node], outputs: list[str], shapes: dict[str, tuple[int, ...]], params: dict[str, np.ndarray],
             cons: dict[str, list[Node]], users: dict[str, int]) -> tuple[list[Node], list[str]] | None:
        by_name = {n.name: n for n in nodes}
        for aff in nodes:
            prod = by_name.get(aff.inputs[0])
            if aff.op != "channel_affine" or prod is None or prod.name in outputs or len(cons[prod.name]) != 1:
                continue
            ndim = len(shapes[prod.name])
            want = {"conv2d": 1, "linear": ndim - 1, "channel_affine": prod.attrs.get("axis", 1) % ndim}.get(prod.op)
            if want is not None and aff.attrs.get("axis", 1) % ndim == want:
                break
        else:
            return None
        w = np.asarray(params[aff.attrs["weight"]], dtype=np.float64).reshape(-1)
        d = params[aff.attrs["bias"]].reshape(-1) if aff.attrs.get("bias") else np.zeros_like(w)
        pw = np.asarray(params[prod.attrs["weight"]], dtype=np.float64)
        pb = params[prod.attrs["bias"]].reshape(-1) if prod.attrs.get("bias") else np.zeros_like(w)
        attrs = _store_params(prod, {"weight": pw * w.reshape((-1,) + (1,) * (pw.ndim - 1)), "bias": pb * w + d},
                              params, users)
        folded = replace(prod, attrs=attrs)
        nodes = [folded if n.name == prod.name else n for n in nodes if n.name != aff.name]
        return _rewire(nodes, outputs, aff.name, prod.name)

    return _fold_until_fixpoint(graph, step)


def fold_affine_into_linear(graph: Graph) -> Graph:
    """Fold a ``channel_affine`` over the last axis into the ``linear`` that is its only
    consumer: ``linear(x * w + d) = x (W diag(w))^T + (W d + b)`` (a standardizing Scaler
    in front of a classifier, say). Saves the affine's fixed-weight product and its
    truncation (one round). Only for near-unit scales (every |w| in [2^-6, 2^6], e.g.
    LayerNorm gains, standardization of unit-range features): folding a tiny scale into
    the weights leaves them with few significant bits at ``f`` fractional bits (measured:
    a breast-cancer Scaler, scales ~2e-3 on raw features up to ~4000, raised the
    logistic-regression probability error from 7.8e-4 to 1.4e-3)."""

    def step(nodes: list[Node], outputs: list[str], shapes: dict[str, tuple[int, ...]], params: dict[str, np.ndarray],
             cons: dict[str, list[Node]], users: dict[str, int]) -> tuple[list[Node], list[str]] | None:
        for aff in nodes:
            if aff.op != "channel_affine" or aff.name in outputs or len(cons[aff.name]) != 1:
                continue
            lin = cons[aff.name][0]
            ndim = len(shapes[aff.name])
            scale = np.abs(np.asarray(params[aff.attrs["weight"]], dtype=np.float64))
            near_unit = bool(np.all((scale >= 2.0 ** -6) & (scale <= 2.0 ** 6)))
            if lin.op == "linear" and near_unit and aff.attrs.get("axis", 1) % ndim == ndim - 1:
                break
        else:
            return None
        w = np.asarray(params[aff.attrs["weight"]], dtype=np.float64).reshape(-1)
        d = params[aff.attrs["bias"]].reshape(-1) if aff.attrs.get("bias") else np.zeros_like(w)
        lw = np.asarray(params[lin.attrs["weight"]], dtype=np.float64)  # (out, in)
        lb = params[lin.attrs["bias"]].reshape(-1) if lin.attrs.get("bias") else np.zeros(lw.shape[0])
        attrs = _store_params(lin, {"weight": lw * w[None, :], "bias": lb + lw @ d}, params, users)
        folded = replace(lin, inputs=(aff.inputs[0],), attrs=attrs)
        return [folded if n.name == lin.name else n for n in nodes if n.name != aff.name], outputs

    return _fold_until_fixpoint(graph, step)


def fold_shapes(graph: Graph) -> Graph:
    """Remove shape-preserving flatten/reshape; collapse flatten/reshape chains."""
    shapes = infer_shapes(graph)
    nodes = list(graph.nodes)
    outputs = list(graph.outputs)
    changed = True
    while changed:
        changed = False
        by_name = {n.name: n for n in nodes}
        for n in nodes:
            if n.op not in ("flatten", "reshape"):
                continue
            src = n.inputs[0]
            if shapes[n.name] == shapes[src]:
                nodes = [m for m in nodes if m.name != n.name]
                nodes, outputs = _rewire(nodes, outputs, n.name, src)
                changed = True
                break
            prev = by_name.get(src)
            if prev is not None and prev.op in ("flatten", "reshape"):
                out = shapes[n.name]
                new = replace(n, op="reshape", inputs=prev.inputs, attrs={"shape": list(out[1:])})
                base = shapes[prev.inputs[0]]
                for s in range(1, len(base)):
                    if out == (*base[:s], math.prod(base[s:])):
                        new = replace(n, op="flatten", inputs=prev.inputs, attrs={"start_dim": s})
                nodes = [new if m.name == n.name else m for m in nodes]
                changed = True
                break
    return eliminate_dead(_copy(graph, nodes, outputs, dict(graph.params)))


def eliminate_dead(graph: Graph) -> Graph:
    """Drop every node that no graph output depends on."""
    live = set(graph.outputs)
    for n in reversed(graph.nodes):
        if n.name in live:
            live.update(n.inputs)
    nodes = [n for n in graph.nodes if n.name in live]
    if len(nodes) == len(graph.nodes):
        return graph
    return _copy(graph, nodes, list(graph.outputs), dict(graph.params))


def pool_before_relu(graph: Graph) -> Graph:
    """Rewrite ``maxpool(relu(x))`` as ``relu(maxpool(x))`` where the ReLU's only consumer
    is the pool and the ReLU is not a graph output.

    Exact: ReLU is monotone, so ``max_i relu(x_i) = relu(max_i x_i)`` over every window,
    and a window always holds at least one element of ``x`` (padding is at most half the
    kernel), so the pool's ``-inf`` padding never decides the result. Why it pays under
    MPC: a ReLU costs one comparison gate per element, and after the pool it runs on
    ``k^2`` times fewer elements (2x2 pooling: 4x fewer gates, DCF keys and AES calls);
    the pool's own gates are unchanged. A calibrated ``int_bits`` on the ReLU stays valid:
    a window's maximum is no larger in magnitude than the largest value of ``x``, which
    the bound was calibrated on. The nodes keep their names; the pool now feeds the ReLU.
    Runs to a fixpoint (``relu -> pool -> pool`` becomes ``pool -> pool -> relu``), so
    applying it twice changes nothing.
    """
    while True:  # to a fixpoint: a ReLU moved after a pool may now feed the next pool
        moved = _pool_before_relu_once(graph)
        if moved is graph:
            return graph
        graph = moved


def _pool_before_relu_once(graph: Graph) -> Graph:
    cons = _consumers(graph)
    by_name = {n.name: n for n in graph.nodes}
    swaps: dict[str, str] = {}  # relu name -> pool name
    for p in graph.nodes:
        r = by_name.get(p.inputs[0]) if p.op == "maxpool2d" else None
        if r is not None and r.op == "relu" and r.name not in graph.outputs and len(cons[r.name]) == 1:
            swaps[r.name] = p.name
    if not swaps:
        return graph
    pools = {pn: rn for rn, pn in swaps.items()}
    nodes, outputs = list(graph.nodes), list(graph.outputs)
    for rn, pn in swaps.items():  # consumers of the pool read the ReLU instead
        nodes, outputs = _rewire(nodes, outputs, pn, rn)
    out: list[Node] = []
    for n in nodes:
        if n.name in swaps:  # the pool takes the ReLU's place, on the ReLU's input
            pool = by_name[swaps[n.name]]
            out.append(replace(pool, inputs=(n.inputs[0], *pool.inputs[1:])))
        elif n.name in pools:  # the ReLU takes the pool's place, on the pool's output
            relu = by_name[pools[n.name]]
            out.append(replace(relu, inputs=(n.name,)))
        else:
            out.append(n)
    return _copy(graph, out, outputs, dict(graph.params))


def optimize(graph: Graph) -> Graph:
    """All passes until a fixpoint (each pass only shrinks the graph)."""
    while True:
        before = len(graph.nodes)
        graph = eliminate_dead(fold_shapes(fold_affine_into_linear(fold_affine(graph))))
        if len(graph.nodes) == before:
            return graph
