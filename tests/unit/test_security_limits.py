"""Security regression (issue 14, finding 6): client-chosen batch sizes cannot exhaust
dealer or party memory — global pool budget, per-request cap, few pooled kinds, buckets."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

from secureinfer.dealer.core import DealerCore
from secureinfer.errors import InvalidArgumentError, ResourceExhaustedError
from secureinfer.graph.torch_import import from_torch
from secureinfer.party.limits import ConcurrencyLimiter, batch_bucket, prewarm_batches
from secureinfer.party.material import MaterialCache


def _graph_json() -> bytes:
    torch.manual_seed(0)  # test weights, not secret
    return from_torch(nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 4)), (1, 32)).public_json()


def _register(core: DealerCore, dep: str = "d") -> None:
    g = _graph_json()
    for p in (0, 1):
        core.register(dep, g, party_id=p, n_parties=2)


def test_batch_buckets_are_few_and_waste_at_most_a_quarter() -> None:
    buckets = {batch_bucket(b) for b in range(1, 4097)}
    assert len(buckets) <= 48
    for b in range(1, 4097):
        k = batch_bucket(b)
        assert b <= k <= max(b, 1.25 * b) and batch_bucket(k) == k
    assert [batch_bucket(b) for b in (1, 8, 9, 32, 100)] == [1, 8, 10, 32, 112]
    with pytest.raises(InvalidArgumentError):
        batch_bucket(0)


def test_a_batch_over_the_per_request_cap_is_refused_before_generation() -> None:
    core = DealerCore(master_key=os.urandom(32), pool_size=0, max_set_bytes=4 << 20)
    _register(core)
    with pytest.raises(ResourceExhaustedError, match=r"at most \d+") as info:
        core.bind("d", "s-big", party_id=0, batch=4096, purpose="logits")
    limit = int(str(info.value).rsplit("at most ", 1)[1])
    assert core.counters["refused_too_large"] == 1
    assert core.counters["sets_generated"] == 1  # only the batch-1 measurement, never the 4096 set
    core.fetch("d", "s-ok", party_id=0, batch=limit, purpose="logits")  # the advertised limit fits


def test_pools_stay_within_one_global_byte_budget() -> None:
    core = DealerCore(master_key=os.urandom(32), pool_size=4, max_pool_bytes=2 << 20, max_wanted_per_model=64)
    for dep in ("a", "b"):
        _register(core, dep)
    for dep in ("a", "b"):  # measure every kind, then let the pool thread work
        for batch in (1, 2, 4, 8, 16, 32, 64):
            core.fetch(dep, f"{dep}-{batch}", party_id=0, batch=batch, purpose="logits")
            core.prefetch(dep, party_id=0, batch=batch, purpose="logits", confirm_only=True)
    core.start()
    try:
        time.sleep(3.0)
        with core._lock:
            pooled = core._pooled_bytes()
            largest = max(max(m.set_bytes.values()) for m in core._models.values())
        assert 0 < pooled <= 2 << 20, pooled
        # the budget is used, not left idle: no set that would still fit was skipped
        assert pooled > (2 << 20) - 2 * largest
    finally:
        core.stop()


def test_only_the_most_recent_kinds_are_pooled() -> None:
    core = DealerCore(master_key=os.urandom(32), pool_size=1, max_wanted_per_model=3)
    _register(core)
    for batch in range(1, 12):
        core.prefetch("d", party_id=0, batch=batch, purpose="logits", confirm_only=True)
    m = core._models["d"]
    assert sorted(b for b, _ in m.wanted) == [9, 10, 11]


def test_party_cache_keeps_few_kinds_and_a_byte_cap() -> None:
    cache = MaterialCache(party_id=0, dealer=None, prepare=lambda k, b: None, rpc_timeout_s=1.0,  # type: ignore[arg-type]
                          max_bytes=1 << 20, max_keys=4, max_cached_bytes=1)
    for batch in range(1, 30):
        cache.want(("d", batch, "logits"))
    assert len(cache._entries) == 4 and ("d", 29, "logits") in cache._entries
    assert cache._next() is not None  # nothing cached yet: below the byte cap


def test_concurrency_limit_per_caller() -> None:
    lim = ConcurrencyLimiter(limit=2, what="requests")
    with lim.hold("c", who="p"), lim.hold("c", who="p"):
        with pytest.raises(ResourceExhaustedError, match="more than 2 requests"):
            with lim.hold("c", who="p"):
                pass
        with lim.hold("other", who="p"):
            pass
    with lim.hold("c", who="p"):  # released slots are free again
        pass


def test_prewarm_batches_parameter_is_validated() -> None:
    assert prewarm_batches({}, max_batch=4096) == []
    assert prewarm_batches({"pool.batches": " 32, 9,32,10"}, max_batch=4096) == [32, 10]  # buckets, once each
    for bad in ("x", "0", "5000", "1,2,3,4,5", "3,,4"):
        with pytest.raises(InvalidArgumentError, match="pool.batches"):
            prewarm_batches({"pool.batches": bad}, max_batch=4096)
