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


def _held(cache: MaterialCache, key, n: int, *, size: int = 1000) -> None:
    e = cache._entries[key]
    for i in range(n):
        e.sets[f"s{len(e.sets) + 1}"] = (BundleBuilder(2).party_bundle(1), time.monotonic())
    e.part_bytes = size


def test_small_kinds_in_use_are_stocked_deeper_and_refilled_only_in_a_pause() -> None:
    cache = _cache(kind_bytes=10_000, burst_idle_s=0.05, max_defer_s=30.0)
    cache.want(KEY)  # a deploy's pre-warm: not stocked beyond depth 2
    _held(cache, KEY, 2)
    e = cache._entries[KEY]
    assert cache.kind_depth(e) == 2 and cache._next() is None
    cache.want(KEY, request=True)  # a request of this kind came: 10,000 / 1,000 = 10 parts
    assert cache.kind_depth(e) == 10
    assert cache._next() == KEY  # idle: stock up
    with cache.serving():
        assert cache._next() is None  # no stock refill beside a request
    assert cache._next() is None  # ... nor right after one (a burst may go on)
    time.sleep(0.06)
    assert cache._next() == KEY  # a pause: refill the stock
    _held(cache, KEY, 8)
    assert cache._next() is None  # full at 10
    e.part_bytes = 10_000  # a big part: no deeper than depth
    assert cache.kind_depth(e) == 2
    assert MaterialCache(party_id=1, dealer=None, prepare=lambda k, b: None, rpc_timeout_s=1.0,  # type: ignore[arg-type]
                         max_bytes=1 << 20, depth=2).kind_depth(e) == 2  # no byte budget: depth


def test_parts_below_depth_are_still_refilled_during_a_burst() -> None:
    cache = _cache(kind_bytes=10_000, burst_idle_s=30.0, max_defer_s=30.0)
    cache.want(KEY, request=True)
    _held(cache, KEY, 1)
    with cache.serving():
        assert cache._next() is None  # depth 2 is held back by the request (as before)...
    with cache.serving():
        assert cache._next() == KEY  # ... and released when it ends; the stock above 2 is not


def test_binder_waits_for_a_set_on_its_way_instead_of_binding_another() -> None:
    import threading

    cache = MaterialCache(party_id=0, dealer=None, prepare=lambda k, b: None, rpc_timeout_s=1.0,  # type: ignore[arg-type]
                          max_bytes=1 << 20, depth=2, binder=True)
    cache.want(KEY, request=True)
    e = cache._entries[KEY]
    assert cache.take_claimed(KEY, wait_s=5.0) is None  # nothing on its way: no wait
    e.inflight = True

    def lands() -> None:
        time.sleep(0.05)
        with cache._cond:
            e.inflight = False
            e.sets["s9"] = (BundleBuilder(2).party_bundle(0), time.monotonic())
            e.landed = time.monotonic()
            cache._cond.notify_all()
        time.sleep(0.05)
        with cache._cond:  # the peers confirmed it: claimed
            e.claimed["s9"] = None
            cache._cond.notify_all()

    t0 = time.monotonic()
    threading.Thread(target=lands).start()
    got = cache.take_claimed(KEY, wait_s=5.0)
    assert got is not None and got[0] == "s9" and time.monotonic() - t0 < 2.0
    # a part held unclaimed (a peer that lost it never confirms): waits the grace only
    e.sets["s10"] = (BundleBuilder(2).party_bundle(0), time.monotonic())
    e.landed = time.monotonic() - 10.0
    t0 = time.monotonic()
    assert cache.take_claimed(KEY, wait_s=5.0) is None and time.monotonic() - t0 < 0.1


def test_preparation_yields_to_a_request_unless_the_kind_is_empty() -> None:
    import threading

    cache = _holding_one(max_defer_s=5.0)
    t0 = time.monotonic()
    cache.yield_to_requests(KEY)  # idle: no wait
    assert time.monotonic() - t0 < 0.05
    ended = threading.Event()
    with cache.serving():
        def end_soon() -> None:
            time.sleep(0.15)
            ended.set()

        threading.Thread(target=end_soon).start()
        empty = ("d", 32, "logits")
        cache.want(empty)
        t0 = time.monotonic()
        cache.yield_to_requests(empty)  # no set of that kind: a request may wait for this one
        assert time.monotonic() - t0 < 0.05
        ended.wait()
    # the request above ended before this thread waited: a fresh request in flight holds it
    done = []

    def prepare() -> None:
        cache.yield_to_requests(KEY)
        done.append(time.monotonic())

    with cache.serving():
        t = threading.Thread(target=prepare)
        t0 = time.monotonic()
        t.start()
        time.sleep(0.2)
        assert not done  # held while the request runs
    t.join(timeout=2)
    assert done and done[0] - t0 >= 0.2


def test_preparation_waits_at_most_max_defer_s() -> None:
    cache = _holding_one(max_defer_s=0.1)
    with cache.serving():
        t0 = time.monotonic()
        cache.yield_to_requests(KEY)
        assert 0.09 <= time.monotonic() - t0 < 1.0


def test_nothing_yields_while_a_request_waits_for_its_material() -> None:
    """A request waiting for material (the binder for a claim, a peer for the binder's
    choice) may be waiting for the very set being prepared: no yielding then."""
    import threading

    cache = _holding_one(max_defer_s=30.0)
    done = []

    def prepare() -> None:
        cache.yield_to_requests(KEY)
        done.append(time.monotonic())

    with cache.serving():
        assert cache._next() is None  # computing: the refill waits
        t = threading.Thread(target=prepare)
        t.start()
        time.sleep(0.1)
        assert not done  # held while the request computes
        with cache.awaiting():  # the request (or another) now waits for material
            t.join(timeout=2)
            assert done  # released at once
            t0 = time.monotonic()
            cache.yield_to_requests(KEY)
            assert time.monotonic() - t0 < 0.05
            assert cache._next() == KEY  # and the refill is not held back either
        assert cache._next() is None
