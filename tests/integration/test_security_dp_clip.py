"""Security review finding 3 (issue 14) through real `secureinfer party` / `dealer`
processes with mTLS on loopback.

The DP clip gated on ``x - C`` over only ``f + 15`` bits, so a client that chose its input
shares could drive a logit to 65539.25 and have it released unclipped (plus noise): the
sensitivity was no longer 2C and the epsilon guarantee was void. Parties cannot range-check
shares, so the clip now gates over the whole ring. The attack here sends raw InferRequests
whose shares encode values the SDK would refuse to encode -- 65539.25, its negation, values
near 2^47 and uniformly random ring elements -- through a model whose logits are +-x, and
checks every released logit lies in [-C, C] + noise.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import pytest
import torch
from torch import nn

from secureinfer import ring
from secureinfer.client.sdk import Client, deploy
from secureinfer.localcluster import LocalCluster
from secureinfer.prg import Prg
from secureinfer.sharing import reconstruct, share
from secureinfer.transport.codec import share_from_proto, tensor_to_proto
from secureinfer.v1 import common_pb2, party_pb2, party_pb2_grpc

from .test_security_replay_seeds import _each_party

pytestmark = pytest.mark.timeout(600)

CLIP = 8.0


def _infer_ring(c: LocalCluster, name: str, enc: torch.Tensor) -> torch.Tensor:
    """One InferRequest whose input shares reconstruct to the ring elements ``enc``
    (no encoding range check: what a hostile client can send); the reconstructed logits."""
    f = c.topology.cluster.frac_bits
    shares = share(enc, c.topology.n_parties, prg=Prg.from_os())
    rid = uuid.uuid4().hex
    reqs = [party_pb2.InferRequest(model_name=name, request_id=rid, outputs=["logits"],
                                   input=tensor_to_proto(s, encoding=common_pb2.ENCODING_ADDITIVE_SHARE, frac_bits=f))
            for s in shares]
    resps = _each_party(c, "client", lambda i, ch, md: party_pb2_grpc.InferenceStub(ch).Infer(
        reqs[i], timeout=60, metadata=md))
    assert all(isinstance(r, party_pb2.InferResponse) for r in resps), resps
    parts = [share_from_proto(next(t for t in r.outputs if t.name == "logits").tensor) for r in resps]
    frac = next(t for t in resps[0].outputs if t.name == "logits").tensor.frac_bits
    return ring.decode(reconstruct(parts), frac_bits=int(frac))


def test_released_logits_stay_in_the_clip_bound_for_adversarial_inputs(tmp_path: Path) -> None:
    model = nn.Linear(1, 2)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0], [-1.0]]))  # logits (x, -x)
        model.bias.zero_()
    x0 = torch.tensor([[0.5]])
    params = {"dp.epsilon": "50", "dp.delta": "1e-6", "dp.clip": f"{CLIP:g}", "dp.budget_epsilon": "1e6",
              "dp.budget_delta": "0.5"}
    with LocalCluster(tmp_path, request_timeout_s=30.0, rpc_timeout_s=10.0) as c:
        deploy(model, x0, name="dpc", config=c.config_path, parameters=params)
        with Client(c.config_path) as cl:
            mu = float(cl.metadata("dpc").parameters["dp.noise_mu"])
            honest = cl.infer("dpc", x0.numpy())  # the SDK path still works
        f = c.topology.cluster.frac_bits
        sd = math.sqrt(mu) / 2**f  # Skellam(mu) on the 2^-f grid: variance mu
        slack = 10 * sd + 2.0**-f * 4  # ten standard deviations plus rounding
        assert abs(float(honest[0, 0]) - 0.5) <= slack and abs(float(honest[0, 1]) + 0.5) <= slack

        reals = [65539.25, -65539.25, 20000.0, 2.0**30, -(2.0**30), 2.0**40]
        hostile = torch.tensor([[round(v * 2**f)] for v in reals], dtype=torch.int64)
        y = _infer_ring(c, "dpc", hostile)
        assert float(y.abs().max()) <= CLIP + slack, y  # was 65539.25 before the fix
        assert float(y[0, 0]) == pytest.approx(CLIP, abs=slack) and float(y[0, 1]) == pytest.approx(-CLIP, abs=slack)

        rand = Prg.from_os().ring(64).reshape(64, 1)  # uniform 64-bit inputs: logits anywhere
        y = _infer_ring(c, "dpc", rand)
        assert float(y.abs().max()) <= CLIP + slack, y
