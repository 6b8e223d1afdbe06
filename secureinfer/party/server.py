"""The compute-party process (``secureinfer party --id N --config FILE``).

Services on one mTLS gRPC port:

* ``Inference`` — ``ServerLive``, ``ServerReady`` (every peer and the dealer answer),
  ``ModelMetadata``, ``Infer`` (role ``client``).
* ``ModelAdmin`` — ``Deploy`` (streamed, role ``owner``), ``Remove``, ``ListModels``.
* ``PeerExchange`` — protocol messages from the other parties (role ``party``).
* ``grpc.health.v1.Health`` — the standard health service.

The ``Inference`` / ``ModelAdmin`` servicers (role checks, request parsing) are in
:mod:`secureinfer.party.services`; this module holds the state they call.

A request that cannot finish ends everywhere: any error inside a session aborts it on
this party and notifies the peers (who fail at once instead of waiting for a timeout),
frees its mailbox, and returns one clear status to the client.
"""

from __future__ import annotations

import re
import signal
from pathlib import Path
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import grpc
import numpy as np
import torch
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from secureinfer.config import MAX_BATCH, Topology
from secureinfer.dealer.core import BINDER
from secureinfer.dealer.material import PartyBundle
from secureinfer.dealer.wire import bundle_from_bytes
from secureinfer.engine.plan import Plan, compile_plan
from secureinfer.engine.runner import PartyModel, open_masks, precompute, run_plan
from secureinfer.errors import (
    InvalidArgumentError,
    NotFoundError,
    PeerUnavailableError,
    ProtocolError,
    SecureInferError,
    ShapeError,
)
from secureinfer.graph.ir import Graph
from secureinfer.log import Logger
from secureinfer.dp.ledger import BudgetLedger
from secureinfer.party.dp import DpPolicy
from secureinfer.party.limits import ConcurrencyLimiter, RateLimiter, batch_bucket, prewarm_batches
from secureinfer.party.material import MaterialCache, read_chunks
from secureinfer.party.prewarm import Prewarm
from secureinfer.party.services import AdminService, InferenceService
from secureinfer.party.store import ModelRecord, ModelStore, check_name
from secureinfer.protocols.session import Session
from secureinfer.sched import freeze_heap, gc_seconds, track_gc
from secureinfer.transport import tls
from secureinfer.transport.codec import share_from_proto, tensor_to_proto
from secureinfer.transport.grpc import GrpcTransport
from secureinfer.transport.stream import StreamTransport
from secureinfer.v1 import common_pb2, dealer_pb2, dealer_pb2_grpc, party_pb2, party_pb2_grpc
from secureinfer.watermark.mpc import AUDIT_PREFIX

__all__ = ["PartyServer", "serve"]

_RID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
#: the data-path step of the binder's note naming a session's material set (the
#: protocols' own steps count up from 1)
_BIND_STEP = 2**32 - 1
_SET_ID_RE = re.compile(rb"^[0-9a-f]{0,64}$")
OUTPUTS = ("logits", "argmax", "label")  # "label": graphs with labels only



@dataclass
class LoadedModel:
    record: ModelRecord
    graph: Graph
    model: PartyModel
    dp: DpPolicy | None = None
    plans: dict[tuple[int, str], Plan] = field(default_factory=dict)
    #: per (batch, purpose): the seed-derived shares a request expands (learned from the
    #: first request of the kind whose bundle was prepared ahead); later bundles of the
    #: kind are expanded in the prefetch thread
    expansions: dict[tuple[int, str], list[tuple[str, tuple[int, ...]]]] = field(default_factory=dict)

    def plan(self, batch: int, purpose: str, n_parties: int) -> Plan:
        key = (batch, purpose)
        p = self.plans.get(key)
        if p is None:
            clip = self.dp.clip if purpose == "dp" and self.dp is not None else None
            p = self.plans[key] = compile_plan(self.graph, batch=batch, n_parties=n_parties,
                                               argmax=purpose == "argmax", dp_clip=clip)
        return p

    @property
    def default_purpose(self) -> str:
        return "dp" if self.dp is not None else "logits"


class PartyServer(Prewarm):
    def __init__(self, topology: Topology, party_id: int, *, max_workers: int = 64,
                 prefetch_depth: int | None = None) -> None:
        self.topology = topology
        self.party_id = party_id
        self.me = topology.party(party_id)
        self.n = topology.n_parties
        self.settings = topology.cluster
        self.log = Logger("party", party=party_id)
        # party-to-party rounds: the framed mTLS stream (default) or unary gRPC calls
        self.transport: StreamTransport | GrpcTransport
        if self.settings.data_transport == "stream":
            self.transport = StreamTransport.from_topology(topology, party_id)
        else:
            self.transport = GrpcTransport.from_topology(topology, party_id)
        self.store = ModelStore(self.me.data_dir, self.me.storage_key)
        self.ledger = BudgetLedger(Path(self.me.data_dir) / "dp-ledger.db", default_budget=None)
        self._insecure = not self.settings.tls
        self._lock = threading.Lock()
        self._models: dict[tuple[str, str], LoadedModel] = {}
        self._by_deployment: dict[str, LoadedModel] = {}
        self._client_slots = ConcurrencyLimiter(limit=self.settings.max_client_requests, what="requests")
        self._audits = RateLimiter(limit=self.settings.audits_per_hour, window_s=3600.0, what="watermark audits")
        self._dealer_channel = tls.open_channel(
            topology.dealer.address, settings=self.settings, cert=self.me.cert, key=self.me.key
        )
        self.dealer = dealer_pb2_grpc.DealerStub(self._dealer_channel)
        self._peer_channels = {
            p.id: tls.open_channel(p.address, settings=self.settings, cert=self.me.cert, key=self.me.key)
            for p in topology.peers(party_id)
        }
        self.cache = MaterialCache(
            party_id=party_id, dealer=self.dealer, prepare=self._prepare_material,
            rpc_timeout_s=self.settings.rpc_timeout_s, max_bytes=self.settings.max_message_bytes * 64,
            depth=self.settings.prefetch_depth if prefetch_depth is None else prefetch_depth,
            kind_bytes=self.settings.prefetch_kind_bytes, log=self.log, binder=party_id == BINDER,
        )
        if party_id == BINDER and isinstance(self.transport, StreamTransport):
            self.transport.on_peer_lost = self._peer_lost
        self._server = grpc.server(
            ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"party{party_id}"),
            options=tls.server_options(self.settings),
        )
        party_pb2_grpc.add_InferenceServicer_to_server(InferenceService(self), self._server)
        party_pb2_grpc.add_ModelAdminServicer_to_server(AdminService(self), self._server)
        if isinstance(self.transport, GrpcTransport):
            self.transport.add_to_server(self._server)
        self._health = health.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.port = tls.bind_server(self._server, self.me.address, settings=self.settings, cert=self.me.cert, key=self.me.key)

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self._load_models()
        self._forget_prefetched()
        if isinstance(self.transport, StreamTransport):
            self.transport.start()
        self._server.start()
        self.cache.start()
        self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        self.log.info("listening", address=self.me.address, models=len(self._models),
                      data_transport=self.settings.data_transport, data_address=self.me.data_address)

    def _peer_lost(self, peer: int) -> None:
        """The binder saw a peer's data connection end: that peer may have restarted and
        lost its prefetched parts, so no claimed set is used any more (the dealer reports
        the same sets void a moment later, see MaterialCache)."""
        n = self.cache.drop_claimed()
        if n:
            self.log.info("claimed_sets_dropped", peer=peer, sets=n)

    def _forget_prefetched(self) -> None:
        """A fresh process holds no prefetched material: tell the dealer before serving."""
        deadline = time.monotonic() + self.settings.rpc_timeout_s
        while True:
            try:
                r = self.dealer.Forget(dealer_pb2.ForgetRequest(party_id=self.party_id), timeout=2.0)
                self.log.info("dealer_forget", dropped=r.dropped)
                return
            except grpc.RpcError as err:
                if time.monotonic() > deadline:  # the dealer is down: it will start with empty pools
                    self.log.warning("dealer_forget_failed", error=err.code().name)
                    return
                time.sleep(0.2)

    def stop(self, grace: float = 2.0) -> None:
        self._health.enter_graceful_shutdown()
        self.cache.stop()
        self._server.stop(grace).wait(grace + 1)
        self.transport.close()
        self.ledger.close()
        self._dealer_channel.close()
        for ch in self._peer_channels.values():
            ch.close()
        self.log.info("stopped")

    def wait(self) -> None:
        self._server.wait_for_termination()

    def _load_models(self) -> None:
        """Install every stored model (at start).

        Each stored model's deployment id gets its tombstone if it has none yet (a store
        written before tombstones existed), so it can never be deployed again here. A
        model that fails to load is logged and skipped, its file kept.
        """
        for name in self.store.names():
            for version in self.store.versions(name):
                try:
                    rec = self.store.load(name, version)
                    self.store.claim_deployment(rec.deployment_id, name=rec.name, version=rec.version, exist_ok=True)
                    self._install(rec)
                except SecureInferError as exc:
                    self.log.error("model_load_failed", model=name, version=version, error=str(exc))

    def _install(self, rec: ModelRecord) -> LoadedModel:
        """Serve ``rec`` (its deployment id must already be claimed in the store).

        Refuses (:class:`~secureinfer.errors.ConfigError`) a record without a seed nonce:
        it was deployed before nonces, and its masks can no longer be re-derived by the
        dealer. A record replacing another one of the same name and version takes over
        its slot; the replaced deployment's cached material is dropped.
        """
        from secureinfer.dealer.core import NONCE_BYTES
        from secureinfer.errors import ConfigError

        if len(rec.seed_nonce) != NONCE_BYTES:
            raise ConfigError(
                f"model {rec.name} version {rec.version} was deployed before per-deployment seed nonces; "
                "deploy it again (with replace)"
            )
        graph = Graph.from_public_json(rec.graph_json)
        masks = {k: PartyBundle(self.party_id, rec.model_seed).share(f"{k}/B", v.shape) for k, v in rec.diffs.items()}
        pm = PartyModel(graph, party_id=self.party_id, shares=rec.shares, masks=masks, diffs=rec.diffs)
        out_dim = compile_plan(graph, batch=1, n_parties=self.n).output_shape[-1]
        dp = DpPolicy.from_parameters(rec.parameters, frac_bits=graph.frac_bits, dim=out_dim, n_parties=self.n)
        lm = LoadedModel(rec, graph, pm, dp)
        with self._lock:
            old = self._models.get((rec.name, rec.version))
            self._models[(rec.name, rec.version)] = lm
            self._by_deployment[rec.deployment_id] = lm
            stale = old.record.deployment_id if old is not None else None
            stale = None if stale == rec.deployment_id else stale
            if stale is not None and self._by_deployment.get(stale) is old:
                del self._by_deployment[stale]
        if stale is not None:
            self.cache.forget(stale)
        for key in self._prewarm_keys(lm):
            self.cache.want(key)
        return lm

    def _prepare_material(self, key: tuple[str, int, str], bundle: PartyBundle) -> None:
        """Prefetcher hook: precompute the input-independent parts of a cached set."""
        with self._lock:
            lm = self._by_deployment.get(key[0])
        if lm is not None:
            def pause() -> None:  # between steps: a request in flight goes first
                self.cache.yield_to_requests(key)

            precompute(lm.plan(key[1], key[2], self.n), lm.model, bundle, pause=pause)
            bundle.prepared = True
            manifest = lm.expansions.get((key[1], key[2]))
            if manifest:
                bundle.expand_ahead(manifest, pause=pause)

    def model(self, name: str, version: str = "") -> LoadedModel:
        with self._lock:
            if version:
                lm = self._models.get((name, version))
            else:
                cands = [m for (n, _), m in self._models.items() if n == name]
                lm = max(cands, key=lambda m: (m.record.created, m.record.version)) if cands else None
        if lm is None:
            what = f"model {name!r}" + (f" version {version!r}" if version else "")
            raise NotFoundError(f"{what} is not deployed on party {self.party_id}")
        return lm

    # ------------------------------------------------------------------ dealer
    def _rpc(self, fn: Any, request: Any, what: str) -> Any:
        try:
            return fn(request, timeout=self.settings.rpc_timeout_s)
        except grpc.RpcError as err:
            raise tls.error_from_rpc_error(err, peer=f"dealer at {self.topology.dealer.address} ({what})") from None

    def register_with_dealer(self, deployment_id: str, graph_json: bytes, nonce: bytes = b"") -> tuple[bytes, bytes]:
        """Register a deployment with the dealer; return (this party's model seed, seed nonce).

        Without ``nonce``: the deployment's first registration (at deploy time); the
        dealer answers with a fresh random nonce, and refuses (ALREADY_EXISTS) if this
        party registered the id before. With ``nonce`` (from the stored record): a
        re-registration after a dealer restart, answered with the same seed. A malformed
        answer, or one with another nonce, raises :class:`~secureinfer.errors.ProtocolError`.
        """
        from secureinfer.dealer.core import NONCE_BYTES

        req = dealer_pb2.RegisterModelRequest(
            deployment_id=deployment_id, graph=graph_json, party_id=self.party_id, n_parties=self.n, nonce=nonce
        )
        resp = self._rpc(self.dealer.RegisterModel, req, "register")
        if len(resp.model_seed) != 32 or len(resp.nonce) != NONCE_BYTES or (nonce and resp.nonce != nonce):
            raise ProtocolError(f"dealer answered the registration of deployment {deployment_id} "
                                "with a malformed seed or another nonce")
        return resp.model_seed, resp.nonce

    def material(self, lm: LoadedModel, session: Session, batch: int, purpose: str, *,
                 warm_up: bool = False) -> PartyBundle:
        """This session's dealer material, bound to the session by the binder (party 0).

        The binder takes a set it has claimed from the dealer ahead of time
        (:meth:`MaterialCache.take_claimed`) -- or, holding none, asks the dealer to bind
        one (``Bind``) -- and sends its id to every peer on the data path (empty: fetch
        from the dealer) before it computes anything. A peer waits for that message and
        takes the named set from its cache, or fetches its part of the session's set.
        Request-path cost with a claimed set: one one-way data-path message, no dealer
        call; the set is used by this session only (the binder hands each claimed id
        out once, and the dealer never binds a claimed set). ``warm_up``: a deploy's
        warm-up run, which does not count as a request of the kind (no burst stock).
        Background preparation does not yield to requests meanwhile
        (:meth:`MaterialCache.awaiting`): this one may be waiting for it.
        """
        with self.cache.awaiting():
            return self._material(lm, session, batch, purpose, warm_up=warm_up)

    def _material(self, lm: LoadedModel, session: Session, batch: int, purpose: str, *,
                  warm_up: bool) -> PartyBundle:
        dep = lm.record.deployment_id
        key = (dep, batch, purpose)
        sid = session.session_id
        audit = purpose.startswith(AUDIT_PREFIX)  # one-off audits are never prefetched
        if not audit:
            self.cache.want(key, request=not warm_up)
        wait = self.settings.request_timeout_s  # the dealer may have to generate a set on the spot
        bundle: PartyBundle | None = None
        if self.party_id == BINDER:
            # a set on its way beats one moved on the request path; the rest of the
            # deadline stays for the fallback (Bind, then Fetch)
            left = max(0.0, (session.deadline or time.monotonic() + wait) - time.monotonic())
            claimed = None if audit else self.cache.take_claimed(key, wait_s=left / 2)
            if claimed is not None:
                set_id, bundle = claimed
            else:
                bind = dealer_pb2.BindRequest(deployment_id=dep, session_id=sid, party_id=self.party_id,
                                              batch=batch, purpose=purpose)
                set_id = self._dealer_call(lambda: self.dealer.Bind(bind, timeout=wait).set_id, lm)
                bundle = self.cache.take(key, set_id) if set_id else None
            note = (set_id if bundle is not None else "").encode("ascii")
            for p in session.peers:
                self.transport.send(sid, _BIND_STEP, p, note, timeout=self.settings.rpc_timeout_s)
        else:
            left = max(0.001, (session.deadline or time.monotonic() + wait) - time.monotonic())
            note = self.transport.recv(sid, _BIND_STEP, BINDER, timeout=left)
            if not _SET_ID_RE.match(note):
                raise ProtocolError(f"party {BINDER} sent a malformed set id for session {sid}")
            set_id = note.decode("ascii")
            if set_id:
                bundle = self.cache.take(key, set_id)
                if bundle is None:
                    raise PeerUnavailableError(
                        f"party {self.party_id} does not hold the material set party {BINDER} chose "
                        "(expired, or this party restarted); retry the request")
        if bundle is not None:
            return bundle
        req = dealer_pb2.FetchRequest(deployment_id=dep, session_id=sid, party_id=self.party_id,
                                      batch=batch, purpose=purpose)
        got = self._dealer_call(lambda: read_chunks(self.dealer.Fetch(req, timeout=wait),
                                                    max_bytes=self.settings.max_message_bytes * 64), lm)
        if got is None:
            raise ProtocolError("dealer sent no material")
        return bundle_from_bytes(got[1], party_id=self.party_id)

    def _dealer_call(self, fn: Any, lm: LoadedModel) -> Any:
        """Call the dealer; after a dealer restart (NOT_FOUND) re-register once and retry.

        The re-registration sends the deployment's stored seed nonce, so the dealer
        re-derives the same masks; if it answers with another seed than the stored one
        (e.g. its master key was replaced) this raises
        :class:`~secureinfer.errors.IntegrityError` instead of computing with wrong masks.
        """
        import hmac

        from secureinfer.errors import IntegrityError

        for attempt in (0, 1):
            try:
                return fn()
            except grpc.RpcError as err:
                if err.code() == grpc.StatusCode.NOT_FOUND and attempt == 0:
                    rec = lm.record
                    seed, _ = self.register_with_dealer(rec.deployment_id, rec.graph_json, nonce=rec.seed_nonce)
                    if not hmac.compare_digest(seed, rec.model_seed):
                        raise IntegrityError(
                            f"party {self.party_id}: the dealer re-derived another mask seed for deployment "
                            f"{rec.deployment_id} (was its master key replaced?); deploy the model again"
                        ) from None
                    self.log.info("dealer_reregistered", deployment=rec.deployment_id)
                    continue
                raise tls.error_from_rpc_error(err, peer=f"dealer at {self.topology.dealer.address}") from None
        raise ProtocolError("unreachable")

    # ------------------------------------------------------------------ inference
    def infer(self, req: party_pb2.InferRequest, deadline: float, *, client: str) -> party_pb2.InferResponse:
        """One inference; at most ``max_client_requests`` in flight per client.

        A request this party refuses (a limit, a bad input, the DP budget) is also aborted
        at the peers, which then fail it at once instead of waiting for its messages.
        """
        try:
            with self._client_slots.hold(client, who=f"party {self.party_id}: client {client!r}"), self.cache.serving():
                return self._infer(req, deadline, client=client)
        except SecureInferError as exc:
            try:
                dep = self.model(req.model_name, req.model_version).record.deployment_id
            except NotFoundError:
                raise exc from None
            if _RID_RE.match(req.request_id):
                self.transport.abort(f"infer/{dep}/{req.request_id}", f"party {self.party_id}: {exc}")
            raise

    def _infer(self, req: party_pb2.InferRequest, deadline: float, *, client: str) -> party_pb2.InferResponse:
        t0, cpu0, gc0 = time.perf_counter(), time.thread_time(), gc_seconds()
        lm = self.model(req.model_name, req.model_version)
        if not _RID_RE.match(req.request_id):
            raise InvalidArgumentError("request_id must be 1..64 characters of [A-Za-z0-9_-]")
        outputs = list(req.outputs) or ["logits"]
        engine_out = self._engine_outputs(lm, outputs)
        spec = lm.graph.input_spec()
        expected = "(batch, " + ", ".join(str(d) for d in spec.shape[1:]) + ")"
        if spec.one_hot is not None:
            expected += f" (token ids one-hot over {spec.one_hot}: secureinfer.client.sdk.one_hot(ids, {spec.one_hot}))"
        if req.input.encoding not in (common_pb2.ENCODING_ADDITIVE_SHARE, common_pb2.ENCODING_SEEDED_SHARE):
            raise ShapeError(f"input must be an additive share (INT64) of shape {expected}")
        shape = tuple(int(d) for d in req.input.shape)  # checked before a seeded share expands
        if len(shape) != len(spec.shape) or shape[1:] != tuple(spec.shape[1:]) or shape[0] < 1:
            raise ShapeError(f"model {lm.record.name!r} expects input of shape {expected}, got {shape}")
        batch = shape[0]
        if batch > MAX_BATCH:
            raise ShapeError(f"a request holds at most {MAX_BATCH} rows, got {batch}; split it")
        x = share_from_proto(req.input, expect_frac_bits=lm.graph.frac_bits)
        # run on a bucketed batch (zero rows appended: public padding) so that a client
        # cycling batch sizes meets few kinds of dealer material
        padded = batch_bucket(batch)
        if padded > batch:
            x = torch.cat([x, x.new_zeros((padded - batch, *x.shape[1:]))])
        argmax = "argmax" in engine_out.values() or "label" in engine_out.values()
        purpose = "argmax" if argmax else lm.default_purpose
        info: dict[str, str] = {}
        if lm.dp is not None:
            if argmax:
                raise InvalidArgumentError(f"model {lm.record.name!r} releases only DP-noised logits; "
                                           "the exact argmax output is not available")
            info = self.debit(client, lm, req.request_id, batch)  # before anything is computed
        sid = f"infer/{lm.record.deployment_id}/{req.request_id}"
        session = Session(
            party_id=self.party_id, n_parties=self.n, session_id=sid, transport=self.transport,
            timeout=self.settings.rpc_timeout_s, deadline=deadline,
        )
        try:
            t_off = time.perf_counter()
            bundle = self.material(lm, session, padded, purpose)
            session.costs.offline_ms = (time.perf_counter() - t_off) * 1e3
            session.costs.bytes_offline = bundle.nbytes
            plan = lm.plan(padded, purpose, self.n)
            learn = bundle.prepared and (padded, purpose) not in lm.expansions
            if learn:
                bundle.expansions = []
            outs = {k: v[:batch] for k, v in run_plan(session, plan, lm.model, bundle, x).items()}
            if learn and bundle.expansions is not None:
                lm.expansions[(padded, purpose)] = bundle.expansions
            if lm.dp is not None:
                outs["logits"] = outs["logits"] + lm.dp.noise_share(tuple(outs["logits"].shape))
        except BaseException as exc:
            self.transport.abort(sid, f"party {self.party_id}: {exc}")
            raise
        finally:
            self.transport.close_session(sid)
        resp = party_pb2.InferResponse(
            model_name=lm.record.name, model_version=lm.record.version, request_id=req.request_id,
            party_id=self.party_id, info=info,
        )
        for name in outputs:  # under the names asked for (a model's own output names included)
            frac = plan.output_scale if engine_out[name] == "logits" else 0
            resp.outputs.add(name=name, tensor=tensor_to_proto(
                outs[engine_out[name]], encoding=common_pb2.ENCODING_ADDITIVE_SHARE, frac_bits=frac))
        c = session.costs
        resp.cost.CopyFrom(common_pb2.Cost(
            latency_ms=(time.perf_counter() - t0) * 1e3, rounds=c.rounds, bytes_sent_online=c.bytes_sent,
            bytes_received_online=c.bytes_received, bytes_offline=c.bytes_offline, offline_ms=c.offline_ms,
        ))
        self.log.info("infer", request=req.request_id, model=lm.record.name, version=lm.record.version,
                      batch=batch, padded=padded, rounds=c.rounds, bytes_sent=c.bytes_sent,
                      ms=round(resp.cost.latency_ms, 2), offline_ms=round(c.offline_ms, 2),
                      cpu_ms=round((time.thread_time() - cpu0) * 1e3, 2),  # this thread only
                      gc_ms=round((gc_seconds() - gc0) * 1e3, 2))  # the process's collections meanwhile
        return resp

    @staticmethod
    def _engine_outputs(lm: LoadedModel, outputs: list[str]) -> dict[str, str]:
        """Each requested output name -> the engine output it is: ``logits``, ``argmax``
        (one-hot), ``label`` (a classifier's class label), or a model output name the
        graph declares (``Graph.output_names``). InvalidArgumentError naming the rest."""
        known = {o: o for o in OUTPUTS if o != "label" or lm.graph.labels is not None}
        known.update(lm.graph.output_names)
        if len(outputs) > len(known) or len(set(outputs)) != len(outputs):
            raise InvalidArgumentError(f"outputs {outputs[:8]!r}: each at most once, from {sorted(known)}")
        bad = [o for o in outputs if o not in known]
        if bad:
            raise InvalidArgumentError(f"unknown outputs {bad}; model {lm.record.name!r} has {sorted(known)}")
        return {o: known[o] for o in outputs}

    def debit(self, client: str, lm: LoadedModel, request_id: str, rows: int) -> dict[str, str]:
        """Charge a DP request to the client's budget (committed and fsync'd before any release).

        Guarantees: this returns only after a *new* debit for ``request_id`` is durable in
        this party's ledger, so every release of fresh noise is paid for once. A request
        id this party ever debited before -- any client, any model, before or after a
        restart of this party or of the dealer -- is refused with
        :class:`~secureinfer.errors.AlreadyExistsError` (ALREADY_EXISTS) and charges
        nothing; the caller runs no MPC for it. An exhausted budget raises
        :class:`~secureinfer.errors.BudgetExhaustedError`.
        """
        from secureinfer.errors import AlreadyExistsError

        if lm.dp is None:
            raise ProtocolError(f"model {lm.record.name!r} has no DP policy")
        key = f"{client}/{lm.record.name}"
        if key not in self.ledger.clients():
            self.ledger.set_budget(key, epsilon=lm.dp.budget_epsilon, delta=lm.dp.budget_delta)
        try:
            d = self.ledger.reserve(key, request_id, lm.dp.cost(rows))  # refuses a replayed id
        except AlreadyExistsError:
            raise AlreadyExistsError(
                f"party {self.party_id}: request id {request_id!r} was already used; use a fresh id"
            ) from None
        self.log.info("dp_debit", client=client, model=lm.record.name, request=request_id,
                      spent=round(d.spent_epsilon, 6), remaining=round(d.remaining_epsilon, 6))
        return {"dp.epsilon_spent": f"{d.spent_epsilon:.6g}", "dp.epsilon_remaining": f"{d.remaining_epsilon:.6g}"}

    # ------------------------------------------------------------------ deployment
    def deploy(self, header: party_pb2.DeployHeader, payload: bytes) -> party_pb2.DeployResponse:
        """Deploy this party's weight shares under a fresh deployment id.

        Guarantees: a deployment id is accepted once per party, ever -- an id this party
        saw before (deployed, failed, removed, or replaced) is refused with
        :class:`~secureinfer.errors.AlreadyExistsError` before the dealer is contacted or
        anything is opened (durable tombstone, :meth:`ModelStore.claim_deployment`). The
        masks ``B`` come from seeds the dealer derives with a fresh random nonce; the
        parties check in one round that they all got the same nonce before opening
        ``E = W - B``. ``replace`` overwrites the same name and version under the new id
        and releases the replaced deployment at the dealer.
        """
        import hashlib
        import hmac

        from secureinfer.errors import AlreadyExistsError

        name = check_name("model name", header.name)
        version = check_name("version", header.version or "1")
        dep = header.deployment_id
        if not _RID_RE.match(dep):
            raise InvalidArgumentError("deployment_id must be 1..64 characters of [A-Za-z0-9_-]")
        if self.store.exists(name, version) and not header.replace:
            raise AlreadyExistsError(
                f"model {name} version {version} is already deployed; use a new version or replace"
            )
        graph = Graph.from_public_json(header.graph)
        shares = _parse_weight_shares(payload, graph)
        out_dim = compile_plan(graph, batch=1, n_parties=self.n).output_shape[-1]
        DpPolicy.from_parameters(dict(header.parameters), frac_bits=graph.frac_bits, dim=out_dim, n_parties=self.n)
        prewarm_batches(dict(header.parameters), max_batch=MAX_BATCH)  # refuse a bad list before storing
        try:  # durable, atomic; the id stays used even if this deploy fails below
            self.store.claim_deployment(dep, name=name, version=version)
        except AlreadyExistsError as exc:
            raise AlreadyExistsError(f"party {self.party_id}: {exc}") from None
        sid = f"deploy/{dep}"
        session = Session(party_id=self.party_id, n_parties=self.n, session_id=sid, transport=self.transport,
                          timeout=self.settings.rpc_timeout_s, deadline=time.monotonic() + self.settings.request_timeout_s)
        try:
            seed, nonce = self.register_with_dealer(dep, header.graph)
            # a dealer restart between two parties' registrations would give them seeds of
            # different nonces (inconsistent masks): compare before anything is opened
            tag = hashlib.sha256(b"secureinfer/v1/deploy-nonce\0" + dep.encode() + b"\0" + nonce).digest()
            if any(not hmac.compare_digest(t, tag) for t in session.exchange({p: tag for p in session.peers}).values()):
                raise ProtocolError(f"party {self.party_id}: the parties got mask seeds of different nonces for "
                                    f"deployment {dep} (did the dealer restart during the deploy?); deploy again")
            masks, diffs = open_masks(session, graph, shares, PartyBundle(self.party_id, seed))
        except BaseException as exc:
            self.transport.abort(sid, f"party {self.party_id}: {exc}")
            raise
        finally:
            self.transport.close_session(sid)
        rec = ModelRecord(name, version, dep, ModelStore.now(), bytes(header.graph), seed, shares,
                          diffs, dict(header.parameters), seed_nonce=nonce)
        with self._lock:
            old = self._models.get((name, version))
        self.store.save(rec, replace=header.replace)
        lm = self._install(rec)
        self._await_prewarm(lm)
        if old is not None and old.record.deployment_id != dep:
            try:  # the replaced deployment's masks are no longer needed
                self.dealer.Release(dealer_pb2.ReleaseRequest(deployment_id=old.record.deployment_id),
                                    timeout=self.settings.rpc_timeout_s)
            except grpc.RpcError:
                pass  # the dealer forgets deployments on restart anyway
        c = session.costs
        self.log.info("deployed", model=name, version=version, deployment=header.deployment_id, bytes=c.bytes_sent)
        return party_pb2.DeployResponse(
            name=name, version=version, deployment_id=header.deployment_id,
            cost=common_pb2.Cost(rounds=c.rounds, bytes_sent_online=c.bytes_sent, bytes_received_online=c.bytes_received),
        )

    def audit(self, req: party_pb2.AuditRequest, *, auditor: str) -> party_pb2.AuditResponse:
        """Watermark audit inside the MPC (see :mod:`secureinfer.watermark.mpc`).

        The auditor's certificate and key are verified here, and the projection, bits and
        threshold derived from them: nothing the auditor sends enters the computation as
        a number. Rate-limited per (auditor, deployment); logged without key material.
        """
        from secureinfer.watermark.mpc import check_audit_request, run_audit, torch_layout
        from secureinfer.watermark.mpc import purpose as audit_purpose

        lm = self.model(req.model_name, req.model_version)
        if not _RID_RE.match(req.request_id):
            raise InvalidArgumentError("request_id must be 1..64 characters of [A-Za-z0-9_-]")
        node = next((n for n in lm.graph.nodes if n.attrs.get("weight") == req.layer), None)
        fixed = lm.model.fixed.get(node.name, {}).get("weight") if node is not None else None
        if node is None or fixed is None:
            raise InvalidArgumentError(f"model {lm.record.name!r} has no weight parameter {req.layer!r}")
        q_share = torch_layout(node.op, fixed.raw_local)
        spec = check_audit_request(certificate=req.certificate, seed=req.watermark_seed, nonce=req.watermark_nonce,
                                   layer=req.layer, layer_shape=tuple(q_share.shape))
        self._audits.admit((auditor, lm.record.deployment_id), who=f"party {self.party_id}: auditor {auditor!r}")
        sid = f"audit/{lm.record.deployment_id}/{req.request_id}"
        session = Session(party_id=self.party_id, n_parties=self.n, session_id=sid, transport=self.transport,
                          timeout=self.settings.rpc_timeout_s,
                          deadline=time.monotonic() + self.settings.request_timeout_s)
        try:
            bundle = self.material(lm, session, 1, audit_purpose(req.layer, spec.bits))
            verdict, released = run_audit(session, bundle, spec=spec, q_share=q_share,
                                          reveal_distance=req.reveal_distance)
        except BaseException as exc:
            self.transport.abort(sid, f"party {self.party_id}: {exc}")
            raise
        finally:
            self.transport.close_session(sid)
        self.log.info("audit", auditor=auditor, model=lm.record.name, version=lm.record.version, layer=req.layer,
                      bits=spec.bits, threshold=spec.threshold, request=req.request_id,
                      reveal_distance=req.reveal_distance)
        resp = party_pb2.AuditResponse(
            party_id=self.party_id,
            verdict=tensor_to_proto(verdict, encoding=common_pb2.ENCODING_ADDITIVE_SHARE),
            cost=common_pb2.Cost(rounds=session.costs.rounds, bytes_sent_online=session.costs.bytes_sent),
        )
        if released is not None:
            resp.distance.CopyFrom(tensor_to_proto(released, encoding=common_pb2.ENCODING_ADDITIVE_SHARE))
        return resp

    def remove(self, name: str, version: str) -> None:
        """Stop serving and delete a model; its deployment id stays used (tombstone kept),
        so a later deploy under the same id is refused."""
        lm = self.model(name, version)
        self.store.remove(lm.record.name, lm.record.version)
        with self._lock:
            self._models.pop((lm.record.name, lm.record.version), None)
            self._by_deployment.pop(lm.record.deployment_id, None)
        self.cache.forget(lm.record.deployment_id)
        try:
            self.dealer.Release(dealer_pb2.ReleaseRequest(deployment_id=lm.record.deployment_id),
                                timeout=self.settings.rpc_timeout_s)
        except grpc.RpcError:
            pass  # the dealer forgets unused deployments on restart anyway
        self.log.info("removed", model=lm.record.name, version=lm.record.version)

    def ready(self) -> tuple[bool, str]:
        problems = []
        for pid, ch in self._peer_channels.items():
            try:
                health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2.0)
            except grpc.RpcError as err:
                problems.append(f"party {pid}: {err.code().name}")
        try:
            self.dealer.ServerLive(common_pb2.ServerLiveRequest(), timeout=2.0)
        except grpc.RpcError as err:
            problems.append(f"dealer: {err.code().name}")
        return (not problems, "; ".join(problems))


def _parse_weight_shares(payload: bytes, graph: Graph) -> dict[str, torch.Tensor]:
    """Parse this party's parameter shares and check them against what the graph needs."""
    from secureinfer.engine.runner import encode_params

    msg = party_pb2.WeightShares()
    try:
        msg.ParseFromString(payload)
    except Exception as exc:
        raise InvalidArgumentError(f"malformed weight shares: {exc}") from exc
    expected = {k: tuple(v.shape) for k, v in encode_params(_zero_params(graph)).items()}
    given = {t.name: tuple(t.tensor.shape) for t in msg.tensors}
    problems = [f"unexpected tensor {k!r}" for k in given if k not in expected]
    for k, shp in expected.items():
        got = given.get(k)
        if got is None:
            problems.append(f"missing share of {k}")
        elif got != shp:
            problems.append(f"share of {k} has shape {got}, expected {shp}")
    if problems:  # before any decoding: a seeded share would expand to whatever shape it names
        raise InvalidArgumentError("weight shares do not match the graph: " + "; ".join(problems))
    return {t.name: share_from_proto(t.tensor) for t in msg.tensors}


def _zero_params(graph: Graph) -> Graph:
    """A copy of ``graph`` with zero parameters: lets the engine tell the expected shapes."""
    import copy

    g = copy.copy(graph)
    g.params = {k: np.zeros(v) for k, v in graph.param_shapes.items()}
    return g


def serve(topology: Topology, party_id: int) -> None:
    """Run party ``party_id`` until SIGTERM/SIGINT."""
    import os

    # one intra-op thread: parties are latency-bound, and extra threads contend with the
    # peer process and the dealer on the same host (measured: 2 threads doubled and
    # destabilized compute times on a 2-core machine)
    torch.set_num_threads(int(os.environ.get("SECUREINFER_TORCH_THREADS", "1")))
    track_gc()
    server = PartyServer(topology, party_id)
    server.start()
    server.log.info("heap_frozen", objects=freeze_heap())  # start-up objects leave later collections
    done = threading.Event()

    def _stop(signum: int, frame: Any) -> None:
        done.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    done.wait()
    server.stop()

