"""The transport interface every protocol runs on.

A transport moves opaque byte payloads between the ``n`` compute parties. Each message is
tagged ``(session_id, step, sender)``: ``session_id`` names one inference (or one
deployment), ``step`` is the protocol round inside it, ``sender`` the party id. The tag is
what keeps concurrent requests apart, so a receiver waits for exactly the tag it expects
and messages of other sessions queue independently.

Implementations:

* :class:`~secureinfer.transport.inprocess.InProcessTransport` — threads and queues in
  one process; fast and deterministic, used by the protocol unit tests.
* ``GrpcTransport`` (``secureinfer.transport.grpc``) — what party processes use: mTLS,
  deadlines on every RPC, chunking of large payloads.

Counting of rounds and bytes happens in the Session, above the transport, so that every
transport reports identical figures.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Mapping

__all__ = ["Transport"]


class Transport(ABC):
    """Point-to-point byte messages between compute parties, tagged per session/step."""

    party_id: int
    n_parties: int

    @abstractmethod
    def send(self, session_id: str, step: int, dst: int, payload: bytes, *, timeout: float) -> None:
        """Deliver ``payload`` to party ``dst`` under tag ``(session_id, step, self.party_id)``.

        Raises :class:`~secureinfer.errors.PeerUnavailableError` naming ``dst`` when it
        cannot be reached, or :class:`~secureinfer.errors.DeadlineExceededError` after
        ``timeout`` seconds.
        """

    @abstractmethod
    def recv(self, session_id: str, step: int, src: int, *, timeout: float) -> bytes:
        """Block until the message tagged ``(session_id, step, src)`` arrives; return it.

        Raises :class:`~secureinfer.errors.DeadlineExceededError` naming ``src`` after
        ``timeout`` seconds, and :class:`~secureinfer.errors.PeerUnavailableError` at once
        if the session was aborted (by a peer or locally) while waiting.
        """

    @abstractmethod
    def abort(self, session_id: str, reason: str, *, notify_peers: bool = True) -> None:
        """Fail every current and future ``recv`` of ``session_id`` with ``reason``.

        With ``notify_peers`` the peers are told too (best effort, short deadline), so a
        request that cannot finish ends everywhere instead of waiting for a timeout.
        """

    @abstractmethod
    def close_session(self, session_id: str) -> None:
        """Forget every queued message and abort mark of ``session_id`` (frees memory)."""

    def close(self) -> None:
        """Release sockets and threads. The default does nothing."""

    def connect_peers(self, *, timeout: float) -> list[int]:
        """Open the connections to every peer now rather than at the first message (best
        effort); returns the peers not reached. The default has nothing to open."""
        return []

    def exchange(
        self, session_id: str, step: int, payloads: Mapping[int, bytes], *, timeout: float
    ) -> dict[int, bytes]:
        """One round: send ``payloads[p]`` to each peer ``p``, then receive from each.

        ``payloads`` must name every peer (all parties but this one). Sends go out before
        any receive, so all parties can call this at once without deadlock.
        """
        peers = [p for p in range(self.n_parties) if p != self.party_id]
        for p in peers:
            self.send(session_id, step, p, payloads[p], timeout=timeout)
        return {p: self.recv(session_id, step, p, timeout=timeout) for p in peers}
