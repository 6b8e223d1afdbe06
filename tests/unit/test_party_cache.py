"""The party's material cache yields to requests: no refill beside a request in flight
unless a kind ran dry, and never deferred past ``max_defer_s``."""

from __future__ import annotations

import time

from secureinfer.dealer.material import BundleBuilder
from secureinfer.party.material import MaterialCache


def _cache(**kw) -> MaterialCache:
    return MaterialCache(party_id=1, dealer=None, prepare=lambda k, b: None, rpc_timeout_s=1.0,  # type: ignore[arg-type]
                         max_bytes=1 << 20, depth=2, **kw)


KEY = ("d", 1, "logits")


def _holding_one(**kw) -> MaterialCache:
    """A cache of depth 2 that wants KEY and holds one set of it."""
    cache = _cache(**kw)
    cache.want(KEY)
    cache._entries[KEY].sets["s1"] = (BundleBuilder(2).party_bundle(1), time.monotonic())
    return cache


def test_refill_waits_for_the_request_in_flight_but_an_empty_kind_does_not() -> None:
    cache = _holding_one(max_defer_s=30.0)
    full, dry = KEY, ("d", 32, "logits")
    assert cache._next() == full  # idle: top the kind up to depth 2
    with cache.serving():
        assert cache._next() is None  # a request is running: the second set can wait
        cache.want(dry)
        assert cache._next() == dry  # no set at all for this kind: fetch at once
        cache._entries[dry].sets["s2"] = (BundleBuilder(2).party_bundle(1), time.monotonic())
        assert cache._next() is None
    assert cache._next() in (full, dry)  # the request ended


def test_refill_is_deferred_at_most_max_defer_s() -> None:
    cache = _holding_one(max_defer_s=0.05)
    with cache.serving():
        assert cache._next() is None
        time.sleep(0.06)
        assert cache._next() == KEY  # a steady stream of requests does not starve the cache


def test_held_back_refill_starts_when_the_request_ends_even_if_another_begins() -> None:
    cache = _holding_one(max_defer_s=30.0)
    with cache.serving():
        assert cache._next() is None
    with cache.serving():  # back-to-back: the next request began before the thread woke
        assert cache._next() == KEY  # released by the end of the request it waited for
    with cache.serving():
        assert cache._next() is None  # nothing was held back when the last request ended: held again


def test_wait_ready_with_depth_waits_for_a_settled_cache() -> None:
    cache = _cache()
    key = ("d", 1, "logits")
    cache.want(key)
    e = cache._entries[key]
    e.sets["s1"] = (BundleBuilder(2).party_bundle(1), time.monotonic())
    assert cache.wait_ready([key], timeout=0.01)
    assert not cache.wait_ready([key], timeout=0.01, depth=2)
    e.sets["s2"] = (BundleBuilder(2).party_bundle(1), time.monotonic())
    e.inflight = True  # a third part is still arriving: not settled
    assert not cache.wait_ready([key], timeout=0.01, depth=2)
    e.inflight = False
    assert cache.wait_ready([key], timeout=0.01, depth=2)
