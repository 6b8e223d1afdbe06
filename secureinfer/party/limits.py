"""Limits of a party: batch buckets, per-caller concurrency and sliding-window rates.

* :func:`batch_bucket` rounds a batch up to one of few sizes (the top
  ``BUCKET_BITS`` significant bits), so a client cycling batch sizes meets at most
  ~4 kinds of dealer material per octave instead of one per size; padding costs at most
  25% more rows (1..8 are exact).
* :class:`ConcurrencyLimiter` caps the requests one caller has in flight.

:class:`RateLimiter` admits at most ``limit`` events per ``window_s`` seconds for each key
(e.g. ``(auditor, deployment)``); an event over the limit raises
:class:`~secureinfer.errors.ResourceExhaustedError` (gRPC RESOURCE_EXHAUSTED) saying when
the next one is allowed. The window is exact (a deque of event times per key), so a burst
at the end of one window and the start of the next cannot double the rate.

State is per process: a party restart forgets it, which only the operator controls. Cost:
O(1) amortized per event; memory O(limit) per active key.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Iterator
from contextlib import contextmanager

from secureinfer.errors import InvalidArgumentError, ResourceExhaustedError

__all__ = ["BUCKET_BITS", "MAX_PREWARM_BATCHES", "PREWARM_PARAMETER", "ConcurrencyLimiter", "RateLimiter", "batch_bucket",
           "prewarm_batches"]

BUCKET_BITS = 3


def batch_bucket(batch: int, *, bits: int = BUCKET_BITS) -> int:
    """The smallest bucket >= ``batch``: a number whose binary form has at most ``bits``
    significant bits (1..8 all, then 10, 12, 14, 16, 20, 24, 28, 32, 40, ...)."""
    if batch < 1:
        raise InvalidArgumentError(f"batch must be >= 1, got {batch}")
    shift = max(0, batch.bit_length() - bits)
    return -(-batch >> shift) << shift if shift else batch


#: deployment parameter: batch sizes whose dealer material is pooled from deploy time on
PREWARM_PARAMETER = "pool.batches"
MAX_PREWARM_BATCHES = 4


def prewarm_batches(parameters: dict[str, str], *, max_batch: int) -> list[int]:
    """Buckets of the batch sizes named by ``parameters["pool.batches"]`` (e.g. ``"1,32"``).

    Batch 1 is always pooled; this names further sizes so that the first request of that
    size after a deploy (or a party restart) finds material prefetched instead of waiting
    for the dealer to generate it on the request path. Raises InvalidArgumentError for
    anything but 1..``MAX_PREWARM_BATCHES`` integers in 1..``max_batch``.
    """
    raw = parameters.get(PREWARM_PARAMETER, "").strip()
    if not raw:
        return []
    out: list[int] = []
    for item in raw.split(","):
        try:
            b = int(item.strip())
        except ValueError:
            raise InvalidArgumentError(f"{PREWARM_PARAMETER}: {item.strip()!r} is not an integer batch size") from None
        if not 1 <= b <= max_batch:
            raise InvalidArgumentError(f"{PREWARM_PARAMETER}: batch {b} outside 1..{max_batch}")
        if batch_bucket(b) not in out:
            out.append(batch_bucket(b))
    if len(out) > MAX_PREWARM_BATCHES:
        raise InvalidArgumentError(f"{PREWARM_PARAMETER}: at most {MAX_PREWARM_BATCHES} batch sizes, got {len(out)}")
    return out


class ConcurrencyLimiter:
    """At most ``limit`` requests in flight per key; use :meth:`hold` as a context manager."""

    def __init__(self, *, limit: int, what: str) -> None:
        if limit < 1:
            raise InvalidArgumentError("a concurrency limit needs limit >= 1")
        self.limit = limit
        self.what = what
        self._inflight: dict[Hashable, int] = {}
        self._lock = threading.Lock()

    @contextmanager
    def hold(self, key: Hashable, *, who: str) -> Iterator[None]:
        with self._lock:
            n = self._inflight.get(key, 0)
            if n >= self.limit:
                raise ResourceExhaustedError(f"{who}: more than {self.limit} {self.what} in flight; retry later")
            self._inflight[key] = n + 1
        try:
            yield
        finally:
            with self._lock:
                left = self._inflight[key] - 1
                if left:
                    self._inflight[key] = left
                else:
                    del self._inflight[key]


class RateLimiter:
    """At most ``limit`` events per ``window_s`` seconds per key (thread-safe)."""

    def __init__(self, *, limit: int, window_s: float, what: str, clock: Callable[[], float] = time.monotonic) -> None:
        if limit < 1 or not window_s > 0:
            raise InvalidArgumentError("a rate limit needs limit >= 1 and a positive window")
        self.limit = limit
        self.window_s = window_s
        self.what = what
        self._clock = clock
        self._events: dict[Hashable, deque[float]] = {}
        self._lock = threading.Lock()

    def admit(self, key: Hashable, *, who: str) -> None:
        """Record one event for ``key`` or raise ``ResourceExhaustedError``."""
        now = self._clock()
        with self._lock:
            q = self._events.setdefault(key, deque())
            while q and now - q[0] >= self.window_s:
                q.popleft()
            if len(q) >= self.limit:
                wait = self.window_s - (now - q[0])
                raise ResourceExhaustedError(
                    f"{who}: more than {self.limit} {self.what} in {self.window_s:g} s; "
                    f"the next one is allowed in {wait:.0f} s"
                )
            q.append(now)
            for k in [k for k, v in self._events.items() if not v]:
                del self._events[k]
