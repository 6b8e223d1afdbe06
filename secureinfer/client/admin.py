"""Owner/operator calls: list and remove deployed models."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from secureinfer.client.sdk import _Cluster
from secureinfer.config import Topology
from secureinfer.v1 import party_pb2, party_pb2_grpc

__all__ = ["list_models", "remove_model"]


def list_models(config: str | Path | Topology, *, identity: str = "client") -> list[dict[str, Any]]:
    c = _Cluster(config, identity)
    try:
        t = c.topology.cluster.rpc_timeout_s
        resp = c.call_all(lambda i, ch: party_pb2_grpc.ModelAdminStub(ch).ListModels(
            party_pb2.ListModelsRequest(), timeout=t, metadata=c.metadata))[0]
        return [{"name": m.name, "version": m.version, "deployment_id": m.deployment_id, "created": m.created}
                for m in resp.models]
    finally:
        c.close()


def remove_model(config: str | Path | Topology, name: str, *, version: str = "", identity: str = "owner") -> None:
    c = _Cluster(config, identity)
    try:
        t = c.topology.cluster.rpc_timeout_s
        c.call_all(lambda i, ch: party_pb2_grpc.ModelAdminStub(ch).Remove(
            party_pb2.RemoveRequest(name=name, version=version), timeout=t, metadata=c.metadata))
    finally:
        c.close()
