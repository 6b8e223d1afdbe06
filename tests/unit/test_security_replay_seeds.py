"""Security regressions (issue 14, findings 2 and 4), without processes.

* Finding 2: a request id is released at most once -- the budget ledger refuses a
  replayed id (ALREADY_EXISTS) durably instead of handing back the old debit.
* Finding 4: a deployment id never gets the same weight masks twice -- the dealer
  derives the model seeds from a fresh random nonce per deployment, and a party records
  every deployment id it ever accepted (tombstones), so a known id is refused.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import pytest
import torch
from torch import nn

from secureinfer.dealer.core import NONCE_BYTES, DealerCore, Registration
from secureinfer.dealer.material import PartyBundle
from secureinfer.dp import accountant as A
from secureinfer.dp.ledger import Budget, BudgetLedger
from secureinfer.errors import AlreadyExistsError, InvalidArgumentError
from secureinfer.graph.torch_import import from_torch
from secureinfer.party.store import ModelRecord, ModelStore


def _graph_json() -> bytes:
    torch.manual_seed(0)  # test weights, not secret
    return from_torch(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), (1, 6)).public_json()


def _core(key: bytes) -> DealerCore:
    return DealerCore(master_key=key, pool_size=0)


# ---------------------------------------------------------------------- finding 4: dealer


def test_a_released_deployment_id_registered_again_gets_new_seeds() -> None:
    core, g = _core(os.urandom(32)), _graph_json()
    first = [core.register("dep", g, party_id=p, n_parties=2) for p in (0, 1)]
    core.release("dep")
    second = [core.register("dep", g, party_id=p, n_parties=2) for p in (0, 1)]
    assert first[0].nonce == first[1].nonce and second[0].nonce == second[1].nonce
    assert len(first[0].nonce) == NONCE_BYTES and first[0].nonce != second[0].nonce
    for p in (0, 1):
        assert first[p].seed != second[p].seed


def test_a_restarted_dealer_needs_the_nonce_for_the_same_seeds() -> None:
    key, g = os.urandom(32), _graph_json()
    before = [_core(key).register("dep", g, party_id=p, n_parties=2) for p in (0,)]
    before.append(_core(key).register("dep", g, party_id=1, n_parties=2, nonce=before[0].nonce))
    restarted = _core(key)  # same master key, empty memory
    again = [restarted.register("dep", g, party_id=p, n_parties=2, nonce=before[0].nonce) for p in (0, 1)]
    assert [r.seed for r in again] == [r.seed for r in before]
    # the id alone (what an owner controls) never yields those seeds again
    fresh = _core(key).register("dep", g, party_id=0, n_parties=2)
    assert fresh.seed != before[0].seed and fresh.nonce != before[0].nonce


def test_each_party_registers_once_and_the_nonce_must_match() -> None:
    core, g = _core(os.urandom(32)), _graph_json()
    r0 = core.register("dep", g, party_id=0, n_parties=2)
    with pytest.raises(AlreadyExistsError, match="already registered") as info:
        core.register("dep", g, party_id=0, n_parties=2)  # again without the nonce
    assert info.value.grpc_code == "ALREADY_EXISTS"
    assert core.register("dep", g, party_id=0, n_parties=2, nonce=r0.nonce).seed == r0.seed  # re-registration
    with pytest.raises(AlreadyExistsError, match="another nonce"):
        core.register("dep", g, party_id=1, n_parties=2, nonce=os.urandom(NONCE_BYTES))
    with pytest.raises(InvalidArgumentError, match="nonce"):
        core.register("dep", g, party_id=1, n_parties=2, nonce=b"short")
    r1 = core.register("dep", g, party_id=1, n_parties=2)  # party 1's first registration
    assert r1.nonce == r0.nonce and r1.seed != r0.seed
    with pytest.raises(AlreadyExistsError):
        core.register("dep", g, party_id=1, n_parties=2)


def test_concurrent_first_registrations_agree_and_match_the_dealer_masks() -> None:
    core, g = _core(os.urandom(32)), _graph_json()
    got: dict[int, Registration] = {}
    barrier = threading.Barrier(3)

    def reg(p: int) -> None:
        barrier.wait()
        got[p] = core.register("dep", g, party_id=p, n_parties=3)

    threads = [threading.Thread(target=reg, args=(p,)) for p in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    regs = [got[p] for p in range(3)]
    assert len({r.nonce for r in regs}) == 1
    m = core._models["dep"]
    # the seeds each party got expand to shares of exactly the masks the dealer uses
    for k, mask in m.raw_masks.items():
        parts = [PartyBundle(p, regs[p].seed).share(f"{k}/B", tuple(mask.shape)) for p in range(3)]
        total = parts[0] + parts[1] + parts[2]  # int64 wraps: the sum mod 2^64
        assert torch.equal(total, mask)


# ---------------------------------------------------------------------- finding 4: party store


def _store(tmp_path: Path) -> ModelStore:
    key = tmp_path / "storage.key"
    if not key.exists():
        key.write_bytes(os.urandom(32))
    return ModelStore(tmp_path / "data", key)


def _record(dep: str, nonce: bytes) -> ModelRecord:
    return ModelRecord("m", "1", dep, ModelStore.now(), b"{}", os.urandom(32),
                       {"w": torch.arange(6).reshape(2, 3)}, {"fc": torch.ones(3, 2, dtype=torch.int64)},
                       seed_nonce=nonce)


def test_deployment_ids_are_single_use_durably_even_after_remove(tmp_path: Path) -> None:
    st = _store(tmp_path)
    assert not st.deployment_used("dep-1")
    assert st.claim_deployment("dep-1", name="m", version="1")
    nonce = os.urandom(NONCE_BYTES)
    st.save(_record("dep-1", nonce), replace=False)
    assert st.load("m", "1").seed_nonce == nonce  # stored (encrypted) with the model
    assert nonce not in (tmp_path / "data" / "models" / "m" / "1.sim").read_bytes()
    with pytest.raises(AlreadyExistsError, match="already used") as info:
        st.claim_deployment("dep-1", name="other", version="1")
    assert info.value.grpc_code == "ALREADY_EXISTS"
    st.remove("m", "1")
    reopened = _store(tmp_path)  # a restarted party
    assert reopened.deployment_used("dep-1")
    with pytest.raises(AlreadyExistsError):
        reopened.claim_deployment("dep-1", name="m", version="1")
    assert reopened.claim_deployment("dep-1", name="m", version="1", exist_ok=True) is False
    for bad in ("", "../x", "a/b", "x" * 65):
        with pytest.raises(InvalidArgumentError):
            reopened.claim_deployment(bad, name="m", version="1")


def test_concurrent_claims_of_one_id_exactly_one_wins(tmp_path: Path) -> None:
    stores = [_store(tmp_path) for _ in range(8)]
    wins: list[bool] = []
    barrier = threading.Barrier(len(stores))

    def claim(st: ModelStore) -> None:
        barrier.wait()
        try:
            wins.append(st.claim_deployment("same", name="m", version="1"))
        except AlreadyExistsError:
            wins.append(False)

    threads = [threading.Thread(target=claim, args=(st,)) for st in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert sorted(wins) == [False] * 7 + [True]


def test_a_record_stored_before_nonces_loads_without_one(tmp_path: Path) -> None:
    st = _store(tmp_path)
    st.save(_record("old", b""), replace=False)
    assert st.load("m", "1").seed_nonce == b""  # the party refuses to serve it (redeploy)


# ---------------------------------------------------------------------- finding 2: ledger


def test_a_replayed_request_id_is_refused_across_restarts_and_charges_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with BudgetLedger(path, default_budget=Budget(10.0, 1e-6)) as led:
        assert not led.reserve("client/m", "rid", A.pure_event(1.0)).replayed
    with BudgetLedger(path, default_budget=Budget(10.0, 1e-6)) as led:  # the party restarted
        for client in ("client/m", "client/other-model", "mallory/m"):
            with pytest.raises(AlreadyExistsError, match="was already used; use a fresh id"):
                led.reserve(client, "rid", A.pure_event(1.0))
        assert led.spent("client/m") == pytest.approx(1.0)
        assert [r for r, _, _ in led.debits("client/m")] == ["rid"]
        assert led.debits("mallory/m") == [] and led.spent("mallory/m") == 0.0
