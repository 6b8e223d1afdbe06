"""Dealer core (session binding, one-time material, re-registration) and the party store."""

from __future__ import annotations

import os
import time

import pytest
import torch
from torch import nn

from secureinfer.dealer.core import DealerCore
from secureinfer.dealer.wire import bundle_from_bytes, bundle_to_bytes
from secureinfer.errors import (
    AlreadyExistsError,
    IntegrityError,
    InvalidArgumentError,
    NotFoundError,
    ProtocolError,
    SecureInferError,
)
from secureinfer.graph.torch_import import from_torch
from secureinfer.party.store import ModelRecord, ModelStore


def _graph_json() -> bytes:
    torch.manual_seed(0)
    return from_torch(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), (1, 6)).public_json()


def _fetch(core: DealerCore, dep: str, sess: str, party: int, *, batch: int = 3, purpose: str = "logits"):
    set_id, data = core.fetch(dep, sess, party_id=party, batch=batch, purpose=purpose)
    return set_id, bundle_from_bytes(data, party_id=party)


def test_material_is_served_once_per_party_and_session() -> None:
    core = DealerCore(master_key=os.urandom(32), pool_size=0)
    g = _graph_json()
    s0 = core.register("dep1", g, party_id=0, n_parties=2).seed
    s1 = core.register("dep1", g, party_id=1, n_parties=2).seed
    assert s0 != s1
    id0, b0 = _fetch(core, "dep1", "sess", 0)
    id1, b1 = _fetch(core, "dep1", "sess", 1)
    assert id0 == id1
    assert b0.seed != b1.seed and b0.tensors and not b1.tensors  # corrections only for party 0
    assert b0.blobs.keys() == b1.blobs.keys()  # both hold their own DCF keys
    _fetch(core, "dep1", "sess2", 0)
    with pytest.raises(ProtocolError, match="already served"):
        _fetch(core, "dep1", "sess2", 0)
    with pytest.raises(ProtocolError):  # a finished session id cannot be reused
        _fetch(core, "dep1", "sess", 0)
    with pytest.raises(NotFoundError):
        core.fetch("nope", "s", party_id=0, batch=1, purpose="logits")
    with pytest.raises(InvalidArgumentError):
        core.fetch("dep1", "s", party_id=0, batch=0, purpose="logits")


def test_prefetch_then_bind_uses_a_set_every_party_holds() -> None:
    core = DealerCore(master_key=os.urandom(32), pool_size=2)
    g = _graph_json()
    core.register("d", g, party_id=0, n_parties=2)
    assert core.bind("d", "s1", party_id=0, batch=1, purpose="logits") == ""  # nothing prefetched yet
    core.start()
    try:
        import time

        deadline = time.monotonic() + 20
        got0 = got1 = None
        while (got0 is None or got1 is None) and time.monotonic() < deadline:
            got0 = got0 or core.prefetch("d", party_id=0, batch=1, purpose="logits")
            got1 = got1 or core.prefetch("d", party_id=1, batch=1, purpose="logits")
            time.sleep(0.02)
        assert got0 is not None and got1 is not None and got0[0] == got1[0]
        # handed out is not yet held: nothing is bound to it until both parties confirm
        assert core.bind("d", "s-early", party_id=0, batch=1, purpose="logits") == ""
        core.prefetch("d", party_id=0, batch=1, purpose="logits", held=[got0[0]])
        core.prefetch("d", party_id=1, batch=1, purpose="logits", held=[got1[0]])
        assert core.bind("d", "s2", party_id=1, batch=1, purpose="logits") == got0[0]
        assert core.bind("d", "s2", party_id=0, batch=1, purpose="logits") == got0[0]
        with pytest.raises(ProtocolError):
            core.bind("d", "s2", party_id=0, batch=1, purpose="logits")
        # the bound set's parts were handed out by prefetch: fetch cannot serve them again
        with pytest.raises(ProtocolError):
            core.fetch("d", "s2", party_id=0, batch=1, purpose="logits")
    finally:
        core.stop()


def test_model_seeds_survive_dealer_restart_and_graph_must_match() -> None:
    key = os.urandom(32)
    g = _graph_json()
    first = DealerCore(master_key=key, pool_size=0).register("d", g, party_id=1, n_parties=2)
    # a restarted dealer re-derives the seeds from the nonce the party stored (issue 14,
    # finding 4: never from the deployment id alone)
    again = DealerCore(master_key=key, pool_size=0).register("d", g, party_id=1, n_parties=2, nonce=first.nonce)
    assert again.seed == first.seed and again.nonce == first.nonce
    core = DealerCore(master_key=key, pool_size=0)
    core.register("d", g, party_id=0, n_parties=2)
    other = from_torch(nn.Sequential(nn.Linear(6, 2)), (1, 6)).public_json()
    with pytest.raises(InvalidArgumentError):
        core.register("d", other, party_id=1, n_parties=2)


def test_bundle_wire_roundtrip_and_malformed() -> None:
    core = DealerCore(master_key=os.urandom(32), pool_size=0)
    core.register("d", _graph_json(), party_id=0, n_parties=2)
    _, data = core.fetch("d", "s", party_id=0, batch=2, purpose="argmax")
    b = bundle_from_bytes(data, party_id=0)
    back = bundle_from_bytes(bundle_to_bytes(b), party_id=0)
    assert back.seed == b.seed and back.blobs == b.blobs
    assert all(torch.equal(back.tensors[k], v) for k, v in b.tensors.items())
    with pytest.raises(ProtocolError):
        bundle_from_bytes(b"\x08garbage", party_id=0)


def _record(version: str = "1") -> ModelRecord:
    return ModelRecord("m", version, "dep", ModelStore.now(), b"{}", os.urandom(32),
                       {"w": torch.arange(6).reshape(2, 3)}, {"fc": torch.ones(3, 2, dtype=torch.int64)})


def test_store_encrypts_detects_tampering_and_refuses_silent_replace(tmp_path) -> None:
    key = tmp_path / "k"
    key.write_bytes(os.urandom(32))
    st = ModelStore(tmp_path / "data", key)
    st.save(_record(), replace=False)
    path = tmp_path / "data" / "models" / "m" / "1.sim"
    assert b"dep" in path.read_bytes() and torch.arange(6).numpy().tobytes() not in path.read_bytes()
    back = st.load("m", "1")
    assert torch.equal(back.shares["w"], torch.arange(6).reshape(2, 3))
    with pytest.raises(AlreadyExistsError):
        st.save(_record(), replace=False)
    raw = bytearray(path.read_bytes())
    raw[-1] ^= 1
    path.write_bytes(bytes(raw))
    with pytest.raises(IntegrityError):
        st.load("m", "1")
    wrong = tmp_path / "k2"
    wrong.write_bytes(os.urandom(32))
    with pytest.raises(NotFoundError):
        ModelStore(tmp_path / "data", wrong).load("m", "2")
    with pytest.raises(InvalidArgumentError):
        st.load("../etc", "1")


def test_store_full_disk_keeps_previous_version(tmp_path, monkeypatch) -> None:
    key = tmp_path / "k"
    key.write_bytes(os.urandom(32))
    st = ModelStore(tmp_path / "data", key)
    st.save(_record(), replace=False)

    def full(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(SecureInferError, match="No space left"):
        st.save(_record(), replace=True)
    monkeypatch.undo()
    assert st.load("m", "1").deployment_id == "dep"
    assert not list((tmp_path / "data" / "models" / "m").glob("*.tmp*"))


def test_bind_after_a_fetch_decision_never_switches_sets() -> None:
    """Party 0 finds nothing prefetched and will fetch; a set that becomes ready before
    party 1 binds must not be bound under party 0 (regression: 'already served')."""
    core = DealerCore(master_key=os.urandom(32), pool_size=0)
    core.register("d", _graph_json(), party_id=0, n_parties=2)
    assert core.bind("d", "s", party_id=0, batch=1, purpose="logits") == ""
    core._pools[("d", 1, "logits")] = __import__("collections").OrderedDict()
    ready = core._generate(core._models["d"], 1, "logits")
    ready.delivered.update({0, 1})
    ready.confirmed.update({0, 1})
    core._pools[("d", 1, "logits")][ready.set_id] = ready
    assert core.bind("d", "s", party_id=1, batch=1, purpose="logits") == ""
    id0, _ = core.fetch("d", "s", party_id=0, batch=1, purpose="logits")
    id1, _ = core.fetch("d", "s", party_id=1, batch=1, purpose="logits")
    assert id0 == id1 != ready.set_id


def _prefetch_both(core: DealerCore, dep: str, *, batch: int = 1) -> str:
    """Both parties take their part of the next pooled set and confirm it; its id."""
    import time

    deadline = time.monotonic() + 20
    got0 = got1 = None
    while (got0 is None or got1 is None) and time.monotonic() < deadline:
        got0 = got0 or core.prefetch(dep, party_id=0, batch=batch, purpose="logits")
        got1 = got1 or core.prefetch(dep, party_id=1, batch=batch, purpose="logits")
        time.sleep(0.02)
    assert got0 is not None and got1 is not None and got0[0] == got1[0]
    core.prefetch(dep, party_id=0, batch=batch, purpose="logits", held=[got0[0]], confirm_only=True)
    return got0[0]


def test_claimed_sets_are_ready_sets_delegated_once_and_never_bound_again() -> None:
    from secureinfer.dealer.core import BINDER
    from secureinfer.errors import PermissionDeniedError

    assert BINDER == 0
    core = DealerCore(master_key=os.urandom(32), pool_size=1)
    g = _graph_json()
    core.register("d", g, party_id=0, n_parties=2)
    core.register("d", g, party_id=1, n_parties=2)
    core.start()
    try:
        sid = _prefetch_both(core, "d")
        assert core.claim("d", party_id=0, batch=1, purpose="logits") == ([], [])  # party 1 has not confirmed
        core.prefetch("d", party_id=1, batch=1, purpose="logits", held=[sid], confirm_only=True)
        with pytest.raises(PermissionDeniedError, match="only party 0"):
            core.claim("d", party_id=1, batch=1, purpose="logits")
        assert core.claim("d", party_id=0, batch=1, purpose="logits") == ([sid], [])
        assert core.claim("d", party_id=0, batch=1, purpose="logits") == ([], [])  # delegated once
        # the dealer never binds a claimed set: a Bind falls back to a fresh set
        assert core.bind("d", "s1", party_id=0, batch=1, purpose="logits") == ""
        assert core.counters["sets_claimed"] == 1
        # a party that held a part restarts: the binder learns the claimed set is void
        sid2 = _prefetch_both(core, "d")
        core.prefetch("d", party_id=1, batch=1, purpose="logits", held=[sid2], confirm_only=True)
        assert core.claim("d", party_id=0, batch=1, purpose="logits") == ([sid2], [])
        assert core.forget_party(1) >= 1
        assert core.claim("d", party_id=0, batch=1, purpose="logits") == ([], sorted([sid, sid2]))  # both held by 1
        assert core.claim("d", party_id=0, batch=1, purpose="logits") == ([], [])
    finally:
        core.stop()


def test_stats_gauges_track_generation_and_pool(monkeypatch) -> None:
    import threading

    from secureinfer.dealer import generation as gen_mod

    core = DealerCore(master_key=os.urandom(32), pool_size=0)
    g = _graph_json()
    core.register("d", g, party_id=0, n_parties=2)
    core.register("d", g, party_id=1, n_parties=2)
    assert core.stats()["generating"] == 0 and core.stats()["pooled_sets"] == 0
    entered, release = threading.Event(), threading.Event()
    real = gen_mod.generate_request_material

    def slow(*args, **kwargs):
        entered.set()
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(gen_mod, "generate_request_material", slow)
    th = threading.Thread(target=core.fetch, args=("d", "s"), kwargs={"party_id": 0, "batch": 1, "purpose": "logits"})
    th.start()
    assert entered.wait(10)
    during = core.stats()
    release.set()
    th.join(10)
    after = core.stats()
    assert during["generating"] == 1 and during["sets_generated"] == 0
    assert after["generating"] == 0 and after["sets_generated"] == 1
    assert {"pooled_sets", "pooled_bytes", "claimed_sets"} <= after.keys()


def test_bind_waits_for_the_set_the_filler_is_generating(monkeypatch) -> None:
    import threading

    from secureinfer.dealer import generation as gen_mod

    core = DealerCore(master_key=os.urandom(32), pool_size=1)
    g = _graph_json()
    entered, release = threading.Event(), threading.Event()
    real = gen_mod.generate_request_material
    calls: list[int] = []

    def slow(*args, **kwargs):
        calls.append(1)
        entered.set()
        release.wait(10)
        return real(*args, **kwargs)

    monkeypatch.setattr(gen_mod, "generate_request_material", slow)
    core.register("d", g, party_id=0, n_parties=2)
    core.register("d", g, party_id=1, n_parties=2)
    core.start()
    try:
        assert entered.wait(10)  # the filler is generating the (1, logits) set
        got: list = []
        th = threading.Thread(target=lambda: got.append(_fetch(core, "d", "s", 0, batch=1, purpose="logits")))
        th.start()
        th.join(0.3)
        assert th.is_alive() and len(calls) == 1  # waiting for the filler's set, not generating a second
        release.set()
        th.join(10)
        assert got and core.stats()["binds_fallback"] == 1
        assert all(got[0][0] not in pool for pool in core._pools.values())  # the set left the pool
    finally:
        release.set()
        core.stop()


def test_a_kind_that_fails_to_generate_does_not_stop_the_pool(monkeypatch) -> None:
    import time

    from secureinfer.dealer import generation as gen_mod

    core = DealerCore(master_key=os.urandom(32), pool_size=3, pool_nice=5)
    real = gen_mod.generate_request_material

    def flaky(plan, *args, **kwargs):
        if plan.batch == 2:
            raise RuntimeError("cannot generate this kind")
        return real(plan, *args, **kwargs)

    monkeypatch.setattr(gen_mod, "generate_request_material", flaky)
    g = _graph_json()
    core.register("d", g, party_id=0, n_parties=2)
    core.register("d", g, party_id=1, n_parties=2)
    with core._lock:
        core._models["d"].wanted[(2, "logits")] = time.monotonic()
    core.start()
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and len(core._pools.get(("d", 1, "logits"), {})) < 3:
            time.sleep(0.05)
        assert len(core._pools[("d", 1, "logits")]) == 3  # both fillers kept working
        assert core.stats()["refill_failed"] >= 1
        assert all(t.is_alive() for t in core._threads)
        names = {t.name for t in core._threads}
        assert names == {"dealer-pool", "dealer-pool-deep"}
        if hasattr(os, "getpriority"):
            deep = next(t for t in core._threads if t.name == "dealer-pool-deep")
            first = next(t for t in core._threads if t.name == "dealer-pool")
            assert os.getpriority(os.PRIO_PROCESS, deep.native_id) > os.getpriority(os.PRIO_PROCESS, first.native_id)
    finally:
        core.stop()
    with pytest.raises(ValueError, match="pool_nice"):
        DealerCore(master_key=os.urandom(32), pool_nice=20)


def test_prefetched_set_expiry_counts_from_confirmation_not_creation() -> None:
    from secureinfer.dealer.core import _Set

    s = _Set("s", [b"a", b"b"], created=0.0)
    assert not s.expired(1000.0, 60.0)  # never handed out: pooled sets do not expire here
    s.delivered.add(0)
    s.last_delivery = 950.0  # party 0's part is still crossing a slow link
    assert not s.expired(1000.0, 60.0)  # created 1000 s ago, but handed out 50 s ago
    assert s.expired(1011.0, 60.0)  # nobody confirmed for 61 s: the party is gone
    s.confirmed.add(0)
    s.first_confirmed = 1005.0
    assert not s.expired(1011.0, 60.0) and s.expired(1066.0, 60.0)  # parties drop parts later than the dealer stops binding them


def test_pool_grows_to_the_parties_cache_depth_for_small_sets_in_use() -> None:
    core = DealerCore(master_key=os.urandom(32), pool_size=2, pool_kind_bytes=1 << 30)
    g = _graph_json()
    for p in (0, 1):
        core.register("d", g, party_id=p, n_parties=2)
    core.prefetch("d", party_id=0, batch=1, purpose="logits")  # wanted; no hint yet
    m = core._models["d"]
    m.set_bytes[(1, "logits")] = 1000
    assert core.kind_depth(m, 1, "logits", 1000) == 2
    core.prefetch("d", party_id=1, batch=1, purpose="logits", depth=12)  # a party caches 12 of them
    assert core.kind_depth(m, 1, "logits", 1000) == 12
    assert core.kind_depth(m, 1, "logits", 600 << 20) == 2  # sets too big for pool_kind_bytes
    core.prefetch("d", party_id=1, batch=1, purpose="logits", depth=10_000)
    assert core.kind_depth(m, 1, "logits", 1000) == 32  # capped
    core.pool_kind_bytes = 0
    assert core.kind_depth(m, 1, "logits", 1000) == 2  # no budget: pool_size
    core.pool_kind_bytes = 1 << 30
    core.start()
    try:  # the deep filler tops the pool up to the hint
        deadline = time.monotonic() + 30
        while len(core._pools.get(("d", 1, "logits"), {})) < 32 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(core._pools[("d", 1, "logits")]) == 32
    finally:
        core.stop()


def test_pool_pending_counts_a_deployments_unfilled_pools_until_they_are_full() -> None:
    core = DealerCore(master_key=os.urandom(32), pool_size=3)
    g = _graph_json()
    for dep in ("d", "other"):
        for p in (0, 1):
            core.register(dep, g, party_id=p, n_parties=2)
    assert core.pool_pending("d") == 1  # batch 1 is wanted from registration on
    core.prefetch("d", party_id=0, batch=2, purpose="logits")
    assert core.pool_pending("d") == 2 and core.pool_pending("nope") == 0
    core.start()
    try:
        deadline = time.monotonic() + 30
        while core.pool_pending("d") and time.monotonic() < deadline:
            time.sleep(0.02)
        assert core.pool_pending("d") == 0
        assert len(core._pools[("d", 1, "logits")]) == len(core._pools[("d", 2, "logits")]) == 3
    finally:
        core.stop()
    core.max_pool_bytes = 0  # a pool the byte budget stops short counts as done, not pending forever
    core.register("third", g, party_id=0, n_parties=2)
    assert core._models["third"].wanted and core.pool_pending("third") == 0
