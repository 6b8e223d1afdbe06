"""Message transports between compute parties: one interface, several implementations."""

from __future__ import annotations

from secureinfer.transport.base import Transport
from secureinfer.transport.inprocess import InProcessNetwork, InProcessTransport

__all__ = ["InProcessNetwork", "InProcessTransport", "Transport"]
