"""Generation worker processes of the dealer (secureinfer/dealer/generation.py)."""

from __future__ import annotations

import os
import signal
import time

import pytest
import torch
from torch import nn

from secureinfer.dealer.core import DealerCore
from secureinfer.dealer.generation import GenerationError, GenerationWorker, ModelSpec, fixed_masks, generate_parts
from secureinfer.dealer.wire import bundle_from_bytes
from secureinfer.graph.ir import Graph
from secureinfer.graph.torch_import import from_torch
from secureinfer.prg import fresh_seed


def _graph_json() -> bytes:
    torch.manual_seed(0)
    return from_torch(nn.Sequential(nn.Linear(6, 4), nn.ReLU(), nn.Linear(4, 2)), (1, 6)).public_json()


@pytest.fixture()
def worker():
    w = GenerationWorker(name="test-gen")
    w.start()
    yield w
    w.stop()


def _spec(key: str = "dep/1") -> ModelSpec:
    return ModelSpec(key, _graph_json(), (fresh_seed(), fresh_seed()), 2)


def _layout(part: bytes, party: int) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    b = bundle_from_bytes(part, party_id=party)
    return {k: tuple(v.shape) for k, v in b.tensors.items()}, set(b.blobs)


def test_worker_sets_match_in_process_sets_and_are_fresh(worker: GenerationWorker) -> None:
    spec = _spec()
    graph = Graph.from_public_json(spec.graph_json)
    masks, _ = fixed_masks(graph, spec.seeds)
    local = generate_parts(graph, masks, n_parties=2, batch=3, purpose="logits")
    first = worker.generate(spec, batch=3, purpose="logits")
    second = worker.generate(spec, batch=3, purpose="logits")
    assert len(first) == 2
    for p in range(2):
        assert _layout(first[p], p) == _layout(local[p], p)
        assert len(first[p]) == len(local[p])
        assert first[p] != second[p]  # every set is drawn afresh
    assert bundle_from_bytes(first[0], party_id=0).seed != bundle_from_bytes(second[0], party_id=0).seed


def test_a_failed_job_is_reported_and_the_worker_lives_on(worker: GenerationWorker) -> None:
    spec = _spec()
    with pytest.raises(GenerationError, match="Error"):
        worker.generate(spec._replace(graph_json=b"{not json"), batch=1, purpose="logits")
    pid = worker.pid
    assert len(worker.generate(spec, batch=1, purpose="logits")) == 2
    assert worker.pid == pid and worker.restarts == 0


def test_a_killed_worker_is_reported_then_restarted(worker: GenerationWorker) -> None:
    spec = _spec()
    worker.generate(spec, batch=1, purpose="logits")
    pid = worker.pid
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    time.sleep(0.2)
    try:  # the death is seen on the next job, or that job already runs on a new worker
        worker.generate(spec, batch=1, purpose="logits")
    except GenerationError as e:
        assert "died" in str(e)
    assert len(worker.generate(spec, batch=1, purpose="logits")) == 2
    assert worker.restarts == 1 and worker.pid not in (None, pid)


def test_a_stopped_worker_ends_its_process_and_refuses_jobs() -> None:
    w = GenerationWorker(name="test-gen")
    w.start()
    pid = w.pid
    assert pid is not None
    w.stop()
    assert w.pid is None
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(GenerationError, match="stopped"):
        w.generate(_spec(), batch=1, purpose="logits")


def test_dealer_pools_fill_from_worker_processes_and_stop_ends_them() -> None:
    core = DealerCore(master_key=os.urandom(32), pool_size=2, pool_nice=5, worker_processes=True, pool_idle_class=True)
    core.start()
    try:
        pids = core.worker_pids()
        assert len(pids) == 2 and os.getpid() not in pids
        base = os.getpriority(os.PRIO_PROCESS, 0)
        assert os.getpriority(os.PRIO_PROCESS, pids[0]) == base  # first sets: a Bind may wait on them
        assert os.getpriority(os.PRIO_PROCESS, pids[1]) == min(19, base + 5)  # deep filler yields
        if hasattr(os, "SCHED_IDLE"):  # ... and runs only on otherwise idle CPU (Linux)
            assert os.sched_getscheduler(pids[1]) == os.SCHED_IDLE
            assert os.sched_getscheduler(pids[0]) == os.sched_getscheduler(0)
        g = _graph_json()
        for p in range(2):
            core.register("dep", g, party_id=p, n_parties=2)
        deadline = time.monotonic() + 60
        while core.stats()["pooled_sets"] < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = core.stats()
        assert stats["pooled_sets"] == 2 and stats["refill_failed"] == 0
        set_id, data = core.fetch("dep", "sess", party_id=0, batch=1, purpose="logits")
        assert bundle_from_bytes(data, party_id=0).tensors  # a pooled (worker-made) set serves a session
        assert core.stats()["sets_generated"] >= 2
    finally:
        core.stop()
    for pid in pids:
        with pytest.raises(ProcessLookupError):
            os.kill(pid, 0)
