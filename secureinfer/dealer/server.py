"""The dealer process (``secureinfer dealer --config FILE``).

Serves correlated randomness to the compute parties (role ``party`` only; a party may
register and fetch only under its own id) over mTLS gRPC. It never receives an input, a
weight or an output: only public graphs, deployment ids and session ids.

The dealer's master key (``<dealer key>.master``, 32 bytes, mode 0600, created on first
start) and a random per-deployment nonce derive the model seeds, so a restarted dealer
serves existing deployments again after the parties re-register with the nonce they
stored (which they do by themselves).
"""

from __future__ import annotations

import os
import signal
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from secureinfer.config import ROLE_OWNER, ROLE_PARTY, Topology
from secureinfer.dealer.core import DealerCore
from secureinfer.errors import PermissionDeniedError, SecureInferError
from secureinfer.log import Logger
from secureinfer.prg import fresh_seed
from secureinfer.sched import freeze_heap
from secureinfer.transport import tls
from secureinfer.transport.codec import split_chunks
from secureinfer.v1 import common_pb2, dealer_pb2, dealer_pb2_grpc

__all__ = ["DealerServer", "master_key_path", "serve"]


def master_key_path(topology: Topology) -> Path:
    base = topology.dealer.key or (topology.base_dir / "dealer.key")
    return Path(str(base) + ".master")


def load_master_key(path: Path) -> bytes:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(fresh_seed())
    key = path.read_bytes()
    if len(key) != 32:
        raise SecureInferError(f"dealer master key {path} must hold 32 bytes")
    return key


class _Servicer(dealer_pb2_grpc.DealerServicer):
    def __init__(self, server: "DealerServer") -> None:
        self.s = server

    def _party(self, ctx: grpc.ServicerContext, claimed: int) -> None:
        ident = tls.require_role(ctx, ROLE_PARTY, insecure_metadata=not self.s.settings.tls)
        if ident.party_id != claimed:
            raise PermissionDeniedError(f"{ident.name} may not act as party {claimed}")

    def _guard(self, ctx: grpc.ServicerContext, what: str, fn: Any) -> Any:
        try:
            return fn()
        except SecureInferError as exc:
            self.s.log.warning(f"{what}_failed", code=exc.grpc_code, error=str(exc))
            tls.abort_with(ctx, exc)
        except Exception as exc:
            self.s.log.error(f"{what}_crashed", error=repr(exc))
            ctx.abort(grpc.StatusCode.INTERNAL, f"dealer: internal error in {what}")

    def ServerLive(self, request: Any, ctx: grpc.ServicerContext) -> common_pb2.ServerLiveResponse:
        return common_pb2.ServerLiveResponse(live=True)

    def RegisterModel(self, req: dealer_pb2.RegisterModelRequest, ctx: grpc.ServicerContext) -> Any:
        def run() -> dealer_pb2.RegisterModelResponse:
            self._party(ctx, req.party_id)
            # first registration (no nonce): fresh nonce, once per party; re-registration: the stored nonce
            reg = self.s.core.register(req.deployment_id, req.graph, party_id=req.party_id,
                                       n_parties=req.n_parties, nonce=req.nonce)
            self.s.log.info("registered", deployment=req.deployment_id, party=req.party_id,
                            reregistration=bool(req.nonce))  # never the seed or the nonce
            return dealer_pb2.RegisterModelResponse(graph_sha256=bytes.fromhex(reg.digest), model_seed=reg.seed,
                                                    nonce=reg.nonce)

        return self._guard(ctx, "register", run)

    def _chunks(self, set_id: str, data: bytes) -> list[dealer_pb2.MaterialChunk]:
        parts = split_chunks(data, self.s.settings.chunk_bytes)
        return [dealer_pb2.MaterialChunk(chunk_index=i, chunk_count=len(parts), data=p, set_id=set_id)
                for i, p in enumerate(parts)]

    def Fetch(self, req: dealer_pb2.FetchRequest, ctx: grpc.ServicerContext) -> Any:
        def run() -> list[dealer_pb2.MaterialChunk]:
            self._party(ctx, req.party_id)
            set_id, data = self.s.core.fetch(req.deployment_id, req.session_id, party_id=req.party_id,
                                             batch=req.batch, purpose=req.purpose or "logits")
            return self._chunks(set_id, data)

        yield from self._guard(ctx, "fetch", run)

    def Prefetch(self, req: dealer_pb2.PrefetchRequest, ctx: grpc.ServicerContext) -> Any:
        def run() -> list[dealer_pb2.MaterialChunk]:
            self._party(ctx, req.party_id)
            got = self.s.core.prefetch(req.deployment_id, party_id=req.party_id, batch=req.batch,
                                       purpose=req.purpose or "logits", held=list(req.held),
                                       confirm_only=req.confirm_only, depth=req.depth)
            return [] if got is None else self._chunks(*got)

        yield from self._guard(ctx, "prefetch", run)

    def Bind(self, req: dealer_pb2.BindRequest, ctx: grpc.ServicerContext) -> Any:
        def run() -> dealer_pb2.BindResponse:
            self._party(ctx, req.party_id)
            set_id = self.s.core.bind(req.deployment_id, req.session_id, party_id=req.party_id, batch=req.batch,
                                      purpose=req.purpose or "logits")
            return dealer_pb2.BindResponse(set_id=set_id)

        return self._guard(ctx, "bind", run)

    def Claim(self, req: dealer_pb2.ClaimRequest, ctx: grpc.ServicerContext) -> Any:
        def run() -> dealer_pb2.ClaimResponse:
            self._party(ctx, req.party_id)
            ids, void = self.s.core.claim(req.deployment_id, party_id=req.party_id, batch=req.batch,
                                          purpose=req.purpose or "logits", max_sets=req.max_sets)
            return dealer_pb2.ClaimResponse(set_ids=ids, void_ids=void)

        return self._guard(ctx, "claim", run)

    def Forget(self, req: dealer_pb2.ForgetRequest, ctx: grpc.ServicerContext) -> Any:
        def run() -> dealer_pb2.ForgetResponse:
            self._party(ctx, req.party_id)
            dropped = self.s.core.forget_party(req.party_id)
            self.s.log.info("forget", party=req.party_id, dropped=dropped)
            return dealer_pb2.ForgetResponse(dropped=dropped)

        return self._guard(ctx, "forget", run)

    def Release(self, req: dealer_pb2.ReleaseRequest, ctx: grpc.ServicerContext) -> Any:
        def run() -> dealer_pb2.ReleaseResponse:
            tls.require_role(ctx, ROLE_PARTY, insecure_metadata=not self.s.settings.tls)
            self.s.core.release(req.deployment_id)
            return dealer_pb2.ReleaseResponse()

        return self._guard(ctx, "release", run)

    def Stats(self, req: Any, ctx: grpc.ServicerContext) -> Any:
        def run() -> dealer_pb2.StatsResponse:
            tls.require_role(ctx, ROLE_PARTY, ROLE_OWNER, insecure_metadata=not self.s.settings.tls)
            counters = self.s.core.stats()
            if req.deployment_id:
                counters["deployment_pending"] = self.s.core.pool_pending(req.deployment_id)
            return dealer_pb2.StatsResponse(counters=counters)

        return self._guard(ctx, "stats", run)


class DealerServer:
    def __init__(self, topology: Topology, *, max_workers: int = 32) -> None:
        self.topology = topology
        self.settings = topology.cluster
        self.log = Logger("dealer")
        self.core = DealerCore(master_key=load_master_key(master_key_path(topology)),
                               pool_size=topology.dealer.pool_size, max_pool_bytes=topology.dealer.max_pool_bytes,
                               max_set_bytes=topology.dealer.max_set_bytes, pool_nice=topology.dealer.pool_nice,
                               pool_kind_bytes=topology.dealer.pool_kind_bytes,
                               worker_processes=topology.dealer.worker_processes,
                               pool_idle_class=topology.dealer.pool_idle_class)
        self._server = grpc.server(ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix="dealer"),
                                   options=tls.server_options(self.settings))
        dealer_pb2_grpc.add_DealerServicer_to_server(_Servicer(self), self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        d = topology.dealer
        self.port = tls.bind_server(self._server, d.address, settings=self.settings, cert=d.cert, key=d.key)

    def start(self) -> None:
        self.core.start()
        self._server.start()
        self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.log.info("listening", address=self.topology.dealer.address)

    def stop(self, grace: float = 2.0) -> None:
        self._server.stop(grace).wait(grace + 1)
        self.core.stop()
        self.log.info("stopped")


def serve(topology: Topology) -> None:
    import torch

    torch.set_num_threads(int(os.environ.get("SECUREINFER_TORCH_THREADS", "1")))
    server = DealerServer(topology)
    server.start()
    server.log.info("heap_frozen", objects=freeze_heap())  # start-up objects leave later collections
    done = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: done.set())
    signal.signal(signal.SIGINT, lambda *_: done.set())
    done.wait()
    server.stop()
