"""gRPC servicers of a compute party: ``Inference`` and ``ModelAdmin``.

Thin adapters: each RPC checks the caller's role (from its mTLS certificate), parses the
request and calls :class:`~secureinfer.party.server.PartyServer`, which owns models,
material and protocols. :func:`_guard` turns a :class:`SecureInferError` into its gRPC
status and any other exception into INTERNAL without internals in the message.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import grpc

from secureinfer.config import ROLE_AUDITOR, ROLE_CLIENT, ROLE_OWNER
from secureinfer.errors import InvalidArgumentError, SecureInferError
from secureinfer.transport import tls
from secureinfer.v1 import common_pb2, party_pb2, party_pb2_grpc

if TYPE_CHECKING:
    from secureinfer.party.server import PartyServer

__all__ = ["AdminService", "InferenceService"]

#: largest model a deploy stream may carry
MAX_DEPLOY_BYTES = 1 << 31


def _guard(server: PartyServer, ctx: grpc.ServicerContext, what: str, fn: Any) -> Any:
    try:
        return fn()
    except SecureInferError as exc:
        server.log.warning(f"{what}_failed", code=exc.grpc_code, error=str(exc))
        tls.abort_with(ctx, exc)
    except Exception as exc:  # a bug: say so without leaking internals
        server.log.error(f"{what}_crashed", error=repr(exc))
        ctx.abort(grpc.StatusCode.INTERNAL, f"party {server.party_id}: internal error in {what}")


class InferenceService(party_pb2_grpc.InferenceServicer):
    def __init__(self, s: PartyServer) -> None:
        self.s = s

    def _auth(self, ctx: grpc.ServicerContext, *roles: str) -> None:
        tls.require_role(ctx, *roles, insecure_metadata=self.s._insecure)

    def ServerLive(self, request: Any, ctx: grpc.ServicerContext) -> common_pb2.ServerLiveResponse:
        return common_pb2.ServerLiveResponse(live=True)

    def ServerReady(self, request: Any, ctx: grpc.ServicerContext) -> common_pb2.ServerReadyResponse:
        ok, reason = self.s.ready()
        return common_pb2.ServerReadyResponse(ready=ok, reason=reason)

    def ModelMetadata(self, request: Any, ctx: grpc.ServicerContext) -> common_pb2.ModelMetadataResponse:
        def run() -> common_pb2.ModelMetadataResponse:
            self._auth(ctx, ROLE_CLIENT, ROLE_OWNER, ROLE_AUDITOR)
            lm = self.s.model(request.name, request.version)
            g = lm.graph
            plan = lm.plan(1, lm.default_purpose, self.s.n)
            resp = common_pb2.ModelMetadataResponse(
                name=lm.record.name, versions=self.s.store.versions(lm.record.name), platform="secureinfer-mpc",
            )
            resp.inputs.add(name=g.input_spec().name, datatype=common_pb2.DTYPE_FLOAT64, shape=list(g.input_spec().shape))
            resp.outputs.add(name="logits", datatype=common_pb2.DTYPE_FLOAT64, shape=list((-1, *plan.output_shape[1:])))
            resp.parameters.update({
                "version": lm.record.version, "frac_bits": str(g.frac_bits), "n_parties": str(self.s.n),
                "input_encoding": "additive shares over Z_2^64, INT64, frac_bits as above",
                "comparison": plan.method, "rounds_batch1": str(plan.rounds()),
                "output_frac_bits": str(plan.output_scale), "deployment_id": lm.record.deployment_id,
                "security": "semi-honest; any n-1 of n parties may collude; the dealer does not collude",
            })
            if lm.dp is not None:
                resp.parameters.update(lm.dp.describe())
            return resp

        return _guard(self.s, ctx, "metadata", run)

    def Infer(self, request: party_pb2.InferRequest, ctx: grpc.ServicerContext) -> party_pb2.InferResponse:
        def run() -> party_pb2.InferResponse:
            left = ctx.time_remaining()
            budget = self.s.settings.request_timeout_s if left is None else min(left, self.s.settings.request_timeout_s)
            ident = tls.require_role(ctx, ROLE_CLIENT, insecure_metadata=self.s._insecure)
            return self.s.infer(request, time.monotonic() + budget, client=ident.name)

        return _guard(self.s, ctx, "infer", run)


class AdminService(party_pb2_grpc.ModelAdminServicer):
    def __init__(self, s: PartyServer) -> None:
        self.s = s

    def Deploy(self, request_iterator: Any, ctx: grpc.ServicerContext) -> party_pb2.DeployResponse:
        def run() -> party_pb2.DeployResponse:
            tls.require_role(ctx, ROLE_OWNER, insecure_metadata=self.s._insecure)
            header = None
            buf = bytearray()
            for chunk in request_iterator:
                if chunk.HasField("header"):
                    if header is not None:
                        raise InvalidArgumentError("deploy stream has two headers")
                    header = chunk.header
                    if header.total_bytes > MAX_DEPLOY_BYTES:
                        raise InvalidArgumentError(f"model of {header.total_bytes} bytes exceeds {MAX_DEPLOY_BYTES}")
                else:
                    if header is None:
                        raise InvalidArgumentError("deploy stream must start with a header")
                    buf += chunk.data
                    if len(buf) > header.total_bytes:
                        raise InvalidArgumentError("deploy stream longer than its header announced")
            if header is None or len(buf) != header.total_bytes:
                raise InvalidArgumentError("deploy stream ended early")
            return self.s.deploy(header, bytes(buf))

        return _guard(self.s, ctx, "deploy", run)

    def Audit(self, request: party_pb2.AuditRequest, ctx: grpc.ServicerContext) -> party_pb2.AuditResponse:
        def run() -> party_pb2.AuditResponse:
            ident = tls.require_role(ctx, ROLE_AUDITOR, insecure_metadata=self.s._insecure)
            return self.s.audit(request, auditor=ident.name)

        return _guard(self.s, ctx, "audit", run)

    def Remove(self, request: party_pb2.RemoveRequest, ctx: grpc.ServicerContext) -> party_pb2.RemoveResponse:
        def run() -> party_pb2.RemoveResponse:
            tls.require_role(ctx, ROLE_OWNER, insecure_metadata=self.s._insecure)
            self.s.remove(request.name, request.version)
            return party_pb2.RemoveResponse()

        return _guard(self.s, ctx, "remove", run)

    def ListModels(self, request: Any, ctx: grpc.ServicerContext) -> party_pb2.ListModelsResponse:
        def run() -> party_pb2.ListModelsResponse:
            tls.require_role(ctx, ROLE_OWNER, ROLE_CLIENT, ROLE_AUDITOR, insecure_metadata=self.s._insecure)
            resp = party_pb2.ListModelsResponse()
            with self.s._lock:
                for (name, version), lm in sorted(self.s._models.items()):
                    resp.models.add(name=name, version=version, deployment_id=lm.record.deployment_id,
                                    created=lm.record.created)
            return resp

        return _guard(self.s, ctx, "list", run)
