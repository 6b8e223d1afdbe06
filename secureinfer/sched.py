"""Thread scheduling: background work yields the CPU to requests.

The dealer's pool refill and a party's material prefetch are throughput work; a request's
online phase is latency work. Where they share cores (a small host, or the local demo
cluster where dealer and parties share one machine) the scheduler should prefer the
request. :func:`lower_thread_priority` raises the calling thread's nice value (Linux
schedules threads as tasks, so ``setpriority(PRIO_PROCESS, native thread id)`` changes
that thread alone; raising it needs no privilege). Elsewhere it does nothing.

How much throughput work is done ahead is the other half: :func:`burst_depth` sizes the
dealer's pools and the parties' caches of material by bytes as well as by count, so a
kind of request with small sets (an MLP at batch 1: ~0.2 MB a party) is stocked for a
burst of back-to-back requests, while a kind with sets of hundreds of MB keeps the small
count it is configured with.

The cyclic garbage collector is the third: a full collection walks every tracked object
of the process, and a server that has imported torch, grpc and protobuf holds ~180k at
start (full collections measured at 11-99 ms in such a process on the 2-core bench host), landing inside
whichever request allocates at that moment. :func:`freeze_heap` (``gc.freeze`` after one
collection, once a server has started) takes the start-up objects out of every later
collection; :func:`gc_seconds` (after :func:`track_gc`) lets a server report how much of
a request went to collections.
"""

from __future__ import annotations

import gc
import os
import threading
import time
from typing import Any

__all__ = ["MAX_BURST_DEPTH", "MAX_NICE", "burst_depth", "freeze_heap", "gc_seconds", "lower_thread_priority",
           "track_gc"]

MAX_NICE = 19
#: the most sets of one kind a byte budget stocks ahead (a count, whatever the sizes)
MAX_BURST_DEPTH = 32


def burst_depth(depth: int, set_bytes: int | None, kind_bytes: int, *, cap: int = MAX_BURST_DEPTH) -> int:
    """How many sets of one kind to hold ahead: the configured ``depth``, or more when
    ``kind_bytes`` holds more sets of ``set_bytes`` each (at most ``cap``; never fewer
    than ``depth``). ``set_bytes`` None (not measured yet) or a zero budget: ``depth``."""
    if depth <= 0 or not set_bytes or set_bytes <= 0 or kind_bytes <= 0:
        return max(0, depth)
    return max(depth, min(cap, kind_bytes // set_bytes))


def lower_thread_priority(increment: int) -> int | None:
    """Add ``increment`` (0..19) to the calling thread's nice value; the new value, or
    None where the platform has no per-thread priority or refuses it."""
    if not isinstance(increment, int) or not 0 <= increment <= MAX_NICE:
        raise ValueError(f"nice increment must be an int in 0..{MAX_NICE}, got {increment!r}")
    if increment == 0 or not hasattr(os, "setpriority") or not os.uname().sysname == "Linux":
        return None
    tid = threading.get_native_id()
    try:
        value = min(MAX_NICE, os.getpriority(os.PRIO_PROCESS, tid) + increment)
        os.setpriority(os.PRIO_PROCESS, tid, value)
    except OSError:
        return None
    return value


_gc_total = [0.0]  # seconds spent in collections since track_gc(), all threads
_gc_start = threading.local()


def _on_gc(phase: str, info: dict[str, Any]) -> None:
    if phase == "start":
        _gc_start.t = time.perf_counter()
    elif (t := getattr(_gc_start, "t", None)) is not None:
        _gc_total[0] += time.perf_counter() - t
        _gc_start.t = None


def track_gc() -> None:
    """Start accounting the time spent in garbage collections (idempotent; ~1 us a collection)."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)


def gc_seconds() -> float:
    """Seconds this process spent in garbage collections since :func:`track_gc` (0 before)."""
    return _gc_total[0]


def freeze_heap() -> int:
    """Collect once, then move every object alive now to the permanent generation
    (``gc.freeze``): later collections skip them. For a server once it has started (the
    imports and the start-up state stay alive for the process's life anyway; frozen
    objects are still freed by reference counting, only cycles among them are never
    collected). Returns the number of objects frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
