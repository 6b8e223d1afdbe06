"""One party's execution of a compiled plan on secret shares.

:class:`PartyModel` is a party's deployed state: its weight and bias shares, its share of
each layer's fixed mask ``B`` and the opened ``E = W - B``, with the ring operands
prepared once for fast exact products. :func:`run_plan` walks the plan's steps, calling
the protocols of :mod:`secureinfer.protocols` with the request's dealer bundle.
:func:`open_masks` is the one deployment-time round that opens every ``E``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from secureinfer import ring
from secureinfer.dealer.material import PartyBundle
from secureinfer.engine.plan import Plan, model_mask_shapes
from secureinfer.errors import ProtocolError
from secureinfer.graph.ir import Graph
from secureinfer.protocols.arith import linear_fixed, truncate
from secureinfer.protocols.compare import argmax_onehot, gate
from secureinfer.protocols.session import Session

__all__ = ["PartyModel", "encode_params", "open_masks", "run_plan"]


def encode_params(graph: Graph) -> dict[str, torch.Tensor]:
    """Owner side: plaintext parameters -> ring tensors in the engine's layout.

    Linear weights are stored transposed, (in, out), with ``f`` fractional bits; biases
    with ``2f`` (they are added to the product of an ``f``-bit input and ``f``-bit weight).
    """
    f = graph.frac_bits
    out: dict[str, torch.Tensor] = {}
    bound = 2.0 ** (31 - f)
    for n in graph.nodes:
        if n.op != "linear":
            continue
        w = torch.as_tensor(graph.params[n.attrs["weight"]], dtype=torch.float64)
        out[n.attrs["weight"]] = ring.encode(w.t().contiguous(), frac_bits=f, max_abs=bound)
        if n.attrs.get("bias"):
            b = torch.as_tensor(graph.params[n.attrs["bias"]], dtype=torch.float64)
            out[n.attrs["bias"]] = ring.encode(b, frac_bits=2 * f, max_abs=bound)
    return out


@dataclass
class LinearState:
    public_diff: object  # prepared E = W - B (public to the parties)
    local: object  # prepared [B] (+ E at party 0)
    bias: torch.Tensor | None
    E: torch.Tensor


class PartyModel:
    """A party's deployed model: graph, shares and prepared fixed-mask operands."""

    def __init__(
        self, graph: Graph, *, party_id: int, shares: dict[str, torch.Tensor],
        masks: dict[str, torch.Tensor], diffs: dict[str, torch.Tensor],
    ) -> None:
        self.graph = graph
        self.party_id = party_id
        self.layers: dict[str, LinearState] = {}
        for n in graph.nodes:
            if n.op != "linear":
                continue
            e = diffs[n.name]
            local = masks[n.name] + e if party_id == 0 else masks[n.name]
            bias = shares.get(n.attrs["bias"]) if n.attrs.get("bias") else None
            self.layers[n.name] = LinearState(ring.prepare(e), ring.prepare(local), bias, e)


def open_masks(
    session: Session, graph: Graph, shares: dict[str, torch.Tensor], model_bundle: PartyBundle
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Deployment round: open ``E = W - B`` of every linear layer. Returns (masks, diffs).

    Cost: 1 round; 8 bytes per weight per peer, once per deployment.
    """
    shapes = model_mask_shapes(graph)
    names = list(shapes)
    masks = {n: model_bundle.share(f"{n}/B", shapes[n]) for n in names}
    weights = {}
    for n in graph.nodes:
        if n.op == "linear":
            w = shares[n.attrs["weight"]]
            if tuple(w.shape) != shapes[n.name]:
                raise ProtocolError(f"weight share of {n.name!r} has shape {tuple(w.shape)}")
            weights[n.name] = w
    opened = session.open([weights[n] - masks[n] for n in names]) if names else []
    return masks, dict(zip(names, opened))


def run_plan(
    session: Session, plan: Plan, model: PartyModel, bundle: PartyBundle, x: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Evaluate ``plan`` on input share ``x``; returns output shares by name."""
    pid = session.party_id
    out: dict[str, torch.Tensor] = {}
    for s in plan.steps:
        if s.kind == "linear":
            st = model.layers[s.node]
            x = linear_fixed(
                session, x, bundle=bundle, name=s.name, public_mask_diff=st.public_diff,
                local_operand=st.local, op=ring.matmul, out_shape=s.out_shape,
            )
            if st.bias is not None:
                x = x + st.bias
        elif s.kind == "trunc":
            x = truncate(session, x, bundle=bundle, name=s.name, frac=s.attrs["frac"])
        elif s.kind == "gate":
            x = gate(
                session, x, bundle=bundle, name=s.name, payload=s.attrs["payload"],
                scale=s.attrs["scale"], frac=s.attrs["frac"], method=plan.method,
            )
        elif s.kind == "flatten":
            x = x.reshape(s.out_shape)
        elif s.kind == "argmax":
            out["logits"] = x
            out["argmax"] = argmax_onehot(
                session, x, bundle=bundle, name=s.name, scale=s.attrs["scale"], method=plan.method
            )
            return out
        else:
            raise ProtocolError(f"unknown step kind {s.kind!r}")
    del pid
    out["logits"] = x
    return out
