"""Per-session mailboxes: where incoming party-to-party messages wait for their ``recv``.

Both network transports (:mod:`~secureinfer.transport.grpc`,
:mod:`~secureinfer.transport.stream`) deliver into a :class:`Mailbox` and receive with
:meth:`Mailbox.take`. Messages are keyed ``(session_id, step, sender)``; one may arrive
before the local party starts its session, so the mailbox keeps it, bounded by
``max_bytes`` overall, ``max_sessions`` sessions and a TTL for sessions nobody waits on.
A retransmission of the same message is ignored; a *different* message under a tag
already held is a :class:`~secureinfer.errors.ProtocolError`. An aborted session fails
its current and future waiters at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from secureinfer.errors import DeadlineExceededError, PeerUnavailableError, ProtocolError, TransportError

__all__ = ["Mailbox", "MailboxFull"]

log = logging.getLogger(__name__)


class MailboxFull(TransportError):
    """A receiver refuses a message because its bounded mailbox is full."""

    grpc_code = "RESOURCE_EXHAUSTED"


class _Box:
    """One session's mailbox: messages keyed (step, sender), abort mark, waiter count."""

    __slots__ = ("aborted", "cond", "messages", "size", "touched", "waiters", "waiting_on")

    def __init__(self, lock: threading.Lock, now: float) -> None:
        self.cond = threading.Condition(lock)
        self.messages: dict[tuple[int, int], bytes] = {}
        self.aborted: str | None = None
        self.size = 0
        self.touched = now
        self.waiters = 0
        self.waiting_on: dict[int, int] = {}  # sender -> waiters for a message of it


class Mailbox:
    """Per-session mailboxes under one lock, bounded in bytes, sessions and idle time."""

    def __init__(self, *, max_bytes: int, ttl_s: float, max_sessions: int) -> None:
        self.max_bytes = max_bytes
        self.ttl_s = ttl_s
        self.max_sessions = max_sessions
        self.lock = threading.Lock()
        self.boxes: dict[str, _Box] = {}
        self.size = 0
        self._last_purge = time.monotonic()

    def box(self, session_id: str, now: float) -> _Box:
        """The box of ``session_id``, created if needed (caller holds the lock)."""
        box = self.boxes.get(session_id)
        if box is None:
            if len(self.boxes) >= self.max_sessions:
                self._purge(now, force=True)
                if len(self.boxes) >= self.max_sessions:
                    raise MailboxFull(f"too many open sessions ({len(self.boxes)})")
            box = self.boxes[session_id] = _Box(self.lock, now)
        box.touched = now
        return box

    def put(self, session_id: str, step: int, sender: int, payload: bytes) -> None:
        now = time.monotonic()
        with self.lock:
            self._purge(now)
            box = self.box(session_id, now)
            old = box.messages.get((step, sender))
            if old is not None:
                if old == payload:
                    return  # a retransmission of the same message: idempotent
                raise ProtocolError(
                    f"conflicting duplicate message from party {sender} "
                    f"(session {session_id}, step {step})"
                )
            if self.size + len(payload) > self.max_bytes:
                self._purge(now, force=True)
                if self.size + len(payload) > self.max_bytes:
                    raise MailboxFull(
                        f"mailbox full: {self.size} of {self.max_bytes} bytes held, "
                        f"message of {len(payload)} bytes refused"
                    )
            box.messages[(step, sender)] = payload
            box.size += len(payload)
            self.size += len(payload)
            box.cond.notify_all()

    def take(self, session_id: str, step: int, src: int, *, timeout: float,
             describe: Callable[[], str]) -> bytes:
        """Wait for the message tagged ``(session_id, step, src)`` and remove it.

        Raises :class:`~secureinfer.errors.PeerUnavailableError` at once if the session is
        or becomes aborted, :class:`~secureinfer.errors.DeadlineExceededError` (with
        ``describe()`` naming who timed out waiting for whom) after ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self.lock:
            box = self.box(session_id, time.monotonic())
            box.waiters += 1
            box.waiting_on[src] = box.waiting_on.get(src, 0) + 1
            try:
                while True:
                    msg = box.messages.pop((step, src), None)
                    if msg is not None:
                        box.size -= len(msg)
                        self.size -= len(msg)
                        return msg
                    if box.aborted is not None:
                        raise PeerUnavailableError(box.aborted)
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise DeadlineExceededError(
                            f"{describe()} after {timeout:.1f}s (session {session_id}, step {step})"
                        )
                    box.cond.wait(left)
            finally:
                box.waiters -= 1
                box.waiting_on[src] -= 1
                box.touched = time.monotonic()

    def abort(self, session_id: str, reason: str) -> None:
        with self.lock:
            box = self.box(session_id, time.monotonic())
            if box.aborted is None:
                box.aborted = reason
            box.cond.notify_all()

    def abort_waiting_on(self, src: int, reason: str) -> int:
        """Abort every session waiting for a message of ``src`` now (its connection was
        lost: what it sent before has been delivered, nothing more will come on it)."""
        with self.lock:
            hit = [b for b in self.boxes.values() if b.waiting_on.get(src) and b.aborted is None]
            for b in hit:
                b.aborted = reason
                b.cond.notify_all()
            return len(hit)

    def close(self, session_id: str) -> None:
        with self.lock:
            box = self.boxes.pop(session_id, None)
            if box is not None:
                self.size -= box.size
                box.aborted = box.aborted or "session closed"
                box.cond.notify_all()

    def _purge(self, now: float, *, force: bool = False) -> None:
        """Drop sessions nobody waits on that were idle longer than the TTL (lock held)."""
        if not force and now - self._last_purge < min(1.0, self.ttl_s):
            return
        self._last_purge = now
        stale = [
            sid
            for sid, b in self.boxes.items()
            if b.waiters == 0 and now - b.touched > self.ttl_s
        ]
        for sid in stale:
            box = self.boxes.pop(sid)
            self.size -= box.size
            if box.messages:
                log.warning(
                    "dropped %d unclaimed message(s) of session %s after %.0fs",
                    len(box.messages), sid, self.ttl_s,
                )
