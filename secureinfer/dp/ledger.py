"""Per-client privacy budget ledger: SQLite (WAL, synchronous=FULL), safe across processes.

Rule for callers: **reserve before release**. :meth:`BudgetLedger.reserve` composes the
request's cost with everything the client already spent (:mod:`secureinfer.dp.accountant`),
refuses with :class:`~secureinfer.errors.BudgetExhaustedError` (gRPC RESOURCE_EXHAUSTED)
if the result would exceed the client's budget, and otherwise commits the debit -- and
SQLite has fsync'd it (WAL mode, ``synchronous=FULL``) -- before it returns. Only then may
the caller let any noisy value leave the process. A debit is never refunded: if the
request fails later the budget stays spent (the noise may already be out). A process
killed with SIGKILL at any point leaves either the whole debit or none of it.

* One release per request id, durably: a ``request_id`` is debited at most once, ever
  (the debit row outlives restarts). Reserving an id that was already debited is refused
  with :class:`~secureinfer.errors.AlreadyExistsError` (gRPC ALREADY_EXISTS, "request id
  ... was already used; use a fresh id") and charges nothing -- so a caller that releases
  fresh noise after every successful reserve can never release twice under one paid id.
  Only ``reserve(..., idempotent=True)`` returns the original debit of a replayed id (same
  client and cost; ``replayed=True``): for bookkeeping callers that release nothing new
  on a replay. With a different client or cost a replay is refused in both modes.
* Concurrency: every reserve runs in a ``BEGIN IMMEDIATE`` transaction, which SQLite
  serialises across threads and processes with its file locks (``busy_timeout`` waits
  for the lock). WAL needs shared memory: keep the file on a local disk, not NFS.
* Accounting: each client row holds the composed :class:`PrivacyEvent` of all its debits
  (pure epsilon, zCDP rho, RDP curve, delta), so a reserve costs O(1); the spent epsilon
  is that event converted at the client's budget delta. A debit is allowed while the
  composed epsilon is <= budget epsilon * (1 + 1e-9) (float sums of 0.1 must not refuse
  the tenth tenth).

Cost: one small write transaction and one fsync (about 1-10 ms on SSD) per reserve.
"""

from __future__ import annotations

import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from secureinfer.dp.accountant import PrivacyEvent, compose, epsilon_for_delta
from secureinfer.errors import AlreadyExistsError, BudgetExhaustedError, InvalidArgumentError, NotFoundError

__all__ = ["Budget", "BudgetLedger", "Debit"]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS clients (
    client TEXT PRIMARY KEY,
    budget_epsilon REAL NOT NULL,
    budget_delta REAL NOT NULL,
    total_json TEXT NOT NULL,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS debits (
    request_id TEXT PRIMARY KEY,
    client TEXT NOT NULL REFERENCES clients(client),
    event_json TEXT NOT NULL,
    spent_epsilon REAL NOT NULL,
    created_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS debits_by_client ON debits(client);
"""
_TOLERANCE = 1e-9


@dataclass(frozen=True)
class Budget:
    """A client's (epsilon, delta) budget for all of its DP requests together."""

    epsilon: float
    delta: float

    def __post_init__(self) -> None:
        if not (isinstance(self.epsilon, (int, float)) and math.isfinite(self.epsilon) and self.epsilon >= 0):
            raise InvalidArgumentError(f"budget epsilon must be a finite number >= 0, got {self.epsilon!r}")
        if not (isinstance(self.delta, (int, float)) and 0 <= self.delta < 1):
            raise InvalidArgumentError(f"budget delta must be in [0, 1), got {self.delta!r}")


@dataclass(frozen=True)
class Debit:
    """A committed debit: the client's spent epsilon after it and what remains."""

    client: str
    request_id: str
    cost: PrivacyEvent
    spent_epsilon: float
    remaining_epsilon: float
    replayed: bool


def _name(value: object, what: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 1024:
        raise InvalidArgumentError(f"{what} must be a non-empty string of at most 1024 characters")
    return value


def _zero() -> PrivacyEvent:
    return compose([])


class BudgetLedger:
    """The budget ledger of one party (one SQLite file); see the module docstring."""

    def __init__(self, path: str | os.PathLike[str], *, default_budget: Budget | None, busy_timeout_s: float = 30.0) -> None:
        if default_budget is not None and not isinstance(default_budget, Budget):
            raise InvalidArgumentError("default_budget must be a Budget or None")
        self._path = Path(path)
        self._default = default_budget
        self._lock = threading.Lock()
        self._path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(
            str(self._path), timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        self._db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        mode = self._db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise InvalidArgumentError(f"cannot put the ledger {self._path} in WAL mode (got {mode})")
        self._db.execute("PRAGMA synchronous = FULL")
        self._db.execute("PRAGMA foreign_keys = ON")
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                for stmt in _SCHEMA.split(";"):
                    if stmt.strip():
                        self._db.execute(stmt)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> BudgetLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals

    def _client_row(self, client: str, *, create: bool) -> tuple[Budget, PrivacyEvent]:
        row = self._db.execute(
            "SELECT budget_epsilon, budget_delta, total_json FROM clients WHERE client = ?", (client,)
        ).fetchone()
        if row is not None:
            return Budget(row[0], row[1]), PrivacyEvent.from_json(row[2])
        if self._default is None:
            raise NotFoundError(f"no privacy budget is configured for client {client!r}")
        if create:
            self._db.execute(
                "INSERT INTO clients (client, budget_epsilon, budget_delta, total_json, updated_at) VALUES (?, ?, ?, ?, ?)",
                (client, self._default.epsilon, self._default.delta, _zero().to_json(), time.time()),
            )
        return self._default, _zero()

    @staticmethod
    def _spent(budget: Budget, total: PrivacyEvent) -> float:
        if total.count == 0:
            return 0.0
        return epsilon_for_delta(total, budget.delta)

    # ------------------------------------------------------------------ API

    def reserve(self, client: str, request_id: str, cost: PrivacyEvent, *, idempotent: bool = False) -> Debit:
        """Debit ``cost`` for ``request_id`` or raise; committed and fsync'd on return.

        Guarantees: a returned :class:`Debit` with ``replayed=False`` is a new debit of
        ``cost``, committed before this returns. An id that was ever debited before is
        refused (:class:`~secureinfer.errors.AlreadyExistsError`, nothing charged) unless
        ``idempotent`` is set, in which case a replay with the same client and cost
        returns the original debit with ``replayed=True`` -- the caller must then not
        release anything new. :class:`~secureinfer.errors.BudgetExhaustedError` if the
        client's budget does not cover ``cost``.
        """
        _name(client, "client")
        _name(request_id, "request_id")
        if not isinstance(cost, PrivacyEvent):
            raise InvalidArgumentError("cost must be a PrivacyEvent")
        cost_json = cost.to_json()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                debit = self._reserve_locked(client, request_id, cost, cost_json, idempotent)
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")
        return debit

    def _reserve_locked(
        self, client: str, request_id: str, cost: PrivacyEvent, cost_json: str, idempotent: bool
    ) -> Debit:
        prior = self._db.execute(
            "SELECT client, event_json FROM debits WHERE request_id = ?", (request_id,)
        ).fetchone()
        if prior is not None and not idempotent:
            raise AlreadyExistsError(f"request id {request_id!r} was already used; use a fresh id")
        budget, total = self._client_row(client, create=prior is None)
        spent_now = self._spent(budget, total)
        if prior is not None:
            if prior[0] != client or prior[1] != cost_json:
                raise AlreadyExistsError(
                    f"request id {request_id!r} was already debited for a different client or cost"
                )
            return Debit(client, request_id, cost, spent_now, max(0.0, budget.epsilon - spent_now), True)
        new_total = compose([total, cost]) if total.count else compose([cost])
        spent = epsilon_for_delta(new_total, budget.delta)
        if not spent <= budget.epsilon * (1 + _TOLERANCE) + 1e-15:
            raise BudgetExhaustedError(
                f"client {client!r}: this request costs too much privacy budget "
                f"(spent epsilon {spent_now:.6g} of {budget.epsilon:.6g} at delta {budget.delta:.3g}; "
                f"with this request it would be {spent:.6g})"
            )
        now = time.time()
        self._db.execute(
            "INSERT INTO debits (request_id, client, event_json, spent_epsilon, created_at) VALUES (?, ?, ?, ?, ?)",
            (request_id, client, cost_json, spent, now),
        )
        self._db.execute(
            "UPDATE clients SET total_json = ?, updated_at = ? WHERE client = ?", (new_total.to_json(), now, client)
        )
        return Debit(client, request_id, cost, spent, max(0.0, budget.epsilon - spent), False)

    def _read(self, client: str) -> tuple[Budget, PrivacyEvent]:
        _name(client, "client")
        with self._lock:
            return self._client_row(client, create=False)

    def budget(self, client: str) -> Budget:
        """The client's budget (the default one if it never made a request)."""
        return self._read(client)[0]

    def total(self, client: str) -> PrivacyEvent:
        """The composition of all the client's debits."""
        return self._read(client)[1]

    def spent(self, client: str) -> float:
        """Epsilon spent so far, at the client's budget delta."""
        budget, total = self._read(client)
        return self._spent(budget, total)

    def remaining(self, client: str) -> float:
        """Budget epsilon minus spent epsilon (informational: costs compose sublinearly
        under RDP, so :meth:`reserve` is what decides)."""
        budget, total = self._read(client)
        return max(0.0, budget.epsilon - self._spent(budget, total))

    def set_budget(self, client: str, *, epsilon: float, delta: float) -> None:
        """Set (or lower, or raise) a client's budget; past spending is kept."""
        _name(client, "client")
        b = Budget(epsilon, delta)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                self._db.execute(
                    "INSERT INTO clients (client, budget_epsilon, budget_delta, total_json, updated_at) "
                    "VALUES (?, ?, ?, ?, ?) ON CONFLICT(client) DO UPDATE SET "
                    "budget_epsilon = excluded.budget_epsilon, budget_delta = excluded.budget_delta, "
                    "updated_at = excluded.updated_at",
                    (client, b.epsilon, b.delta, _zero().to_json(), time.time()),
                )
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
            self._db.execute("COMMIT")

    def debits(self, client: str) -> list[tuple[str, PrivacyEvent, float]]:
        """(request_id, cost, spent epsilon after it) for each debit of the client, oldest first."""
        _name(client, "client")
        with self._lock:
            rows = self._db.execute(
                "SELECT request_id, event_json, spent_epsilon FROM debits WHERE client = ? ORDER BY created_at, rowid",
                (client,),
            ).fetchall()
        return [(r[0], PrivacyEvent.from_json(r[1]), float(r[2])) for r in rows]

    def clients(self) -> list[str]:
        """Every client with a budget row."""
        with self._lock:
            return [r[0] for r in self._db.execute("SELECT client FROM clients ORDER BY client").fetchall()]
