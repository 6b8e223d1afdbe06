"""Sliding-window rate limits of a party (per caller and key), in memory.

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
from collections.abc import Callable, Hashable

from secureinfer.errors import InvalidArgumentError, ResourceExhaustedError

__all__ = ["RateLimiter"]


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
