"""Security review findings 2 and 4 (issue 14) through real `secureinfer party` / `dealer`
processes with mTLS on loopback.

2. A DP request id is released once: a raw InferRequest that reuses an answered id (fresh
   shares, any input) is refused with ALREADY_EXISTS on every party before any MPC, the
   budget stays as it was -- and so after the dealer restarted and after a party did.
4. A deployment id is used once: a second deploy under a known id (another name, zero
   weights: the parties would open E' = -B and anyone could compute W = E - E') is
   refused with ALREADY_EXISTS on every party, also after a Remove and after restarts;
   the dealer's re-derivation from the stored nonce keeps the model correct across a
   dealer restart, and ``replace`` gets a new id.
"""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from secureinfer import ring
from secureinfer.client.admin import list_models, remove_model
from secureinfer.client.sdk import Client, deploy
from secureinfer.dp.ledger import BudgetLedger
from secureinfer.engine.runner import encode_params
from secureinfer.graph.ir import Graph
from secureinfer.graph.torch_import import from_torch
from secureinfer.localcluster import LocalCluster
from secureinfer.prg import Prg
from secureinfer.sharing import share
from secureinfer.transport import tls
from secureinfer.transport.codec import split_chunks, tensor_to_proto
from secureinfer.v1 import common_pb2, party_pb2, party_pb2_grpc

pytestmark = pytest.mark.timeout(600)

ALREADY = grpc.StatusCode.ALREADY_EXISTS


def _each_party(c: LocalCluster, identity: str, fn: Any) -> list[Any]:
    """``fn(party_id, channel, metadata)`` on every party at once (as the SDK does);
    each result, or the ``grpc.RpcError`` that party answered with."""
    topo = c.topology
    ident = topo.identity(identity)
    md = () if topo.cluster.tls else tls.insecure_identity_metadata(ident.name, ident.role)
    chans = [tls.open_channel(p.address, settings=topo.cluster, cert=ident.cert, key=ident.key)
             for p in topo.parties]

    def one(i: int) -> Any:
        try:
            return fn(i, chans[i], md)
        except grpc.RpcError as err:
            return err

    try:
        with ThreadPoolExecutor(len(chans)) as pool:
            return list(pool.map(one, range(len(chans))))
    finally:
        for ch in chans:
            ch.close()


def _infer_raw(c: LocalCluster, name: str, x: np.ndarray, request_id: str) -> list[Any]:
    """What the SDK sends for one inference, but with a request id of our choosing."""
    f = c.topology.cluster.frac_bits
    enc = ring.encode(torch.as_tensor(x, dtype=torch.float64), frac_bits=f)
    shares = share(enc, c.topology.n_parties, prg=Prg.from_os())
    reqs = [party_pb2.InferRequest(model_name=name, request_id=request_id, outputs=["logits"],
                                   input=tensor_to_proto(s, encoding=common_pb2.ENCODING_ADDITIVE_SHARE, frac_bits=f))
            for s in shares]
    return _each_party(c, "client", lambda i, ch, md: party_pb2_grpc.InferenceStub(ch).Infer(
        reqs[i], timeout=60, metadata=md))


def _deploy_raw(c: LocalCluster, graph: Graph, name: str, deployment_id: str) -> list[Any]:
    """What the SDK's deploy sends, but under a deployment id of our choosing."""
    n = c.topology.n_parties
    per_party = [party_pb2.WeightShares() for _ in range(n)]
    prg = Prg.from_os()
    for pname, value in encode_params(graph).items():
        for i, s in enumerate(share(value, n, prg=prg)):
            per_party[i].tensors.add(name=pname, tensor=tensor_to_proto(
                s, encoding=common_pb2.ENCODING_ADDITIVE_SHARE, frac_bits=graph.frac_bits))

    def send(i: int, ch: grpc.Channel, md: Any) -> party_pb2.DeployResponse:
        data = per_party[i].SerializeToString()
        header = party_pb2.DeployHeader(name=name, deployment_id=deployment_id, graph=graph.public_json(),
                                        total_bytes=len(data))
        msgs = [party_pb2.DeployChunk(header=header)]
        msgs += [party_pb2.DeployChunk(data=p) for p in split_chunks(data, c.topology.cluster.chunk_bytes)]
        return party_pb2_grpc.ModelAdminStub(ch).Deploy(iter(msgs), timeout=60, metadata=md)

    return _each_party(c, "owner", send)


def _assert_refused_everywhere(results: list[Any], text: str) -> None:
    for i, r in enumerate(results):
        assert isinstance(r, grpc.RpcError), f"party {i} accepted: {r}"
        assert r.code() == ALREADY, f"party {i}: {r.code()} {r.details()}"
        assert text in r.details(), r.details()


def _restart_dealer(c: LocalCluster) -> None:
    c.kill("dealer")
    c._spawn("dealer", ["dealer"])  # same topology, same master key file
    c.wait_ready()


def _ledger_state(c: LocalCluster, key: str) -> list[tuple[float, list[str]]]:
    out = []
    for p in c.topology.parties:
        with BudgetLedger(Path(p.data_dir) / "dp-ledger.db", default_budget=None) as led:
            out.append((led.spent(key), [r for r, _, _ in led.debits(key)]))
    return out


def test_a_replayed_dp_request_id_is_refused_on_every_party_durably(tmp_path: Path) -> None:
    torch.manual_seed(0)  # test weights, not secret
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.rand(1, 8)
    params = {"dp.epsilon": "2", "dp.delta": "1e-6", "dp.clip": "4", "dp.budget_epsilon": "20",
              "dp.budget_delta": "1e-4"}
    with LocalCluster(tmp_path, request_timeout_s=20.0, rpc_timeout_s=5.0) as c:
        deploy(model, x, name="dpm", config=c.config_path, parameters=params)
        rid = uuid.uuid4().hex
        first = _infer_raw(c, "dpm", x.numpy(), rid)
        assert all(isinstance(r, party_pb2.InferResponse) for r in first), first
        paid = _ledger_state(c, "client/dpm")
        assert all(spent > 0 and ids == [rid] for spent, ids in paid)

        def replay_is_refused() -> None:
            for inp in (x.numpy(), np.zeros((1, 8))):  # same or any other input, fresh shares
                _assert_refused_everywhere(_infer_raw(c, "dpm", inp, rid), "was already used; use a fresh id")
            assert _ledger_state(c, "client/dpm") == paid  # nothing charged, nothing released

        replay_is_refused()
        _restart_dealer(c)  # the dealer's session bindings are gone
        replay_is_refused()
        c.kill("party1")
        c.start_party(1)
        replay_is_refused()
        for p in (0, 1):  # refused before any computation: no session was started for it
            assert "was already used" in c.log_text(f"party{p}")
        with Client(c.config_path) as cl:  # a fresh id is served (after both restarts)
            cl.infer("dpm", x.numpy())
            assert float(cl.last_info["dp.epsilon_spent"]) > paid[0][0]


def _mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)  # test weights, not secret
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4)).eval()


def _check(c: LocalCluster, name: str, model: nn.Module, x: torch.Tensor) -> None:
    with Client(c.config_path) as cl:
        y = cl.infer(name, x.numpy())
    with torch.no_grad():
        ref = model(x).double().numpy()
    assert np.abs(y - ref).max() <= 1e-2


def test_a_deployment_id_is_used_once_and_masks_survive_restarts(tmp_path: Path) -> None:
    x = torch.rand(4, 8)
    victim = _mlp(1)
    attacker = _mlp(2)
    with torch.no_grad():
        for prm in attacker.parameters():
            prm.zero_()  # W' = 0: the parties would open E' = W' - B = -B
    g_victim, g_attacker = from_torch(victim, x[:1]), from_torch(attacker, x[:1])
    with LocalCluster(tmp_path, request_timeout_s=20.0, rpc_timeout_s=5.0) as c:
        dep = uuid.uuid4().hex
        ok = _deploy_raw(c, g_victim, "a", dep)
        assert all(isinstance(r, party_pb2.DeployResponse) for r in ok), ok
        _check(c, "a", victim, x)
        # the id is public (ListModels / ModelMetadata): a second owner deploys under it
        assert [m["deployment_id"] for m in list_models(c.config_path) if m["name"] == "a"] == [dep]
        _assert_refused_everywhere(_deploy_raw(c, g_attacker, "evil", dep), "already used")
        assert "evil" not in {m["name"] for m in list_models(c.config_path)}
        # dealer restart: the parties re-register with the stored nonce and get the same masks
        _restart_dealer(c)
        _check(c, "a", victim, x)
        _assert_refused_everywhere(_deploy_raw(c, g_attacker, "evil", dep), "already used")
        # party restart: the model is loaded from disk, the id is still known
        c.kill("party0")
        c.start_party(0)
        _check(c, "a", victim, x)
        _assert_refused_everywhere(_deploy_raw(c, g_attacker, "evil", dep), "already used")
        # replace (SDK): a new deployment id, new masks, served correctly
        replacement = _mlp(3)
        r = deploy(replacement, x[:1], name="a", config=c.config_path, replace=True)
        assert r.deployment_id != dep
        _check(c, "a", replacement, x)
        # Remove, then a redeploy under either used id is refused
        remove_model(c.config_path, "a")
        _assert_refused_everywhere(_deploy_raw(c, g_attacker, "a", dep), "already used")
        _assert_refused_everywhere(_deploy_raw(c, g_attacker, "a", r.deployment_id), "already used")
        assert list_models(c.config_path) == []
        fresh = _deploy_raw(c, g_victim, "a", uuid.uuid4().hex)  # a fresh id works
        assert all(isinstance(r, party_pb2.DeployResponse) for r in fresh), fresh
        _check(c, "a", victim, x)
