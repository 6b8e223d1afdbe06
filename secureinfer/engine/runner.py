"""One party's execution of a compiled plan on secret shares.

:class:`PartyModel` is a party's deployed state: its parameter shares and, for every
fixed-weight operand, its share of the mask ``B`` and the opened ``E = W - B``, prepared
once for fast exact products. :func:`run_plan` walks the plan's steps through the op
registry. :func:`open_masks` is the one deployment-time round that opens every ``E``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from secureinfer.dealer.material import PartyBundle
from secureinfer.engine.ops import OPS, FixedOperand
from secureinfer.engine.plan import Plan, fixed_operand_shapes
from secureinfer.errors import ProtocolError
from secureinfer.graph.ir import Graph
from secureinfer.protocols.session import Session

__all__ = ["PartyModel", "encode_params", "open_masks", "precompute", "run_plan"]


def encode_params(graph: Graph) -> dict[str, torch.Tensor]:
    """Owner side: plaintext parameters -> ring tensors in the engine's layout."""
    out: dict[str, torch.Tensor] = {}
    for n in graph.nodes:
        op = OPS.get(n.op)
        if op is not None:
            out.update(op.encode(n, graph.params, graph.frac_bits))
    return out


class PartyModel:
    """A party's deployed model: graph, shares and prepared fixed-mask operands."""

    def __init__(self, graph: Graph, *, party_id: int, shares: dict[str, torch.Tensor],
                 masks: dict[str, torch.Tensor], diffs: dict[str, torch.Tensor]) -> None:
        self.graph = graph
        self.party_id = party_id
        self.shares = shares
        self.fixed: dict[str, dict[str, FixedOperand]] = {}
        for n in graph.nodes:
            op = OPS.get(n.op)
            if op is None:
                continue
            for attr in op.fixed:
                key = f"{n.name}/{attr}"
                if key not in diffs:
                    continue
                e = diffs[key]
                local = masks[key] + e if party_id == 0 else masks[key]
                self.fixed.setdefault(n.name, {})[attr] = FixedOperand(
                    op.prepare(n, attr, e), op.prepare(n, attr, local), e, local)


def _fixed_values(graph: Graph, shares: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    out = {}
    for n in graph.nodes:
        op = OPS.get(n.op)
        for attr in op.fixed if op else ():
            out[f"{n.name}/{attr}"] = shares[n.attrs[attr]]
    return out


def open_masks(session: Session, graph: Graph, shares: dict[str, torch.Tensor],
               model_bundle: PartyBundle) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Deployment round: open ``E = W - B`` of every fixed operand. Returns (masks, diffs).

    Cost: 1 round; 8 bytes per weight per peer, once per deployment.
    """
    shapes = fixed_operand_shapes(graph)
    weights = _fixed_values(graph, shares)
    names = list(shapes)
    masks = {k: model_bundle.share(f"{k}/B", shapes[k]) for k in names}
    for k in names:
        if tuple(weights[k].shape) != shapes[k]:
            raise ProtocolError(f"weight share {k!r} has shape {tuple(weights[k].shape)}, expected {shapes[k]}")
    opened = session.open([weights[k] - masks[k] for k in names]) if names else []
    return masks, dict(zip(names, opened))


def run_plan(session: Session, plan: Plan, model: PartyModel, bundle: PartyBundle,
             x: torch.Tensor) -> dict[str, torch.Tensor]:
    """Evaluate ``plan`` on input share ``x``; returns output shares by output name."""
    env: dict[str, torch.Tensor] = {model.graph.input_spec().name: x}
    for s in plan.steps:
        op = OPS[s.node.op]
        xs = [env[i] for i in s.inputs]
        env[s.name] = op.run(session, bundle, s.name, s.node, xs, s.ins, s.out, plan.ctx,
                             model.fixed.get(s.node.name, {}), model.shares)
    return {k: env[v] for k, v in plan.outputs.items()}


def precompute(plan: Plan, model: PartyModel, bundle: PartyBundle, *,
               pause: Callable[[], None] | None = None) -> None:
    """Ahead of a request: every input-independent partial result the plan allows.

    ``pause`` is called before each step's work (a party's background thread passes one
    that waits while a request is in flight, so precomputation yields to requests)."""
    for s in plan.steps:
        op = OPS[s.node.op]
        pre = getattr(op, "precompute", None)
        if pre is not None and s.node.name in model.fixed:
            if pause is not None:
                pause()
            pre(bundle, s.name, s.node, s.ins, s.out, model.fixed[s.node.name])
