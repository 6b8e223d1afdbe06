"""The dealer's logic, independent of gRPC: model registry, pools of material, binding.

The dealer process (``dealer/server.py``) wraps this in gRPC; it lives in the process
layer, so unlike ``dealer/material.py`` it may use the engine's planner to derive what a
model needs from its public graph.

* ``register``: a party announces a deployment's public graph. The dealer derives every
  party's *model seed* from its master key and a random per-deployment *nonce* (HKDF,
  label ``model/<deployment>/<nonce hex>/<party>``), from which the fixed weight masks
  ``B`` are expanded, and returns the calling party's seed and the nonce. The nonce is
  drawn from ``os.urandom`` at a deployment's first registration, so masks are never
  reused, not even for a deployment id seen before (after ``release`` or a restart).
  Each party registers a deployment once; after a dealer restart a party that meets
  NOT_FOUND re-registers by itself *with the stored nonce*, and gets the same seeds.
* Material comes in *sets*: one bundle per party for one request of a given
  (deployment, batch, purpose), generated ahead of time by a background thread and
  serialized once. A set is used for exactly one session.
* ``prefetch``: a party collects its part of pooled sets ahead of requests (the transfer
  and parsing leave the request path).
* ``claim``: party 0, the *binder*, takes over pooled sets that every party has
  confirmed holding (ahead of requests, from its prefetch thread). It binds each of its
  sessions to one of them itself and tells the peers the set id over the data path, so
  the request path has no dealer round trip. A claimed set leaves the pool for good:
  the dealer never binds it. If a party that held a part restarts (``forget_party``),
  the claimed sets it held are reported void in the binder's next ``claim``.
* ``bind``: the binder's fallback when it has no claimed set: the dealer binds the
  session to a set every party holds, or else parties ``fetch``, which binds a set
  nobody has prefetched (or generates one) and serves each party its part.
* Every part is served to its party at most once, and a session is bound at most once,
  so no correlated randomness is ever used twice. Bound sessions and prefetched but
  unbound sets expire (``session_ttl_s`` / ``set_ttl_s``).
* Memory is bounded whatever clients send: pooled sets of all deployments together stay
  under ``max_pool_bytes``; one request's set may not exceed ``max_set_bytes`` (judged
  from the measured bytes per row before the set is built: RESOURCE_EXHAUSTED naming the
  largest batch that fits); at most ``max_wanted_per_model`` (batch, purpose) kinds per
  deployment are pooled (least recently used dropped); at most ``max_generating`` sets
  are generated on the request path at once. Parties round batches up to buckets
  (:func:`secureinfer.party.limits.batch_bucket`), so the kinds a client can ask for are
  few.
"""

from __future__ import annotations

import hmac
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from secureinfer.config import MAX_BATCH
from secureinfer.dealer.generation import GenerationWorker, ModelSpec, fixed_masks, generate_parts
from secureinfer.dealer.material import BundleBuilder
from secureinfer.dealer.wire import bundle_to_bytes
from secureinfer.sched import MAX_BURST_DEPTH, MAX_NICE, burst_depth, lower_thread_priority
from secureinfer.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    NotFoundError,
    ProtocolError,
    ResourceExhaustedError,
)
from secureinfer.graph.ir import Graph
from secureinfer.prg import derive_seed, fresh_seed
from secureinfer.watermark.mpc import AUDIT_PREFIX, audit_material, parse_purpose

__all__ = ["BINDER", "NONCE_BYTES", "STATS_GAUGES", "DealerCore", "PURPOSES", "Registration"]

#: entries of :meth:`DealerCore.stats` that are gauges (current values), not counters
STATS_GAUGES = frozenset({"generating", "pooled_sets", "pooled_bytes", "claimed_sets"})

PURPOSES = ("logits", "argmax", "dp")
NONCE_BYTES = 32  # per-deployment seed nonce (os.urandom)
#: the party that claims ready sets and binds sessions to them (see ``claim``)
BINDER = 0
_Key = tuple[str, int, str]


class Registration(NamedTuple):
    """What a party gets from :meth:`DealerCore.register`."""

    digest: str  # SHA-256 (hex) of the graph as the dealer stored it
    seed: bytes  # the calling party's model seed (fixed masks B)
    nonce: bytes  # the deployment's seed nonce: keep it, send it back to re-register


@dataclass
class _Model:
    """A registered deployment: seeds derived from the master key and ``nonce``."""

    graph: Graph
    digest: str
    n_parties: int
    seeds: list[bytes]
    masks: dict[str, Any]  # prepared fixed masks B, keyed "<node>/<attr>"
    raw_masks: dict[str, Any]  # the same masks unprepared (watermark audits flatten them)
    wanted: dict[tuple[int, str], float] = field(default_factory=dict)  # (batch, purpose) -> last use
    set_bytes: dict[tuple[int, str], int] = field(default_factory=dict)  # measured size of one set
    depth_hint: dict[tuple[int, str], int] = field(default_factory=dict)  # parts a party caches of a kind
    nonce: bytes = b""  # the deployment's seed nonce (NONCE_BYTES random bytes)
    registered: set[int] = field(default_factory=set)  # parties that registered it in this process
    spec: ModelSpec | None = None  # what a generation worker needs (set at registration)


@dataclass
class _Set:
    set_id: str
    parts: list[bytes | None]  # serialized bundle per party; None once handed out
    created: float
    delivered: set[int] = field(default_factory=set)  # parties that were handed their part (Prefetch)
    confirmed: set[int] = field(default_factory=set)  # parties that reported holding it
    last_delivery: float = 0.0  # when the latest part was handed out
    first_confirmed: float | None = None  # when the first party reported holding its part

    def expired(self, now: float, ttl_s: float) -> bool:
        """Whether an unbound, prefetched set is too old to bind: ``ttl_s`` after the first
        party confirmed its part (parties drop cached parts later than that: 300 s vs 200 s by default), or after the
        last hand-out if none confirmed. Counting from creation instead expired sets still
        crossing a slow link (a LeNet-32 part takes 23 s at 100 Mbit)."""
        if not self.delivered:
            return False
        since = self.first_confirmed if self.first_confirmed is not None else self.last_delivery
        return now - since > ttl_s


@dataclass
class _Claimed:
    """A set delegated to the binder: which parties hold a part of it, and since when."""

    holders: frozenset[int]
    created: float


@dataclass
class _Binding:
    set: _Set
    served: set[int]
    created: float


class DealerCore:
    def __init__(
        self, *, master_key: bytes, pool_size: int = 4, session_ttl_s: float = 300.0, set_ttl_s: float = 200.0,
        wanted_ttl_s: float = 600.0, max_pool_bytes: int = 2 << 30, max_set_bytes: int = 1 << 30,
        max_wanted_per_model: int = 8, max_generating: int = 2, generate_wait_s: float = 30.0,
        pool_nice: int = 0, pool_kind_bytes: int = 0, worker_processes: bool = False, pool_idle_class: bool = False,
    ) -> None:
        if len(master_key) < 32:
            raise ValueError("dealer master key must be 32 bytes")
        self._master = master_key
        self.pool_size = pool_size
        # kinds with small sets are pooled deeper, up to this many bytes each (sched.burst_depth)
        self.pool_kind_bytes = pool_kind_bytes
        self.session_ttl_s = session_ttl_s
        # < the party cache's ttl_s (300 s): the dealer stops binding a part before a party drops
        # it; long enough that a LeNet-32 set (586 MB) crossing 100 Mbit links (47 s) stays usable
        self.set_ttl_s = set_ttl_s
        self.wanted_ttl_s = wanted_ttl_s
        self.max_pool_bytes = max_pool_bytes
        self.max_set_bytes = max_set_bytes
        self.max_wanted_per_model = max_wanted_per_model
        self.generate_wait_s = generate_wait_s
        if not isinstance(pool_nice, int) or not 0 <= pool_nice <= MAX_NICE:
            raise ValueError(f"pool_nice must be an int in 0..{MAX_NICE}, got {pool_nice!r}")
        self.pool_nice = pool_nice  # added to the deep filler's nice value (sched.lower_thread_priority)
        self.pool_idle_class = pool_idle_class  # the deep filler's worker process in SCHED_IDLE (Linux)
        self._generating = threading.BoundedSemaphore(max_generating)
        self._lock = threading.Condition()
        self._models: dict[str, _Model] = {}
        self._pools: dict[_Key, OrderedDict[str, _Set]] = {}
        self._sessions: dict[str, _Binding] = {}
        self._claimed: dict[str, _Claimed] = {}
        self._void: set[str] = set()  # claimed sets a restarted party no longer holds
        self.counters: dict[str, int] = {
            "sets_generated": 0, "parts_prefetched": 0, "parts_fetched": 0, "binds_prefetched": 0,
            "binds_fallback": 0, "sets_expired": 0, "refused_too_large": 0, "refused_busy": 0,
            "sets_claimed": 0, "claimed_void": 0, "refill_failed": 0,
        }
        self._in_generation = 0  # sets being generated now (pool filler and request path)
        self._filling: dict[_Key, int] = {}  # kinds the pool fillers are generating now
        self._filling_first: set[_Key] = set()  # ... of those, by the first-set filler (a Bind waits for it)
        self._filling_bytes = 0  # estimated size of the sets the fillers are generating
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        # pool fillers generate in worker processes (dealer/generation.py): no interpreter-lock
        # contention with the RPC threads; request-path generation stays in the calling thread
        self.worker_processes = worker_processes
        self._workers: list[GenerationWorker] = []

    # ------------------------------------------------------------------ models
    def register(
        self, deployment_id: str, graph_json: bytes, *, party_id: int, n_parties: int, nonce: bytes = b""
    ) -> Registration:
        """Register a deployment for ``party_id``; return its seed and the deployment's nonce.

        Guarantees:

        * The seeds are ``HKDF(master, "model/<deployment_id>/<nonce hex>/<p>")``. Without
          ``nonce`` (a deployment's first registration, at deploy time) the nonce is the
          one this process drew from ``os.urandom`` when the first of the deployment's
          parties registered it, or a fresh one if the deployment is unknown here --
          never re-derived from the id alone, so a deployment id that was used before
          (released, or registered before a restart) gets new masks.
        * Without ``nonce`` each party registers a deployment once: the n parties in any
          order, concurrently; a party that already registered it is refused
          (:class:`~secureinfer.errors.AlreadyExistsError`).
        * With ``nonce`` (a party re-registering the deployment it stored, after a dealer
          restart or release) the same seeds are re-derived; refused
          (:class:`~secureinfer.errors.AlreadyExistsError`) if this process holds the
          deployment under another nonce.
        * The graph and party count must match the deployment's first registration
          (:class:`~secureinfer.errors.InvalidArgumentError`).
        """
        if not deployment_id or len(deployment_id) > 128:
            raise InvalidArgumentError("deployment_id must be 1..128 characters")
        if not 2 <= n_parties <= 16 or not 0 <= party_id < n_parties:
            raise InvalidArgumentError(f"bad party_id {party_id} / n_parties {n_parties}")
        nonce = bytes(nonce)
        if nonce and len(nonce) != NONCE_BYTES:
            raise InvalidArgumentError(f"a deployment nonce has {NONCE_BYTES} bytes, got {len(nonce)}")
        graph = Graph.from_public_json(graph_json)
        digest = graph.digest()

        def admit(m: _Model) -> Registration:  # under self._lock
            if m.digest != digest or m.n_parties != n_parties:
                raise InvalidArgumentError(f"deployment {deployment_id} was registered with a different graph")
            if nonce and not hmac.compare_digest(nonce, m.nonce):
                raise AlreadyExistsError(
                    f"deployment {deployment_id} is registered with the dealer under another nonce; "
                    "deploy the model again with a fresh deployment id"
                )
            if not nonce and party_id in m.registered:
                raise AlreadyExistsError(
                    f"party {party_id} already registered deployment {deployment_id}; a deployment id is "
                    "registered once (re-register with its nonce, or deploy with a fresh id)"
                )
            m.registered.add(party_id)
            return Registration(m.digest, m.seeds[party_id], m.nonce)

        with self._lock:
            m = self._models.get(deployment_id)
            if m is not None:
                return admit(m)
        use = nonce or fresh_seed()  # fresh_seed: os.urandom(32)
        seeds = [derive_seed(self._master, f"model/{deployment_id}/{use.hex()}/{p}") for p in range(n_parties)]
        masks, raw = fixed_masks(graph, seeds)
        with self._lock:
            # concurrent first registrations: the first to get here wins, the others join it
            m = self._models.setdefault(
                deployment_id, _Model(graph, digest, n_parties, seeds, masks, raw, nonce=use)
            )
            if m.spec is None:
                m.spec = ModelSpec(f"{deployment_id}/{m.nonce.hex()}/{m.digest}", graph_json, tuple(m.seeds),
                                   n_parties)
            reg = admit(m)
            m.wanted.setdefault((1, "logits"), time.monotonic())
            self._lock.notify_all()
            return reg

    def release(self, deployment_id: str) -> None:
        """Forget a deployment: its seeds, nonce and pooled material.

        A later registration without the nonce gets a fresh nonce, hence new masks; a
        party that still holds the deployment re-registers with its stored nonce.
        """
        with self._lock:
            self._models.pop(deployment_id, None)
            for key in [k for k in self._pools if k[0] == deployment_id]:
                del self._pools[key]

    def _model(self, deployment_id: str, party_id: int) -> _Model:
        m = self._models.get(deployment_id)
        if m is None:
            raise NotFoundError(f"deployment {deployment_id} is not registered with the dealer")
        if not 0 <= party_id < m.n_parties:
            raise InvalidArgumentError(f"party {party_id} not in this deployment")
        return m

    @staticmethod
    def _check(batch: int, purpose: str, session_id: str | None = None) -> None:
        if purpose.startswith(AUDIT_PREFIX):
            try:
                parse_purpose(purpose)
            except ValueError as exc:
                raise InvalidArgumentError(str(exc)) from None
        elif purpose not in PURPOSES:
            raise InvalidArgumentError(f"unknown purpose {purpose!r}; one of {PURPOSES}")
        if not 1 <= batch <= MAX_BATCH:
            raise InvalidArgumentError(f"batch {batch} outside 1..{MAX_BATCH}")
        if session_id is not None and not 0 < len(session_id) <= 128:
            raise InvalidArgumentError("session_id must be 1..128 characters")

    # ------------------------------------------------------------------ material
    def _generate(self, m: _Model, batch: int, purpose: str, *, worker: GenerationWorker | None = None) -> _Set:
        """A fresh set of (batch, purpose): in ``worker``'s process where given (the pool
        fillers, see :mod:`secureinfer.dealer.generation`), else in this thread."""
        if purpose.startswith(AUDIT_PREFIX):
            return self._generate_audit(m, purpose)
        with self._lock:
            self._in_generation += 1
        try:
            if worker is not None and m.spec is not None:
                got: list[bytes] = worker.generate(m.spec, batch=batch, purpose=purpose)
            else:
                got = generate_parts(m.graph, m.masks, n_parties=m.n_parties, batch=batch, purpose=purpose)
            parts: list[bytes | None] = list(got)
        finally:
            with self._lock:
                self._in_generation -= 1
        with self._lock:
            self.counters["sets_generated"] += 1
            m.set_bytes[(batch, purpose)] = sum(len(p) for p in parts if p is not None)
        return _Set(uuid.uuid4().hex, parts, time.monotonic())

    def _want(self, m: _Model, batch: int, purpose: str) -> None:
        """Keep the pool of this kind of request filled (not for one-off audits).

        At most ``max_wanted_per_model`` kinds per deployment are pooled: the least
        recently used kind beyond that is forgotten, and its pooled sets freed.
        """
        if purpose.startswith(AUDIT_PREFIX):
            return
        m.wanted[(batch, purpose)] = time.monotonic()
        while len(m.wanted) > self.max_wanted_per_model:
            oldest = min(m.wanted, key=m.wanted.__getitem__)
            del m.wanted[oldest]
            dep = next((d for d, mm in self._models.items() if mm is m), None)
            pool = self._pools.get((dep, *oldest)) if dep is not None else None
            for sid in [k for k, st in (pool or {}).items() if not st.delivered]:
                del pool[sid]  # type: ignore[union-attr]

    # ------------------------------------------------------------------ memory limits
    def _estimate(self, m: _Model, batch: int, purpose: str) -> int | None:
        """Bytes of one set of (batch, purpose): measured, or ``batch`` x the largest
        measured bytes per row of that purpose (an upper bound: material is linear in
        the batch plus per-set constants); None before anything was measured."""
        size = m.set_bytes.get((batch, purpose))
        if size is not None:
            return size
        rows = [sz / b for (b, p), sz in m.set_bytes.items() if p == purpose]
        return int(max(rows) * batch) if rows else None

    def _check_size(self, m: _Model, deployment_id: str, batch: int, purpose: str) -> None:
        """Refuse a request whose one set would exceed ``max_set_bytes`` (RESOURCE_EXHAUSTED).

        Without a measurement for ``purpose``, a batch-1 set is generated first (it goes
        to the pool) to measure the bytes per row: a batch is judged before its set is
        ever built.
        """
        if purpose.startswith(AUDIT_PREFIX):
            return
        with self._lock:
            est = self._estimate(m, batch, purpose)
        if est is None and batch > 1:
            s = self._generate_bounded(m, 1, purpose)
            with self._lock:
                if self._models.get(deployment_id) is m:
                    self._pools.setdefault((deployment_id, 1, purpose), OrderedDict())[s.set_id] = s
                est = self._estimate(m, batch, purpose)
        if est is not None and est > self.max_set_bytes:
            with self._lock:
                self.counters["refused_too_large"] += 1
                per_row = max(1, self._estimate(m, 1, purpose) or 1)
            raise ResourceExhaustedError(
                f"dealer: a batch of {batch} needs about {est / 2**20:.0f} MiB of correlated randomness for "
                f"deployment {deployment_id}, over the dealer's cap of {self.max_set_bytes / 2**20:.0f} MiB per "
                f"request; send batches of at most {max(1, self.max_set_bytes // per_row)}"
            )

    def _generate_bounded(self, m: _Model, batch: int, purpose: str) -> _Set:
        """Generate on the request path, at most ``max_generating`` at a time."""
        if not self._generating.acquire(timeout=self.generate_wait_s):
            with self._lock:
                self.counters["refused_busy"] += 1
            raise ResourceExhaustedError(
                f"dealer: busy generating material for other requests for {self.generate_wait_s:g} s; retry later"
            )
        try:
            return self._generate(m, batch, purpose)
        finally:
            self._generating.release()

    def stats(self) -> dict[str, int]:
        """Monotonic counters plus gauges: ``generating`` (sets being generated now),
        ``pooled_sets`` and ``pooled_bytes`` (unbound material held), ``pooled_delivered``
        (pooled sets some party was handed a part of: on their way to being claimed),
        ``claimed_sets`` (claimed within the session TTL: the binder uses them without
        telling the dealer, so this is not the parties' ready stock)."""
        with self._lock:
            return {
                **self.counters,
                "generating": self._in_generation,
                "pooled_sets": sum(len(pool) for pool in self._pools.values()),
                "pooled_delivered": sum(1 for pool in self._pools.values() for st in pool.values() if st.delivered),
                "pooled_bytes": self._pooled_bytes(),
                "claimed_sets": len(self._claimed),
            }

    def _pooled_bytes(self) -> int:
        """Bytes of every pooled part not yet handed out (the pool's memory)."""
        return sum(len(p) for pool in self._pools.values() for st in pool.values() for p in st.parts if p is not None)

    def _generate_audit(self, m: _Model, purpose: str) -> _Set:
        layer, bits = parse_purpose(purpose)
        node = next((n for n in m.graph.nodes if n.attrs.get("weight") == layer), None)
        if node is None or f"{node.name}/weight" not in m.raw_masks:
            raise InvalidArgumentError(f"the deployment has no weight parameter {layer!r}")
        b = BundleBuilder(m.n_parties)
        audit_material(b, bits=bits)
        parts: list[bytes | None] = [bundle_to_bytes(b.party_bundle(p)) for p in range(m.n_parties)]
        return _Set(uuid.uuid4().hex, parts, time.monotonic())

    def prefetch(
        self, deployment_id: str, *, party_id: int, batch: int, purpose: str, held: Sequence[str] = (),
        confirm_only: bool = False, depth: int = 0,
    ) -> tuple[str, bytes] | None:
        """Record which pooled sets this party holds; hand it the oldest one it lacks, or None.

        A part handed out counts as held only once the party reports it in ``held`` (a
        transfer can fail after the dealer let go of it); only sets every party holds
        are bound by :meth:`bind`. ``depth``: how many parts of the kind the party caches
        (0: no hint); the pool of the kind may grow to that many sets (:meth:`kind_depth`).
        """
        self._check(batch, purpose)
        with self._lock:
            m = self._model(deployment_id, party_id)
        self._check_size(m, deployment_id, batch, purpose)
        with self._lock:
            self._expire()
            self._want(m, batch, purpose)
            if depth > 0:
                m.depth_hint[(batch, purpose)] = min(int(depth), MAX_BURST_DEPTH)
            self._lock.notify_all()
            pool = self._pools.get((deployment_id, batch, purpose), {})
            for sid in held:
                s = pool.get(sid)
                if s is not None and party_id in s.delivered:
                    s.confirmed.add(party_id)
                    if s.first_confirmed is None:
                        s.first_confirmed = time.monotonic()
            if confirm_only:
                return None
            for s in pool.values():
                part = s.parts[party_id]
                if party_id not in s.delivered and part is not None:
                    s.delivered.add(party_id)
                    s.last_delivery = time.monotonic()
                    s.parts[party_id] = None
                    self.counters["parts_prefetched"] += 1
                    return s.set_id, part
        return None

    def claim(
        self, deployment_id: str, *, party_id: int, batch: int, purpose: str, max_sets: int = 0,
    ) -> tuple[list[str], list[str]]:
        """Delegate to the binder the pooled sets every party holds; ``(claimed, void)``.

        ``claimed``: set ids the binder may now bind sessions to, each exactly once (they
        leave the pool: the dealer never binds them). ``void``: sets claimed earlier that a
        restarted party no longer holds; the binder must drop them. Only :data:`BINDER`
        may claim (PermissionDeniedError otherwise).
        """
        from secureinfer.errors import PermissionDeniedError

        if party_id != BINDER:
            raise PermissionDeniedError(f"only party {BINDER} claims material, not party {party_id}")
        self._check(batch, purpose)
        with self._lock:
            m = self._model(deployment_id, party_id)
            self._expire()
            pool = self._pools.get((deployment_id, batch, purpose), OrderedDict())
            ready = [st for st in pool.values() if len(st.confirmed) == m.n_parties]
            if max_sets > 0:
                ready = ready[:max_sets]
            now = time.monotonic()
            for st in ready:
                del pool[st.set_id]
                self._claimed[st.set_id] = _Claimed(frozenset(st.delivered), now)
            self.counters["sets_claimed"] += len(ready)
            void, self._void = sorted(self._void), set()
            if ready:
                self._lock.notify_all()  # the pool has room again
            return [st.set_id for st in ready], void

    def bind(self, deployment_id: str, session_id: str, *, party_id: int, batch: int, purpose: str) -> str:
        """The set of ``session_id`` if this party holds it already, else ``""`` (then Fetch).

        The first caller binds the session: to a set every party holds if there is one,
        otherwise at once to a fresh set that the parties will fetch — so a set that
        becomes ready a moment later can never be bound under a party that already
        decided to fetch.
        """
        self._check(batch, purpose, session_id)
        with self._lock:
            m = self._model(deployment_id, party_id)
        self._check_size(m, deployment_id, batch, purpose)
        with self._lock:
            self._expire()
            self._want(m, batch, purpose)
            b = self._sessions.get(session_id)
            if b is None:
                pool = self._pools.get((deployment_id, batch, purpose), OrderedDict())
                ready = next((s for s in pool.values() if len(s.confirmed) == m.n_parties), None)
                if ready is not None:
                    del pool[ready.set_id]
                    b = self._sessions[session_id] = _Binding(ready, set(), time.monotonic())
                    self.counters["binds_prefetched"] += 1
                    self._lock.notify_all()
        if b is None:
            b = self._bind_fresh(m, deployment_id, session_id, batch, purpose)
        with self._lock:
            if party_id not in b.set.confirmed:
                return ""  # bound to a set this party fetches
            if party_id in b.served:
                raise ProtocolError(f"session {session_id} was already bound for party {party_id}")
            b.served.add(party_id)
            self._forget_if_done(session_id, b, m.n_parties)
            return b.set.set_id

    def _bind_fresh(self, m: _Model, deployment_id: str, session_id: str, batch: int, purpose: str) -> _Binding:
        """Bind ``session_id`` to a set nobody prefetched (pooled, or generated now)."""
        key = (deployment_id, batch, purpose)
        with self._lock:
            b = self._sessions.get(session_id)
            if b is not None:
                return b
            # A set of this kind the first-set filler (normal priority) is generating now arrives
            # sooner than a second one started beside it (both would share the same cores): wait.
            until = time.monotonic() + self.generate_wait_s
            while True:
                pool = self._pools.get(key, OrderedDict())
                fresh = next((s for s in pool.values() if not s.delivered), None)
                left = until - time.monotonic()
                if fresh is not None or key not in self._filling_first or left <= 0:
                    break
                self._lock.wait(left)
            if fresh is not None:
                del pool[fresh.set_id]
        s = fresh if fresh is not None else self._generate_bounded(m, batch, purpose)
        with self._lock:
            b = self._sessions.get(session_id)
            if b is None:
                b = self._sessions[session_id] = _Binding(s, set(), time.monotonic())
                self.counters["binds_fallback"] += 1
            else:  # another party bound it meanwhile: keep our set for later
                self._pools.setdefault(key, OrderedDict())[s.set_id] = s
            return b

    def fetch(self, deployment_id: str, session_id: str, *, party_id: int, batch: int, purpose: str) -> tuple[str, bytes]:
        """Bind (if needed) and return this party's part of the session's set."""
        self._check(batch, purpose, session_id)
        with self._lock:
            m = self._model(deployment_id, party_id)
        self._check_size(m, deployment_id, batch, purpose)
        with self._lock:
            self._expire()
            self._want(m, batch, purpose)
        b = self._bind_fresh(m, deployment_id, session_id, batch, purpose)
        with self._lock:
            part = b.set.parts[party_id]
            if party_id in b.served or part is None:
                raise ProtocolError(f"material of session {session_id} was already served to party {party_id}")
            b.set.parts[party_id] = None
            b.served.add(party_id)
            self.counters["parts_fetched"] += 1
            self._forget_if_done(session_id, b, m.n_parties)
            return b.set.set_id, part

    def forget_party(self, party_id: int) -> int:
        """Drop every unbound set whose part was handed to ``party_id`` (it restarted)."""
        dropped = 0
        with self._lock:
            for pool in self._pools.values():
                for sid in [k for k, s in pool.items() if party_id in s.delivered]:
                    del pool[sid]
                    dropped += 1
            for sid in [k for k, c in self._claimed.items() if party_id in c.holders]:
                del self._claimed[sid]
                self._void.add(sid)
                self.counters["claimed_void"] += 1
                dropped += 1
            self._lock.notify_all()
        return dropped

    def _forget_if_done(self, session_id: str, b: _Binding, n: int) -> None:
        if len(b.served) == n:
            # keep the binding (without material) until it expires, so a replayed
            # session id is refused instead of being bound to a new set
            b.set.parts = [None] * n

    def _expire(self) -> None:
        now = time.monotonic()
        for sid in [s for s, b in self._sessions.items() if now - b.created > self.session_ttl_s]:
            del self._sessions[sid]
        for sid in [s for s, c in self._claimed.items() if now - c.created > self.session_ttl_s]:
            del self._claimed[sid]  # bookkeeping only: the parties dropped these parts long ago
        for pool in self._pools.values():
            for sid in [k for k, s in pool.items() if s.expired(now, self.set_ttl_s)]:
                del pool[sid]  # parties drop unbound prefetched parts after a longer TTL
                self.counters["sets_expired"] += 1

    # ------------------------------------------------------------------ pool thread
    def start(self) -> None:
        """Start the pool fillers: ``dealer-pool`` generates the first set of every empty
        pool (a Bind may be waiting for it) at the RPC threads' priority; ``dealer-pool-deep``
        tops pools up to ``pool_size`` at ``pool_nice`` (work ahead of demand yields the CPU;
        a Bind never waits on it, so the lowered priority cannot stall a request)."""
        if self._threads or self.pool_size <= 0:
            return
        for name, deep in (("dealer-pool", False), ("dealer-pool-deep", True)):
            if deep and self.pool_size < 2 and self.pool_kind_bytes <= 0:
                continue
            worker = None
            if self.worker_processes:
                worker = GenerationWorker(nice=self.pool_nice if deep else 0, idle_class=deep and self.pool_idle_class,
                                          name=f"{name}-worker")
                worker.start()
                self._workers.append(worker)
            t = threading.Thread(target=self._refill_loop, kwargs={"deep": deep, "worker": worker}, name=name,
                                 daemon=True)
            t.start()
            self._threads.append(t)

    def worker_pids(self) -> list[int]:
        """Process ids of the running generation workers (empty without ``worker_processes``)."""
        return [pid for w in self._workers if (pid := w.pid) is not None]

    def stop(self) -> None:
        self._stop.set()
        with self._lock:
            self._lock.notify_all()
        for w in self._workers:  # a filler waiting on its worker sees it end
            w.stop()
        for t in self._threads:
            t.join(timeout=10)

    def _next_job(self, *, deep: bool = False) -> tuple[_Model, str, int, str, int] | None:
        """The next pool to top up (lock held), or None: the first of :meth:`_jobs`."""
        return next(self._jobs(deep=deep), None)

    def pool_pending(self, deployment_id: str) -> int:
        """Sets of ``deployment_id`` the pool fillers are generating, plus its kinds that
        either filler would top up next (0: its pools are as full as depths and byte
        budgets allow). A party waits for 0 after a deploy (``PartyServer._await_prewarm``),
        so the deep fill does not run beside the first request."""
        with self._lock:
            busy = sum(n for (dep, _, _), n in self._filling.items() if dep == deployment_id)
            more = {(b, p) for deep in (False, True) for _, dep, b, p, _ in self._jobs(deep=deep) if dep == deployment_id}
            return busy + len(more)

    def _jobs(self, *, deep: bool = False) -> Iterator[tuple[_Model, str, int, str, int]]:
        """The pools to top up, most recently wanted first, within the global byte budget.

        A pool's level counts its sets and those being generated for it. Every pool gets
        a first set (``deep`` False) before any gets a second (``deep``: levels 1 up to
        its depth - 1, in depth rounds). A kind's depth is ``pool_size``, or more for small
        sets that the parties cache deeper (:meth:`kind_depth`).
        No set is generated that would take the pooled bytes (counting the sets being
        generated) over ``max_pool_bytes``.
        Yields each kind (a kind more than once, one per missing level) with its
        estimated set size.
        """
        now = time.monotonic()
        free = self.max_pool_bytes - self._pooled_bytes() - self._filling_bytes
        kinds = sorted(((last, dep, m, batch, purpose) for dep, m in self._models.items()
                        for (batch, purpose), last in m.wanted.items() if now - last <= self.wanted_ttl_s),
                       key=lambda t: -t[0])
        sizes = [self._estimate(m, batch, purpose) or 0 for _, _, m, batch, purpose in kinds]
        depths = [self.kind_depth(m, batch, purpose, size) for (_, _, m, batch, purpose), size in zip(kinds, sizes)]
        for depth in range(2, max(depths, default=1) + 1) if deep else (1,):
            for (_, dep, m, batch, purpose), size, most in zip(kinds, sizes, depths):
                if size > free or size > self.max_set_bytes or depth > most:
                    continue
                key = (dep, batch, purpose)
                level = len(self._pools.get(key, {})) + self._filling.get(key, 0)
                if level < depth and (not deep or level >= 1):
                    yield m, dep, batch, purpose, size

    def kind_depth(self, m: _Model, batch: int, purpose: str, size: int | None) -> int:
        """Sets to pool of one kind: ``pool_size``, or up to the parties' cache depth for
        it (their hint: a kind in use) where ``pool_kind_bytes`` holds that many sets of
        ``size`` bytes (:func:`~secureinfer.sched.burst_depth`)."""
        hint = m.depth_hint.get((batch, purpose), 0)
        if hint <= self.pool_size:
            return self.pool_size
        return min(hint, burst_depth(self.pool_size, size, self.pool_kind_bytes))

    def _done_filling(self, key: _Key, *, deep: bool, size: int) -> None:
        """A filler finished (or failed) a set of ``key`` (lock held); wake waiting Binds."""
        self._filling_bytes -= size
        if not deep:
            self._filling_first.discard(key)
        self._filling[key] -= 1
        if not self._filling[key]:
            del self._filling[key]
        self._lock.notify_all()

    def _refill_loop(self, *, deep: bool = False, worker: GenerationWorker | None = None) -> None:
        if deep:  # work ahead of demand yields to request paths: generating, or (with a worker)
            lower_thread_priority(self.pool_nice)  # receiving and pooling the worker's sets
        while not self._stop.is_set():
            with self._lock:
                self._expire()
                job = self._next_job(deep=deep)
                if job is None:
                    self._lock.wait(timeout=1.0)
                    continue
                m, dep, batch, purpose, size = job
                key = (dep, batch, purpose)
                self._filling[key] = self._filling.get(key, 0) + 1
                self._filling_bytes += size
                if not deep:
                    self._filling_first.add(key)
            try:
                s = self._generate(m, batch, purpose, worker=worker)
            except Exception:  # a kind that cannot be generated must not stop the pool for all
                with self._lock:
                    self._done_filling(key, deep=deep, size=size)
                    self.counters["refill_failed"] += 1
                    m.wanted.pop((batch, purpose), None)  # retried once a request wants it again
                continue
            except BaseException:
                with self._lock:
                    self._done_filling(key, deep=deep, size=size)
                raise
            with self._lock:  # pooled and no longer "filling" at once: a waiting Bind sees one or the other
                self._done_filling(key, deep=deep, size=size)
                if self._models.get(dep) is m:
                    self._pools.setdefault((dep, batch, purpose), OrderedDict())[s.set_id] = s
                    self._lock.notify_all()
