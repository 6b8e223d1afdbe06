"""sched.lower_thread_priority: one thread's nice value, not the process's."""

from __future__ import annotations

import os
import sys
import threading

import pytest

from secureinfer.sched import lower_thread_priority


@pytest.mark.skipif(sys.platform != "linux", reason="per-thread nice values are a Linux feature")
def test_only_the_calling_thread_is_lowered() -> None:
    main_before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
    seen: dict[str, int | None] = {}

    def work() -> None:
        before = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())
        seen["new"] = lower_thread_priority(3)
        seen["expect"] = min(19, before + 3)
        seen["now"] = os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen["new"] == seen["expect"] == seen["now"]
    assert os.getpriority(os.PRIO_PROCESS, threading.get_native_id()) == main_before


def test_bad_increment_is_refused_and_zero_is_a_no_op() -> None:
    assert lower_thread_priority(0) is None
    for bad in (-1, 20, 1.5):
        with pytest.raises(ValueError, match="nice increment"):
            lower_thread_priority(bad)  # type: ignore[arg-type]


def test_burst_depth_sizes_stock_by_bytes_within_bounds() -> None:
    from secureinfer.sched import MAX_BURST_DEPTH, burst_depth

    assert burst_depth(2, 1_000, 10_000) == 10  # the budget holds 10 sets
    assert burst_depth(2, 1_000, 1 << 30) == MAX_BURST_DEPTH  # a count cap, whatever the sizes
    assert burst_depth(4, 300 << 20, 256 << 20) == 4  # big sets keep the configured count
    assert burst_depth(2, None, 10_000) == 2  # size not measured yet
    assert burst_depth(2, 1_000, 0) == 2  # no budget
    assert burst_depth(0, 1_000, 10_000) == 0  # pooling off stays off
