"""In-process transport: the parties are threads of one process, messages go through queues.

Used by the protocol unit tests so that every protocol runs fast and deterministically
for any number of parties, with exactly the same code the party processes run over gRPC.
"""

from __future__ import annotations

import threading
import time

from secureinfer.errors import DeadlineExceededError, PeerUnavailableError
from secureinfer.transport.base import Transport

__all__ = ["InProcessNetwork", "InProcessTransport"]

_Tag = tuple[str, int, int]


class InProcessNetwork:
    """The shared mailboxes of ``n_parties`` in-process parties.

    ``network.transport(i)`` is party ``i``'s endpoint. One network may carry any number
    of concurrent sessions.
    """

    def __init__(self, n_parties: int) -> None:
        if n_parties < 2:
            raise ValueError("need at least two parties")
        self.n_parties = n_parties
        self._cond = threading.Condition()
        self._boxes: list[dict[_Tag, bytes]] = [{} for _ in range(n_parties)]
        self._aborted: list[dict[str, str]] = [{} for _ in range(n_parties)]
        self._down: set[int] = set()

    def transport(self, party_id: int) -> "InProcessTransport":
        if not 0 <= party_id < self.n_parties:
            raise ValueError(f"party id {party_id} out of range")
        return InProcessTransport(self, party_id)

    def set_down(self, party_id: int, down: bool = True) -> None:
        """Simulate a dead party: sends to it fail with PeerUnavailableError."""
        with self._cond:
            (self._down.add if down else self._down.discard)(party_id)
            self._cond.notify_all()


class InProcessTransport(Transport):
    """Party ``party_id``'s endpoint on an :class:`InProcessNetwork`."""

    def __init__(self, network: InProcessNetwork, party_id: int) -> None:
        self._net = network
        self.party_id = party_id
        self.n_parties = network.n_parties

    def send(self, session_id: str, step: int, dst: int, payload: bytes, *, timeout: float) -> None:
        net = self._net
        with net._cond:
            if dst in net._down:
                raise PeerUnavailableError(f"party {dst} is unavailable")
            net._boxes[dst][(session_id, step, self.party_id)] = bytes(payload)
            net._cond.notify_all()

    def recv(self, session_id: str, step: int, src: int, *, timeout: float) -> bytes:
        net = self._net
        tag = (session_id, step, src)
        deadline = time.monotonic() + timeout
        with net._cond:
            while True:
                box = net._boxes[self.party_id]
                if tag in box:
                    return box.pop(tag)
                reason = net._aborted[self.party_id].get(session_id)
                if reason is not None:
                    raise PeerUnavailableError(f"session {session_id} aborted: {reason}")
                if src in net._down:
                    raise PeerUnavailableError(f"party {src} is unavailable")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceededError(
                        f"party {self.party_id} timed out after {timeout:.1f}s waiting for party {src} "
                        f"(session {session_id}, step {step})"
                    )
                net._cond.wait(left)

    def abort(self, session_id: str, reason: str, *, notify_peers: bool = True) -> None:
        net = self._net
        with net._cond:
            targets = range(net.n_parties) if notify_peers else [self.party_id]
            for p in targets:
                net._aborted[p].setdefault(session_id, reason)
            net._cond.notify_all()

    def close_session(self, session_id: str) -> None:
        net = self._net
        with net._cond:
            box = net._boxes[self.party_id]
            for tag in [t for t in box if t[0] == session_id]:
                del box[tag]
            net._aborted[self.party_id].pop(session_id, None)
