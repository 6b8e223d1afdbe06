"""Thread scheduling: background work yields the CPU to requests.

The dealer's pool refill and a party's material prefetch are throughput work; a request's
online phase is latency work. Where they share cores (a small host, or the local demo
cluster where dealer and parties share one machine) the scheduler should prefer the
request. :func:`lower_thread_priority` raises the calling thread's nice value (Linux
schedules threads as tasks, so ``setpriority(PRIO_PROCESS, native thread id)`` changes
that thread alone; raising it needs no privilege). Elsewhere it does nothing.
"""

from __future__ import annotations

import os
import threading

__all__ = ["MAX_NICE", "lower_thread_priority"]

MAX_NICE = 19


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
