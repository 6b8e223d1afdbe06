"""Compile a public :class:`~secureinfer.graph.Graph` into protocol steps.

The plan is a pure function of public data (graph, batch size, number of parties,
comparison method), so the parties and the dealer derive the *same* steps, and the
dealer can generate a request's correlated randomness ahead of the request.

Scales: every value carries its number of fractional bits. Inputs and weights have
``f`` = ``graph.frac_bits``; a linear layer's output has ``2f``. Truncation back to ``f``
is *fused* into the ReLU that follows (one gate does both), or inserted as a separate
truncation step before a linear layer whose input still has ``2f``; the model's final
output is never truncated in MPC — the client divides by ``2^scale`` after
reconstruction, which is exact and free.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from secureinfer import ring
from secureinfer.dealer.material import (
    BundleBuilder,
    gate_material,
    linear_material,
    trunc_material,
)
from secureinfer.errors import ShapeError, UnsupportedModelError
from secureinfer.graph.ir import Graph
from secureinfer.protocols.compare import argmax_material_shapes, default_method, gate_params

__all__ = ["Plan", "Step", "compile_plan", "generate_request_material", "linear_nodes", "model_mask_shapes"]


@dataclass(frozen=True)
class Step:
    name: str
    kind: str  # linear | trunc | gate | flatten | argmax
    node: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    attrs: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Plan:
    steps: list[Step]
    batch: int
    n_parties: int
    method: str
    output_scale: int
    output_shape: tuple[int, ...]
    argmax: bool

    def rounds(self) -> int:
        """Online rounds this plan costs (FSS: 1 per gate; bitwise: see compare)."""
        total = 0
        for s in self.steps:
            if s.kind in ("linear", "trunc"):
                total += 1
            elif s.kind == "gate":
                total += _gate_rounds(self.method, s.attrs["scale"])
            elif s.kind == "argmax":
                total += _gate_rounds(self.method, s.attrs["scale"]) + _gate_rounds(self.method, 0)
        return total


def _gate_rounds(method: str, scale: int) -> int:
    if method == "fss":
        return 1
    ell, cut = gate_params(scale)
    n = ell - cut
    return 2 + max(0, (n - 1).bit_length())


def linear_nodes(graph: Graph) -> list[str]:
    return [n.name for n in graph.nodes if n.op == "linear"]


def model_mask_shapes(graph: Graph) -> dict[str, tuple[int, ...]]:
    """Shape of the fixed mask B of every linear layer (the engine's (in, out) layout)."""
    return {n.name: (n.attrs["in_features"], n.attrs["out_features"]) for n in graph.nodes if n.op == "linear"}


def compile_plan(
    graph: Graph, *, batch: int, n_parties: int, method: str | None = None, argmax: bool = False
) -> Plan:
    if batch < 1:
        raise ShapeError("batch size must be at least 1")
    f = graph.frac_bits
    method = method or default_method(n_parties)
    spec = graph.input_spec()
    shape: tuple[int, ...] = (batch, *spec.shape[1:])
    scale = f
    steps: list[Step] = []
    for node in graph.nodes:
        if node.op == "linear":
            if len(shape) != 2 or shape[1] != node.attrs["in_features"]:
                raise ShapeError(f"node {node.name!r} expects (batch, {node.attrs['in_features']}), gets {shape}")
            if scale > f:
                steps.append(Step(f"{node.name}/pre", "trunc", node.name, shape, shape, {"frac": scale - f}))
                scale = f
            out = (shape[0], node.attrs["out_features"])
            steps.append(Step(node.name, "linear", node.name, shape, out, {"scale_in": scale}))
            shape, scale = out, scale + f
        elif node.op == "relu":
            if scale > f:
                attrs = {"payload": "relu_trunc", "scale": scale, "frac": scale - f}
                steps.append(Step(node.name, "gate", node.name, shape, shape, attrs))
                scale = f
            else:
                steps.append(Step(node.name, "gate", node.name, shape, shape, {"payload": "relu", "scale": scale, "frac": 0}))
        elif node.op == "flatten":
            out = (shape[0], int(torch.tensor(shape[1:]).prod().item()) if len(shape) > 1 else 1)
            steps.append(Step(node.name, "flatten", node.name, shape, out))
            shape = out
        else:
            raise UnsupportedModelError("the model cannot run under MPC", [f"node {node.name!r}: op {node.op!r}"])
    if argmax:
        steps.append(Step("argmax", "argmax", "argmax", shape, shape, {"scale": scale}))
    return Plan(steps, batch, n_parties, method, scale, shape, argmax)


def generate_request_material(plan: Plan, builder: BundleBuilder, masks: dict[str, torch.Tensor]) -> None:
    """Dealer side: all correlated randomness one request of ``plan`` consumes."""
    for s in plan.steps:
        if s.kind == "linear":
            linear_material(builder, s.name, input_shape=s.in_shape, mask=masks[s.node], op=ring.matmul)
        elif s.kind == "trunc":
            trunc_material(builder, s.name, shape=s.in_shape, frac=s.attrs["frac"])
        elif s.kind == "gate":
            ell, cut = gate_params(s.attrs["scale"])
            gate_material(
                builder, s.name, shape=s.in_shape, ell=ell, cut=cut, payload=s.attrs["payload"],
                frac=s.attrs["frac"], method=plan.method,
            )
        elif s.kind == "argmax":
            pairs, top = argmax_material_shapes(s.in_shape[:-1], s.in_shape[-1])
            for sub, shp, sc in ((f"{s.name}/pairs", pairs, s.attrs["scale"]), (f"{s.name}/top", top, 0)):
                ell, cut = gate_params(sc)
                gate_material(builder, sub, shape=shp, ell=ell, cut=cut, payload="sign", frac=0, method=plan.method)
