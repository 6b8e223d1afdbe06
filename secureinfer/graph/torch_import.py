"""PyTorch importer: ``nn.Sequential`` of supported modules -> :class:`Graph`.

Supported modules: ``nn.Linear``, ``nn.ReLU``, ``nn.Flatten``, nested ``nn.Sequential``;
``nn.Identity`` and ``nn.Dropout`` are dropped (inference). Any other module is reported,
all of them in one :class:`~secureinfer.errors.UnsupportedModelError`.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from secureinfer.errors import UnsupportedModelError
from secureinfer.graph.ir import Graph, Node, TensorSpec

__all__ = ["from_torch"]


def _flatten_modules(module: nn.Module, prefix: str) -> list[tuple[str, nn.Module]]:
    if isinstance(module, nn.Sequential):
        out: list[tuple[str, nn.Module]] = []
        for name, child in module.named_children():
            out += _flatten_modules(child, f"{prefix}{name}." if prefix or name else name)
        return out
    return [(prefix.rstrip("."), module)]


def from_torch(module: nn.Module, example_input: torch.Tensor | Sequence[int], *, frac_bits: int = 16) -> Graph:
    """Import a PyTorch model. ``example_input`` (or its shape) fixes the per-sample shape."""
    shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else tuple(example_input)
    mods = _flatten_modules(module, "") if isinstance(module, nn.Sequential) else [("model", module)]
    nodes: list[Node] = []
    params: dict[str, np.ndarray] = {}
    problems: list[str] = []
    prev = "input"
    for i, (name, m) in enumerate(mods):
        nname = name or f"layer{i}"
        nname = nname.replace(".", "_")
        if isinstance(m, (nn.Identity, nn.Dropout)):
            continue
        if isinstance(m, nn.Linear):
            w = f"{nname}.weight"
            params[w] = m.weight.detach().double().cpu().numpy()
            b = None
            if m.bias is not None:
                b = f"{nname}.bias"
                params[b] = m.bias.detach().double().cpu().numpy()
            attrs = {"in_features": m.in_features, "out_features": m.out_features, "weight": w, "bias": b}
            nodes.append(Node(nname, "linear", (prev,), attrs))
        elif isinstance(m, nn.ReLU):
            nodes.append(Node(nname, "relu", (prev,)))
        elif isinstance(m, nn.Flatten):
            if m.start_dim != 1 or m.end_dim != -1:
                problems.append(f"{nname}: Flatten(start_dim={m.start_dim}, end_dim={m.end_dim}) — only start_dim=1, end_dim=-1")
            nodes.append(Node(nname, "flatten", (prev,), {"start_dim": 1}))
        else:
            problems.append(f"{nname}: {type(m).__name__} is not supported")
            continue
        prev = nname
    if problems:
        raise UnsupportedModelError(f"{len(problems)} unsupported layer(s) in the model", problems)
    g = Graph(
        inputs=[TensorSpec("input", (-1, *shape[1:]))],
        nodes=nodes,
        outputs=[prev],
        frac_bits=frac_bits,
        params=params,
    )
    g.validate()
    return g


def _rebuild(module: torch.nn.Module, problems: list[str], prefix: str = "") -> nn.Module:
    """An eager copy of a TorchScript module tree (only the supported module kinds)."""
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


def from_script(module: torch.nn.Module, *, frac_bits: int = 16) -> Graph:
    """Import a TorchScript ``nn.Sequential`` (input shape taken from its first Linear)."""
    problems: list[str] = []
    eager = _rebuild(module, problems)
    if problems:
        raise UnsupportedModelError(f"{len(problems)} unsupported layer(s) in the model", problems)
    first = next((m for m in eager.modules() if isinstance(m, nn.Linear)), None)
    if first is None:
        raise UnsupportedModelError("the model has no Linear layer to infer its input shape from")
    return from_torch(eager, (1, first.in_features), frac_bits=frac_bits)
