"""One party's view of one protocol run: who it is, its peers, its randomness, its costs.

A :class:`Session` is passed explicitly to every protocol function; there is no global
state, so any number of sessions (concurrent inferences, or several in-process parties in
a test) can run in one process without interfering.

Every protocol round is one call of :meth:`Session.exchange` (or a helper built on it),
which sends one message per peer and counts one round and the bytes sent and received.
Offline traffic (dealer material) is counted separately by whoever fetched it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from secureinfer.transport.base import Transport
from secureinfer.transport.codec import pack_ring, unpack_ring

__all__ = ["Costs", "Session"]


@dataclass
class Costs:
    """Counters of one session: rounds and bytes online, bytes and time offline."""

    rounds: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0
    bytes_offline: int = 0
    offline_ms: float = 0.0
    sent_per_peer: dict[int, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, float | int]:
        return {
            "rounds": self.rounds,
            "bytes_sent_online": self.bytes_sent,
            "bytes_received_online": self.bytes_received,
            "bytes_offline": self.bytes_offline,
            "offline_ms": round(self.offline_ms, 3),
        }


class Session:
    """Party ``party_id`` of ``n_parties`` running session ``session_id`` over ``transport``.

    ``timeout`` bounds every wait for a peer (seconds); ``deadline`` (monotonic time) is
    the end of the whole request, after which every wait fails at once.
    """

    def __init__(
        self,
        *,
        party_id: int,
        n_parties: int,
        session_id: str,
        transport: Transport,
        timeout: float = 30.0,
        deadline: float | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        if not 0 <= party_id < n_parties:
            raise ValueError("party_id out of range")
        self.party_id = party_id
        self.n_parties = n_parties
        self.session_id = session_id
        self.transport = transport
        self.timeout = timeout
        self.deadline = deadline
        self.device = torch.device(device)
        self.costs = Costs()
        self._step = 0

    @property
    def peers(self) -> list[int]:
        return [p for p in range(self.n_parties) if p != self.party_id]

    def _wait_budget(self) -> float:
        if self.deadline is None:
            return self.timeout
        return max(0.001, min(self.timeout, self.deadline - time.monotonic()))

    def exchange(self, payloads: Mapping[int, bytes]) -> dict[int, bytes]:
        """One round: ``payloads[p]`` to each peer ``p``; returns what each peer sent."""
        self._step += 1
        t = self._wait_budget()
        got = self.transport.exchange(self.session_id, self._step, payloads, timeout=t)
        c = self.costs
        c.rounds += 1
        for p, data in payloads.items():
            c.bytes_sent += len(data)
            c.sent_per_peer[p] = c.sent_per_peer.get(p, 0) + len(data)
        c.bytes_received += sum(len(d) for d in got.values())
        return got

    def open(self, shares: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """Reveal several shared tensors to every party in ONE round.

        Cost: 1 round; each party sends 8 bytes per element to each peer.
        """
        payload = pack_ring(shares)
        got = self.exchange({p: payload for p in self.peers})
        shapes = [s.shape for s in shares]
        totals = [s.clone() for s in shares]
        for p in self.peers:
            for tot, part in zip(totals, unpack_ring(got[p], shapes)):
                tot += part.to(self.device)
        return totals

    def open_one(self, share: torch.Tensor) -> torch.Tensor:
        return self.open([share])[0]
