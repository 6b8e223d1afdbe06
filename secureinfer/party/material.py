"""A party's cache of dealer material, filled ahead of requests.

A background thread asks the dealer (``Prefetch``) for this party's part of pooled sets
for every (deployment, batch, purpose) in recent use, parses it, and precomputes the
input-independent half of every linear layer (``op([A], E) + [C]``).

Binding a session to a set (DESIGN.md: the dealer is off the request path): on the
*binder* (party 0, :data:`~secureinfer.dealer.core.BINDER`) the same thread also
``Claim``s the sets every party has confirmed holding, polling with back-off while some
held set is not yet claimable. At request time the binder takes a claimed set
(:meth:`MaterialCache.take_claimed`) and tells the peers its id over the data path; they
take that set from their cache (:meth:`MaterialCache.take`). Only when the binder holds
no claimed set does it ask the dealer (``Bind``; then possibly ``Fetch``: transfer and
parsing on the request path).

Requests come first: while a request is in flight on this party (:meth:`serving`), the
thread starts no prefetch for a kind that still holds a set — a replacement's transfer,
TLS decryption, parsing and precomputation (tens of ms of CPU for an MLP batch of 100)
would otherwise run beside the request that just took a set. The held-back prefetch
starts as soon as no request is in flight (even if the next one begins before this thread
wakes: back-to-back requests must not postpone it until the kind runs dry), at once for a
kind with no set left, and ``max_defer_s`` after it was first held back at the latest
(concurrent clients that never leave the party idle). Nothing is held back while a request
waits for its material (:meth:`awaiting`): it may be waiting for that very set -- at the
binder for a claim, which needs every peer to have fetched and prepared its part, at a
peer for the binder's choice (measured before this rule: a LeNet batch-32 request waited
15 s while a peer's preparation yielded to it, step by step).

Cached parts that were never bound are dropped after ``ttl_s`` (the dealer stops binding
them sooner, see ``DealerCore.set_ttl_s``). Memory is bounded: at most ``max_keys`` kinds
of request are prefetched (least recently used forgotten), and no prefetch starts while
the cached parts hold ``max_cached_bytes`` or more. A kind holds ``depth`` parts, or more
when its parts are small: as many as ``kind_bytes`` holds, at most
:data:`~secureinfer.sched.MAX_BURST_DEPTH` (a burst of back-to-back batch-1 requests then
finds its material here instead of on the request path). The parts beyond ``depth`` are
refilled only once no request has been in flight for ``burst_idle_s``: during a burst
the stock drains without a refill running beside every request, and ``depth`` parts are
then kept as before.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import grpc

from secureinfer.dealer.material import PartyBundle
from secureinfer.dealer.wire import bundle_from_bytes
from secureinfer.errors import SecureInferError
from secureinfer.log import Logger
from secureinfer.sched import burst_depth
from secureinfer.transport.codec import Reassembler
from secureinfer.v1 import dealer_pb2, dealer_pb2_grpc

__all__ = ["MaterialCache", "read_chunks"]

Key = tuple[str, int, str]  # (deployment id, batch, purpose)
#: back-off of the binder's polling for sets the peers have not confirmed yet
_CLAIM_POLL_MIN_S, _CLAIM_POLL_MAX_S = 0.01, 1.0
#: how often an idle binder asks the dealer which claimed sets became void
_VOID_POLL_S = 0.5
#: how long after a part arrived the binder's request path waits for the set to be claimed
_CLAIM_GRACE_S = 0.5


def read_chunks(stream: Any, *, max_bytes: int) -> tuple[str, bytes] | None:
    """Reassemble a MaterialChunk stream into (set_id, bytes); None for an empty stream."""
    re_ = Reassembler(max_bytes=max_bytes)
    data, set_id = None, ""
    for chunk in stream:
        set_id = chunk.set_id
        data = re_.add("m", chunk.chunk_index, chunk.chunk_count, chunk.data) or data
    if data is None:
        return None
    return set_id, data


@dataclass
class _Entry:
    sets: OrderedDict[str, tuple[PartyBundle, float]] = field(default_factory=OrderedDict)
    last_used: float = 0.0
    inflight: bool = False
    claimed: OrderedDict[str, None] = field(default_factory=OrderedDict)  # binder: ids it may bind
    part_bytes: int | None = None  # size of the last part prefetched (sizes this kind's depth)
    landed: float = 0.0  # when the last part of this kind arrived (monotonic)
    used: bool = False  # a request of this kind came (not only a deploy's pre-warm)


class MaterialCache:
    def __init__(
        self, *, party_id: int, dealer: dealer_pb2_grpc.DealerStub, prepare: Callable[[Key, PartyBundle], None],
        rpc_timeout_s: float, max_bytes: int, depth: int = 2, ttl_s: float = 300.0, idle_s: float = 600.0,
        prefetch_timeout_s: float = 120.0, max_cached_bytes: int = 2 << 30, max_keys: int = 16,
        log: Logger | None = None, binder: bool = False, max_defer_s: float = 1.0, kind_bytes: int = 0,
        burst_idle_s: float = 0.2,
    ) -> None:
        self.party_id = party_id
        self.max_defer_s = max_defer_s
        self._serving = 0  # requests in flight (serving())
        self._awaiting = 0  # ... of those, requests waiting for their material (awaiting())
        self._deferred_since: float | None = None  # when a non-urgent prefetch was first held back
        self._released = False  # the request it waited for ended: start it even if another began
        self._last_end = 0.0  # when the last request in flight ended (monotonic)
        self.binder = binder
        self._claim_wait = _CLAIM_POLL_MIN_S  # binder: current back-off of Claim polling
        self._next_claim = 0.0
        self._dealer = dealer
        self._prepare = prepare
        self._timeout = rpc_timeout_s
        self._prefetch_timeout = max(rpc_timeout_s, prefetch_timeout_s)
        self._max_bytes = max_bytes
        self.max_cached_bytes = max_cached_bytes
        self.max_keys = max_keys
        self.depth = depth
        self.kind_bytes = kind_bytes  # kinds with small parts are cached deeper (sched.burst_depth)
        self.burst_idle_s = burst_idle_s
        self.ttl_s = ttl_s
        self.idle_s = idle_s
        self._log = log
        self._cond = threading.Condition()
        self._entries: dict[Key, _Entry] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None and self.depth > 0:
            self._thread = threading.Thread(target=self._loop, name=f"party{self.party_id}-prefetch", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5)

    @contextmanager
    def serving(self) -> Iterator[None]:
        """Mark a request in flight: non-urgent prefetches wait until it ends."""
        with self._cond:
            self._serving += 1
        try:
            yield
        finally:
            with self._cond:
                self._serving -= 1
                self._last_end = time.monotonic()
                if not self._serving and self._deferred_since is not None:
                    self._released = True  # start the held-back prefetch now, even if a request follows at once
                self._cond.notify_all()

    @contextmanager
    def awaiting(self) -> Iterator[None]:
        """Mark a request (inside :meth:`serving`) as waiting for its material: until it
        ends, nothing in the background yields to requests."""
        with self._cond:
            self._awaiting += 1
            self._cond.notify_all()
        try:
            yield
        finally:
            with self._cond:
                self._awaiting -= 1

    def _yielding(self) -> bool:
        """Whether background work should give way now (lock held): a request is in
        flight and none waits for material."""
        return bool(self._serving) and not self._awaiting

    def yield_to_requests(self, key: Key) -> None:
        """Background preparation of a part of ``key``: wait while a request is in flight
        (at most ``max_defer_s``), unless ``key`` has no other set cached or a request
        waits for material (it may be waiting for this one). Called between the steps of
        the prepare hook."""
        with self._cond:
            deadline = time.monotonic() + self.max_defer_s
            while self._yielding() and not self._stop.is_set():
                e = self._entries.get(key)
                left = deadline - time.monotonic()
                if e is None or not e.sets or left <= 0:
                    return
                self._cond.wait(timeout=left)

    def want(self, key: Key, *, request: bool = False) -> None:
        """Keep ``key`` prefetched; ``request``: a request of it came (it may then be
        cached deeper than ``depth``, :meth:`kind_depth`), not only a pre-warm."""
        with self._cond:
            e = self._entries.setdefault(key, _Entry())
            e.last_used = time.monotonic()
            e.used = e.used or request
            while len(self._entries) > self.max_keys:
                oldest = min(self._entries, key=lambda k: self._entries[k].last_used)
                del self._entries[oldest]  # its parts go too; the dealer expires their sets
            self._cond.notify_all()

    def forget(self, deployment_id: str) -> None:
        with self._cond:
            for k in [k for k in self._entries if k[0] == deployment_id]:
                del self._entries[k]

    def take(self, key: Key, set_id: str) -> PartyBundle | None:
        """The cached part of ``set_id`` (waiting for a prefetch in flight), or None."""
        deadline = time.monotonic() + self._timeout
        with self._cond:
            while True:
                e = self._entries.get(key)
                if e is not None and set_id in e.sets:
                    bundle, _ = e.sets.pop(set_id)
                    self._cond.notify_all()
                    return bundle
                left = deadline - time.monotonic()
                if e is None or not e.inflight or left <= 0:
                    return None
                self._cond.wait(left)

    def take_claimed(self, key: Key, *, wait_s: float = 0.0) -> tuple[str, PartyBundle] | None:
        """Binder only: the oldest claimed set of ``key`` with this party's part, or None.

        Sets older than half the TTL are not used (a peer may drop its part of the same
        set a little earlier than this party); each set id is returned once. Holding no
        claimed set while a part of ``key`` is arriving (a prefetch in flight) or held
        unclaimed for less than ``_CLAIM_GRACE_S`` (a peer may not have confirmed its part
        yet; a peer that lost it never will), it waits up to ``wait_s`` for that set to be
        claimed: the set is already on its way, while the fallback (a
        dealer ``Bind`` that finds no set every party holds, then ``Fetch``) would move
        another one on the request path.
        """
        deadline = time.monotonic() + wait_s
        with self._cond:
            while True:
                now = time.monotonic()
                e = self._entries.get(key)
                while e is not None and e.claimed:
                    set_id, _ = e.claimed.popitem(last=False)
                    got = e.sets.pop(set_id, None)
                    if got is not None and now - got[1] <= self.ttl_s / 2:
                        self._cond.notify_all()
                        return set_id, got[0]
                left = deadline - now
                grace = e.landed + _CLAIM_GRACE_S - now if e is not None else 0.0
                if e is None or left <= 0 or not (e.inflight or (len(e.sets) > len(e.claimed) and grace > 0)):
                    return None
                self._cond.wait(left if e.inflight else min(left, grace))

    def drop_claimed(self) -> int:
        """Binder: forget every claimed set and its part (a peer may have lost its parts,
        e.g. it restarted); returns how many. Later requests bind through the dealer
        until new sets are claimed."""
        with self._cond:
            n = 0
            for e in self._entries.values():
                for sid in list(e.claimed):
                    e.sets.pop(sid, None)
                    n += 1
                e.claimed.clear()
            return n

    def wait_ready(self, keys: list[Key], *, timeout: float, depth: int | None = 1) -> bool:
        """Wait until this party can serve ``depth`` requests of every kind in ``keys``
        without a dealer call: it holds that many parts (the binder: claimed sets) of each,
        and (``depth`` > 1) no prefetch for them is in flight. ``depth`` None: each kind's
        full depth (:meth:`kind_depth`). False on timeout."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                ready = all((e := self._entries.get(k)) is not None
                            and len(e.claimed if self.binder else e.sets) >= (want := self.kind_depth(e) if depth is None else depth)
                            and (want == 1 or not e.inflight)
                            for k in keys)
                left = deadline - time.monotonic()
                if ready or left <= 0:
                    return ready
                self._cond.wait(min(left, 0.5))

    def held(self) -> int:
        with self._cond:
            return sum(len(e.sets) for e in self._entries.values())

    def _cached_bytes(self) -> int:
        return sum(b.memory_bytes for e in self._entries.values() for b, _ in e.sets.values())

    # ------------------------------------------------------------------ background
    def _next(self) -> Key | None:
        now = time.monotonic()
        for e in self._entries.values():
            for sid in [s for s, (_, t) in e.sets.items() if now - t > self.ttl_s]:
                del e.sets[sid]
                e.claimed.pop(sid, None)
        if self._cached_bytes() >= self.max_cached_bytes:
            return None
        recent = sorted(self._entries.items(), key=lambda kv: -kv[1].last_used)
        most = {key: self.kind_depth(e) for key, e in recent}
        for depth in range(1, max(most.values(), default=0) + 1):  # one set for every kind before a second for any
            for key, e in recent:
                if now - e.last_used < self.idle_s and len(e.sets) < depth <= most[key]:
                    if depth > self.depth and (self._serving or now - self._last_end < self.burst_idle_s):
                        return None  # burst stock: refilled only once requests pause
                    if depth > 1 and self._defer(now):
                        return None
                    self._deferred_since, self._released = None, False
                    return key
        self._deferred_since, self._released = None, False  # nothing left to hold back
        return None

    def kind_depth(self, e: _Entry) -> int:
        """How many parts of ``e``'s kind to hold: ``depth``, or, once a request of the kind
        came, more for small parts (a kind only pre-warmed by a deploy is not stocked)."""
        return burst_depth(self.depth, e.part_bytes, self.kind_bytes) if e.used else self.depth

    def _defer(self, now: float) -> bool:
        """Whether to hold back a non-urgent prefetch for a request in flight (lock held)."""
        if not self._yielding() or self._released:
            return False
        if self._deferred_since is None:
            self._deferred_since = now
        return now - self._deferred_since < self.max_defer_s

    def _unclaimed(self) -> list[Key]:
        """Binder: kinds with held sets it has not claimed yet (lock held)."""
        return [k for k, e in self._entries.items() if any(s not in e.claimed for s in e.sets)]

    def _claim(self, keys: list[Key]) -> bool:
        """Binder: ``Claim`` what the dealer can delegate for ``keys``; True if anything came."""
        got = False
        for key in keys:
            try:
                r = self._dealer.Claim(dealer_pb2.ClaimRequest(deployment_id=key[0], party_id=self.party_id,
                                                               batch=key[1], purpose=key[2]), timeout=self._timeout)
            except grpc.RpcError as exc:
                if self._log is not None:
                    self._log.warning("claim_failed", deployment=key[0], batch=key[1], error=exc.code().name)
                continue
            with self._cond:
                for e in self._entries.values():
                    for sid in r.void_ids:  # a peer restarted: its part is gone
                        e.sets.pop(sid, None)
                        e.claimed.pop(sid, None)
                e = self._entries.get(key)
                if e is not None:
                    for sid in r.set_ids:
                        if sid in e.sets:
                            e.claimed[sid] = None
                            got = True
                self._cond.notify_all()
        return got

    def _claim_step(self, pending: list[Key]) -> None:
        """Binder: claim now if the back-off allows (a peer may not have confirmed yet)."""
        now = time.monotonic()
        if now < self._next_claim:
            return
        self._claim_wait = _CLAIM_POLL_MIN_S if self._claim(pending) else min(2 * self._claim_wait, _CLAIM_POLL_MAX_S)
        self._next_claim = now + self._claim_wait

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._cond:
                key = self._next()
                pending = self._unclaimed() if self.binder else []
                if key is None and self._deferred_since is not None and not pending:  # a request is in flight
                    self._cond.wait(timeout=max(0.01, self._deferred_since + self.max_defer_s - time.monotonic()))
                    continue
                if key is None and not pending:
                    self._claim_wait, self._next_claim = _CLAIM_POLL_MIN_S, 0.0
                    claimed = [k for k, e in self._entries.items() if e.claimed] if self.binder else []
                    if not claimed:
                        self._cond.wait(timeout=0.5)
                        continue
            if key is None and not pending:  # binder, idle: collect void ids (a peer restarted)
                self._claim(claimed)
                self._stop.wait(_VOID_POLL_S)
                continue
            if pending:
                self._claim_step(pending)
            if key is None:
                self._stop.wait(max(0.0, self._next_claim - time.monotonic()))
                continue
            with self._cond:
                self._entries[key].inflight = True
                held = list(self._entries[key].sets)
                depth = self.kind_depth(self._entries[key])
            got = None
            try:
                req = dealer_pb2.PrefetchRequest(deployment_id=key[0], party_id=self.party_id, batch=key[1],
                                                 purpose=key[2], held=held, depth=depth)
                # background transfer of possibly large sets: the generous request timeout
                got = read_chunks(self._dealer.Prefetch(req, timeout=self._prefetch_timeout),
                                  max_bytes=self._max_bytes)
                if got is not None:
                    bundle = bundle_from_bytes(got[1], party_id=self.party_id)
                    self._prepare(key, bundle)
            except (grpc.RpcError, SecureInferError) as exc:
                got = None
                if self._log is not None:
                    detail = exc.code().name if isinstance(exc, grpc.RpcError) else str(exc)
                    self._log.warning("prefetch_failed", deployment=key[0], batch=key[1], error=detail)
                self._stop.wait(1.0)
            except Exception as exc:  # never let the prefetcher die silently
                got = None
                if self._log is not None:
                    self._log.error("prefetch_crashed", error=repr(exc))
                self._stop.wait(1.0)
            with self._cond:
                e = self._entries.get(key)
                if e is not None:
                    e.inflight = False
                    if got is not None:
                        e.sets[got[0]] = (bundle, time.monotonic())
                        e.part_bytes, e.landed = bundle.memory_bytes, time.monotonic()
                held = list(e.sets) if e is not None and got is not None else []
                self._cond.notify_all()
            if held:  # tell the dealer at once, so the set can be bound
                confirm = dealer_pb2.PrefetchRequest(deployment_id=key[0], party_id=self.party_id, batch=key[1],
                                                     purpose=key[2], held=held, confirm_only=True)
                try:
                    for _ in self._dealer.Prefetch(confirm, timeout=self._timeout):
                        pass  # a confirmation streams no chunks
                except grpc.RpcError:
                    pass  # the next prefetch call confirms them
                self._claim_wait, self._next_claim = _CLAIM_POLL_MIN_S, 0.0  # claimable soon
            if got is None:
                self._stop.wait(0.05)  # the dealer's pool is empty: let it refill

