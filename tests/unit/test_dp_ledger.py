"""Budget ledger: refusal, idempotence, persistence, kill -9 and concurrent processes."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from secureinfer.dp import accountant as A
from secureinfer.dp.ledger import Budget, BudgetLedger
from secureinfer.errors import AlreadyExistsError, BudgetExhaustedError, InvalidArgumentError, NotFoundError

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture()
def ledger(tmp_path: Path) -> BudgetLedger:
    led = BudgetLedger(tmp_path / "ledger.db", default_budget=Budget(1.0, 1e-6))
    yield led
    led.close()


def test_reserve_until_exhausted(ledger: BudgetLedger) -> None:
    for i in range(10):
        d = ledger.reserve("alice", f"req-{i}", A.pure_event(0.1))
        assert not d.replayed
        assert d.spent_epsilon == pytest.approx(0.1 * (i + 1))
    with pytest.raises(BudgetExhaustedError) as info:
        ledger.reserve("alice", "req-10", A.pure_event(0.1))
    assert info.value.grpc_code == "RESOURCE_EXHAUSTED"
    assert "alice" in str(info.value)
    assert ledger.spent("alice") == pytest.approx(1.0)
    assert ledger.remaining("alice") == pytest.approx(0.0, abs=1e-9)
    assert len(ledger.debits("alice")) == 10  # the refused request left nothing behind
    assert ledger.spent("bob") == 0.0 and ledger.remaining("bob") == 1.0  # default budget


def test_a_request_id_is_debited_once_and_a_replay_is_refused(ledger: BudgetLedger) -> None:
    ev = A.laplace_event(scale=4, sensitivity=1)
    first = ledger.reserve("alice", "r1", ev)
    assert not first.replayed
    with pytest.raises(AlreadyExistsError, match="was already used; use a fresh id") as info:
        ledger.reserve("alice", "r1", ev)  # same client, same cost: still refused (finding 2)
    assert info.value.grpc_code == "ALREADY_EXISTS"
    assert ledger.spent("alice") == pytest.approx(0.25) and len(ledger.debits("alice")) == 1


def test_idempotent_on_request_id(ledger: BudgetLedger) -> None:
    ev = A.laplace_event(scale=4, sensitivity=1)
    first = ledger.reserve("alice", "r1", ev, idempotent=True)
    again = ledger.reserve("alice", "r1", ev, idempotent=True)
    assert again.replayed and not first.replayed
    assert ledger.spent("alice") == pytest.approx(0.25)
    with pytest.raises(AlreadyExistsError):
        ledger.reserve("alice", "r1", A.laplace_event(scale=2, sensitivity=1), idempotent=True)
    with pytest.raises(AlreadyExistsError):
        ledger.reserve("mallory", "r1", ev, idempotent=True)
    assert ledger.spent("alice") == pytest.approx(0.25)


def test_rdp_composition_in_the_ledger(ledger: BudgetLedger) -> None:
    ledger.set_budget("carol", epsilon=3.0, delta=1e-5)
    ev = A.gaussian_event(sigma2=50, l2_sensitivity_sq=1)
    n = 0
    with pytest.raises(BudgetExhaustedError):
        while True:
            ledger.reserve("carol", f"g{n}", ev)
            n += 1
    assert n > 0
    total = A.compose([ev] * n)
    assert ledger.spent("carol") == pytest.approx(A.epsilon_for_delta(total, 1e-5))
    assert A.epsilon_for_delta(A.compose([ev] * (n + 1)), 1e-5) > 3.0
    assert ledger.total("carol").rho == pytest.approx(n / 100)


def test_unknown_client_without_default(tmp_path: Path) -> None:
    with BudgetLedger(tmp_path / "l.db", default_budget=None) as led:
        with pytest.raises(NotFoundError):
            led.reserve("eve", "x", A.pure_event(0.1))
        led.set_budget("eve", epsilon=0.5, delta=0.0)
        led.reserve("eve", "x", A.pure_event(0.5))
        with pytest.raises(BudgetExhaustedError):
            led.reserve("eve", "y", A.pure_event(1e-6))
        assert led.budget("eve") == Budget(0.5, 0.0)


def test_invalid_arguments(ledger: BudgetLedger) -> None:
    for call in [
        lambda: ledger.reserve("", "x", A.pure_event(0.1)),
        lambda: ledger.reserve("a", "", A.pure_event(0.1)),
        lambda: ledger.reserve("a", "x", 0.1),  # type: ignore[arg-type]
        lambda: ledger.set_budget("a", epsilon=-1, delta=0),
        lambda: ledger.set_budget("a", epsilon=1, delta=1.0),
        lambda: Budget(float("inf"), 0.0),
    ]:
        with pytest.raises(InvalidArgumentError):
            call()


def test_persisted_in_wal_with_full_sync(tmp_path: Path) -> None:
    path = tmp_path / "sub" / "l.db"
    with BudgetLedger(path, default_budget=Budget(2.0, 1e-6)) as led:
        led.reserve("alice", "a", A.pure_event(0.5))
        assert led._db.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    raw = sqlite3.connect(path)
    assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    raw.close()
    with BudgetLedger(path, default_budget=Budget(2.0, 1e-6)) as led:
        assert led.spent("alice") == pytest.approx(0.5)
        with pytest.raises(AlreadyExistsError):  # the used id outlives the process
            led.reserve("alice", "a", A.pure_event(0.5))
        assert led.reserve("alice", "a", A.pure_event(0.5), idempotent=True).replayed
        assert led.spent("alice") == pytest.approx(0.5)


def _child(code: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )


def test_debit_survives_kill_9(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    proc = _child(
        f"""
        import sys, time
        from secureinfer.dp.accountant import pure_event
        from secureinfer.dp.ledger import Budget, BudgetLedger
        led = BudgetLedger({str(path)!r}, default_budget=Budget(1.0, 1e-6))
        led.reserve("alice", "req-1", pure_event(0.25))
        print("RELEASED", flush=True)   # the noisy answer would leave now
        time.sleep(60)
        """
    )
    try:
        line = proc.stdout.readline() if proc.stdout else ""
        assert line.strip() == "RELEASED", proc.stderr.read() if proc.stderr else ""
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    with BudgetLedger(path, default_budget=Budget(1.0, 1e-6)) as led:
        assert led.spent("alice") == pytest.approx(0.25)
        assert [r for r, _, _ in led.debits("alice")] == ["req-1"]


def test_kill_9_mid_stream_leaves_consistent_state(tmp_path: Path) -> None:
    path = tmp_path / "l.db"
    proc = _child(
        f"""
        from secureinfer.dp.accountant import pure_event
        from secureinfer.dp.ledger import Budget, BudgetLedger
        led = BudgetLedger({str(path)!r}, default_budget=Budget(1e9, 1e-6))
        i = 0
        while True:
            led.reserve("alice", f"r{{i}}", pure_event(0.001))
            i += 1
            if i == 20:
                print("GO", flush=True)
        """
    )
    try:
        assert (proc.stdout.readline() if proc.stdout else "").strip() == "GO"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    with BudgetLedger(path, default_budget=Budget(1e9, 1e-6)) as led:
        rows = led.debits("alice")
        assert len(rows) >= 20
        total = led.total("alice")
        assert total.count == len(rows)  # the composed total matches the debit rows exactly
        assert total.epsilon == pytest.approx(0.001 * len(rows))


def test_concurrent_connections_never_overspend(tmp_path: Path) -> None:
    """Separate connections (as separate processes would have) contend for the file lock."""
    path = tmp_path / "l.db"
    ledgers = [BudgetLedger(path, default_budget=Budget(1.0, 1e-6)) for _ in range(4)]
    granted: list[int] = []

    def work(w: int) -> None:
        ok = 0
        for i in range(8):
            try:
                ledgers[w].reserve("alice", f"t{w}-{i}", A.pure_event(0.1))
                ok += 1
            except BudgetExhaustedError:
                pass
        granted.append(ok)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert sum(granted) == 10
    assert ledgers[0].spent("alice") == pytest.approx(1.0)
    for led in ledgers:
        led.close()


@pytest.mark.parametrize("workers", [2, pytest.param(4, marks=pytest.mark.slow)])
def test_concurrent_processes_never_overspend(tmp_path: Path, workers: int) -> None:
    path = tmp_path / "l.db"
    BudgetLedger(path, default_budget=Budget(1.0, 1e-6)).close()
    code = """
        import sys
        from secureinfer.dp.accountant import pure_event
        from secureinfer.dp.ledger import Budget, BudgetLedger
        from secureinfer.errors import BudgetExhaustedError
        led = BudgetLedger({path!r}, default_budget=Budget(1.0, 1e-6))
        ok = 0
        for i in range({attempts}):
            try:
                led.reserve("alice", "p{w}-" + str(i), pure_event(0.1))
                ok += 1
            except BudgetExhaustedError:
                pass
        print(ok, flush=True)
        """
    procs = [_child(code.format(path=str(path), w=w, attempts=32 // workers)) for w in range(workers)]
    granted = 0
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err
        granted += int(out.strip())
    assert granted == 10  # 32 attempts of 0.1 against a budget of 1.0
    with BudgetLedger(path, default_budget=Budget(1.0, 1e-6)) as led:
        assert len(led.debits("alice")) == 10
        assert led.spent("alice") == pytest.approx(1.0)
