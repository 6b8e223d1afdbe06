"""Compile a public :class:`~secureinfer.graph.Graph` into protocol steps.

The plan is a pure function of public data (graph, batch size, number of parties,
comparison method), so the parties and the dealer derive the *same* steps and the dealer
can generate a request's correlated randomness ahead of the request.

Scales: a linear layer's output has ``2f`` fractional bits. Truncation back to ``f`` is
*fused* into a following ReLU (one gate does both) and otherwise inserted as a separate
step only where an op needs a smaller scale (``SecureOp.max_in_scale``). The model's
final output is never truncated in MPC: the client divides by ``2^scale`` after
reconstruction, which is exact and free.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from secureinfer.dealer.material import BundleBuilder
from secureinfer.engine.ops import OPS, Ctx, ValueSpec
from secureinfer.errors import ShapeError, UnsupportedModelError
from secureinfer.graph.ir import Graph, Node
from secureinfer.graph.passes import pool_before_relu
from secureinfer.protocols.compare import default_method

__all__ = ["Plan", "Step", "compile_plan", "fixed_operand_shapes", "generate_request_material"]


@dataclass(frozen=True)
class Step:
    name: str  # unique: namespace of the step's dealer material
    node: Node
    inputs: tuple[str, ...]  # value names
    ins: tuple[ValueSpec, ...]
    out: ValueSpec


@dataclass(frozen=True)
class Plan:
    steps: list[Step]
    batch: int
    ctx: Ctx
    outputs: dict[str, str]  # output name -> value name
    specs: dict[str, ValueSpec]

    @property
    def method(self) -> str:
        return self.ctx.method

    @property
    def output_scale(self) -> int:
        return self.specs[self.outputs["logits"]].scale

    @property
    def output_shape(self) -> tuple[int, ...]:
        return self.specs[self.outputs["logits"]].shape

    def rounds(self) -> int:
        """Online rounds of the plan (steps run one after another)."""
        return sum(OPS[s.node.op].rounds(s.node, s.ins, self.ctx) for s in self.steps)

    def per_step(self) -> list[dict[str, object]]:
        return [
            {"step": s.name, "op": s.node.op, "in": [list(i.shape) for i in s.ins], "out": list(s.out.shape),
             "scale": s.out.scale, "rounds": OPS[s.node.op].rounds(s.node, s.ins, self.ctx)}
            for s in self.steps
        ]


def fixed_operand_shapes(graph: Graph) -> dict[str, tuple[int, ...]]:
    """Shape of every fixed-weight mask B, keyed ``"<node>/<param attr>"``."""
    out: dict[str, tuple[int, ...]] = {}
    for n in graph.nodes:
        op = OPS.get(n.op)
        if op is not None:
            for attr, shape in op.masks(n, graph.param_shapes).items():
                out[f"{n.name}/{attr}"] = shape
    return out


def compile_plan(
    graph: Graph, *, batch: int, n_parties: int, method: str | None = None, argmax: bool = False,
    dp_clip: float | None = None,
) -> Plan:
    """Steps of one request. ``argmax`` adds the secure argmax output; ``dp_clip`` ends the
    logits with a truncation to ``f`` bits and a clip to [-dp_clip, dp_clip] (the DP
    release; the bound does not change the dealer material, only the public constant)."""
    if batch < 1:
        raise ShapeError("batch size must be at least 1")
    ctx = Ctx(f=graph.frac_bits, n_parties=n_parties, method=method or default_method(n_parties))
    spec = graph.input_spec()
    specs: dict[str, ValueSpec] = {spec.name: ValueSpec((batch, *spec.shape[1:]), ctx.f)}
    steps: list[Step] = []
    missing = [f"node {n.name!r}: op {n.op!r}" for n in graph.nodes if n.op not in OPS]
    if missing:
        raise UnsupportedModelError("the model cannot run under MPC", missing)
    # maxpool(relu(x)) -> relu(maxpool(x)): the ReLU gate (fused with truncation) runs on
    # k^2 times fewer elements, and the max gates on untruncated values cost no more rounds
    for node in pool_before_relu(graph).nodes:
        op = OPS[node.op]
        inputs = list(node.inputs)
        limit = op.max_in_scale(node, ctx)
        if limit is not None:
            for k, vin in enumerate(inputs):
                if specs[vin].scale > limit:
                    tname = f"{node.name}/pre{k}"
                    tnode = Node(tname, "trunc", (vin,), {"frac": specs[vin].scale - limit})
                    tin = (specs[vin],)
                    specs[tname] = OPS["trunc"].infer(tnode, tin, ctx)
                    steps.append(Step(tname, tnode, (vin,), tin, specs[tname]))
                    inputs[k] = tname
        ins = tuple(specs[i] for i in inputs)
        out = op.infer(node, ins, ctx)
        specs[node.name] = out
        steps.append(Step(node.name, node, tuple(inputs), ins, out))
    outputs = {"logits": graph.outputs[0]}
    if dp_clip is not None:
        last = graph.outputs[0]
        if specs[last].scale > ctx.f:
            tnode = Node("dp/trunc", "trunc", (last,), {"frac": specs[last].scale - ctx.f})
            specs["dp/trunc"] = OPS["trunc"].infer(tnode, (specs[last],), ctx)
            steps.append(Step("dp/trunc", tnode, (last,), (specs[last],), specs["dp/trunc"]))
            last = "dp/trunc"
        cnode = Node("dp/clip", "clip", (last,), {"bound": float(dp_clip)})
        specs["dp/clip"] = OPS["clip"].infer(cnode, (specs[last],), ctx)
        steps.append(Step("dp/clip", cnode, (last,), (specs[last],), specs["dp/clip"]))
        outputs["logits"] = "dp/clip"
    if argmax:  # over the label scores (outputs[1]) where the graph has them
        last = graph.outputs[-1] if graph.labels is not None else graph.outputs[0]
        anode = Node("argmax", "argmax", (last,))
        ains = (specs[last],)
        specs["argmax"] = OPS["argmax"].infer(anode, ains, ctx)
        steps.append(Step("argmax", anode, (last,), ains, specs["argmax"]))
        outputs["argmax"] = "argmax"
        if graph.labels is not None:  # "argmax/label": inside the planner's argmax namespace
            lnode = Node("argmax/label", "class_label", ("argmax",), {"labels": list(graph.labels)})
            lins = (specs["argmax"],)
            specs[lnode.name] = OPS["class_label"].infer(lnode, lins, ctx)
            steps.append(Step(lnode.name, lnode, ("argmax",), lins, specs[lnode.name]))
            outputs["label"] = lnode.name
    return Plan(steps, batch, ctx, outputs, specs)


def generate_request_material(plan: Plan, builder: BundleBuilder, masks: dict[str, torch.Tensor]) -> None:
    """Dealer side: all correlated randomness one request of ``plan`` consumes."""
    for s in plan.steps:
        op = OPS[s.node.op]
        mine = {attr: masks[f"{s.node.name}/{attr}"] for attr in op.fixed if f"{s.node.name}/{attr}" in masks}
        op.material(builder, s.name, s.node, s.ins, s.out, plan.ctx, mine)
