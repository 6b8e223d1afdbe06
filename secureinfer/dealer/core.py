"""The dealer's logic, independent of gRPC: model registry, session assignment, pools.

* ``register``: a party announces a deployment's public graph. The dealer derives every
  party's *model seed* from its master key (HKDF, label ``model/<deployment>/<party>``),
  from which the fixed weight masks ``B`` of the deployment are expanded; it returns the
  calling party's seed only. Registration is idempotent and stateless across dealer
  restarts: the seeds are re-derived, and a party that meets NOT_FOUND re-registers.
* ``fetch``: the first party to ask for session ``S`` binds a bundle set to ``S`` (taken
  from the pool generated ahead of time, or generated now); every party receives its own
  bundle of that set exactly once — a second fetch of the same part is refused, so no
  correlated randomness is ever used twice. A set is forgotten once every party has
  fetched it, or after ``session_ttl_s``.
* A background thread keeps ``pool_size`` bundle sets ready per (deployment, batch,
  purpose) that has been requested, so online latency does not wait for generation when
  requests are spaced out.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import torch

from secureinfer.dealer.material import BundleBuilder, PartyBundle
from secureinfer.engine.plan import compile_plan, fixed_operand_shapes, generate_request_material
from secureinfer.errors import InvalidArgumentError, NotFoundError, ProtocolError
from secureinfer.graph.ir import Graph
from secureinfer.prg import derive_seed

__all__ = ["DealerCore"]

PURPOSES = ("logits", "argmax")
MAX_BATCH = 4096


@dataclass
class _Model:
    graph: Graph
    digest: str
    n_parties: int
    seeds: list[bytes]
    masks: dict[str, torch.Tensor]
    batches: set[tuple[int, str]] = field(default_factory=set)


@dataclass
class _Assigned:
    parts: list[PartyBundle | None]
    created: float


class DealerCore:
    def __init__(self, *, master_key: bytes, pool_size: int = 4, session_ttl_s: float = 300.0) -> None:
        if len(master_key) < 32:
            raise ValueError("dealer master key must be 32 bytes")
        self._master = master_key
        self.pool_size = pool_size
        self.session_ttl_s = session_ttl_s
        self._lock = threading.Condition()
        self._models: dict[str, _Model] = {}
        self._pools: dict[tuple[str, int, str], list[list[PartyBundle]]] = {}
        self._sessions: dict[str, _Assigned] = {}
        self.counters: dict[str, int] = {"bundles_generated": 0, "bundles_served": 0, "pool_hits": 0}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ models
    def register(self, deployment_id: str, graph_json: bytes, *, party_id: int, n_parties: int) -> tuple[str, bytes]:
        if not deployment_id or len(deployment_id) > 128:
            raise InvalidArgumentError("deployment_id must be 1..128 characters")
        if not 2 <= n_parties <= 16 or not 0 <= party_id < n_parties:
            raise InvalidArgumentError(f"bad party_id {party_id} / n_parties {n_parties}")
        graph = Graph.from_public_json(graph_json)
        with self._lock:
            m = self._models.get(deployment_id)
            if m is None:
                seeds = [derive_seed(self._master, f"model/{deployment_id}/{p}") for p in range(n_parties)]
                b = BundleBuilder(n_parties, seeds=seeds)
                masks = {key: b.random(f"{key}/B", shape) for key, shape in fixed_operand_shapes(graph).items()}
                m = _Model(graph, graph.digest(), n_parties, seeds, masks)
                m.batches.add((1, "logits"))
                self._models[deployment_id] = m
                self._lock.notify_all()
            elif m.digest != graph.digest() or m.n_parties != n_parties:
                raise InvalidArgumentError(f"deployment {deployment_id} was registered with a different graph")
            return m.digest, m.seeds[party_id]

    def release(self, deployment_id: str) -> None:
        with self._lock:
            self._models.pop(deployment_id, None)
            for key in [k for k in self._pools if k[0] == deployment_id]:
                del self._pools[key]

    # ------------------------------------------------------------------ material
    def _generate(self, m: _Model, batch: int, purpose: str) -> list[PartyBundle]:
        plan = compile_plan(m.graph, batch=batch, n_parties=m.n_parties, argmax=purpose == "argmax")
        b = BundleBuilder(m.n_parties)
        generate_request_material(plan, b, m.masks)
        return [b.party_bundle(p) for p in range(m.n_parties)]

    def fetch(self, deployment_id: str, session_id: str, *, party_id: int, batch: int, purpose: str) -> PartyBundle:
        if purpose not in PURPOSES:
            raise InvalidArgumentError(f"unknown purpose {purpose!r}; one of {PURPOSES}")
        if not 1 <= batch <= MAX_BATCH:
            raise InvalidArgumentError(f"batch {batch} outside 1..{MAX_BATCH}")
        if not session_id or len(session_id) > 128:
            raise InvalidArgumentError("session_id must be 1..128 characters")
        with self._lock:
            self._expire()
            m = self._models.get(deployment_id)
            if m is None:
                raise NotFoundError(f"deployment {deployment_id} is not registered with the dealer")
            if not 0 <= party_id < m.n_parties:
                raise InvalidArgumentError(f"party {party_id} not in this deployment")
            a = self._sessions.get(session_id)
            if a is None:
                key = (deployment_id, batch, purpose)
                m.batches.add((batch, purpose))
                pool = self._pools.get(key)
                parts = pool.pop() if pool else None
                if parts is not None:
                    self.counters["pool_hits"] += 1
                self._lock.notify_all()
            else:
                parts = None
        if a is None:
            if parts is None:
                parts = self._generate(m, batch, purpose)
                with self._lock:
                    self.counters["bundles_generated"] += 1
            with self._lock:
                a = self._sessions.get(session_id)
                if a is None:  # we won the race to bind this session
                    a = self._sessions[session_id] = _Assigned(list(parts), time.monotonic())
                else:  # another party bound it meanwhile; return our set to the pool
                    self._pools.setdefault((deployment_id, batch, purpose), []).append(parts)
        with self._lock:
            part = a.parts[party_id]
            if part is None:
                raise ProtocolError(f"material of session {session_id} was already served to party {party_id}")
            a.parts[party_id] = None
            if all(p is None for p in a.parts):
                self._sessions.pop(session_id, None)
            self.counters["bundles_served"] += 1
            return part

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, a in self._sessions.items() if now - a.created > self.session_ttl_s]:
            del self._sessions[sid]

    # ------------------------------------------------------------------ pool thread
    def start(self) -> None:
        if self._thread is None and self.pool_size > 0:
            self._thread = threading.Thread(target=self._refill_loop, name="dealer-pool", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    def _next_job(self) -> tuple[_Model, str, int, str] | None:
        for dep, m in self._models.items():
            for batch, purpose in sorted(m.batches):
                if len(self._pools.get((dep, batch, purpose), [])) < self.pool_size:
                    return m, dep, batch, purpose
        return None

    def _refill_loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                job = self._next_job()
                if job is None:
                    self._lock.wait(timeout=1.0)
                    continue
            m, dep, batch, purpose = job
            parts = self._generate(m, batch, purpose)
            with self._lock:
                if dep in self._models:
                    self._pools.setdefault((dep, batch, purpose), []).append(parts)
                    self.counters["bundles_generated"] += 1
