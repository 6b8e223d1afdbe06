"""Run n in-process parties (threads on an InProcessTransport) for protocol tests."""

from __future__ import annotations

import threading
import uuid
from collections.abc import Callable
from typing import Any

from secureinfer.dealer.material import BundleBuilder, PartyBundle
from secureinfer.protocols.session import Session
from secureinfer.transport import InProcessNetwork


def run_parties(
    n: int, fn: Callable[[Session, PartyBundle], Any], *, builder: BundleBuilder | None = None,
    network: InProcessNetwork | None = None, timeout: float = 30.0,
) -> tuple[list[Any], list[Session]]:
    """Call ``fn(session, bundle)`` on n parties concurrently; re-raise the first error."""
    net = network or InProcessNetwork(n)
    builder = builder or BundleBuilder(n)
    sid = uuid.uuid4().hex
    sessions = [Session(party_id=i, n_parties=n, session_id=sid, transport=net.transport(i), timeout=timeout) for i in range(n)]
    results: list[Any] = [None] * n
    errors: list[BaseException | None] = [None] * n

    def work(i: int) -> None:
        try:
            results[i] = fn(sessions[i], builder.party_bundle(i))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors[i] = exc
            net.transport(i).abort(sid, repr(exc))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    for e in errors:
        if e is not None:
            raise e
    return results, sessions
