"""The gRPC transport between party processes: mailboxes, chunking, deadlines, mTLS.

Party ``i`` runs one :class:`GrpcTransport`. Outgoing messages go as unary
``PeerExchange.Send`` RPCs over one lazily created channel per peer (mTLS in production),
each with a deadline; payloads above ``chunk_bytes`` are split into several ``Send`` calls
(pipelined, at most :data:`MAX_INFLIGHT_CHUNKS` in flight) and reassembled by the
receiver. Incoming messages land in a per-session mailbox keyed ``(step, sender)`` that
``recv`` waits on. The party server mounts :attr:`GrpcTransport.servicer` on its own gRPC
server with :meth:`GrpcTransport.add_to_server`.

Cost per protocol round and peer: one ``Send`` RPC (one HTTP/2 request/response on a warm
connection) per ``chunk_bytes`` of payload, plus protobuf framing of ~20 bytes + tag.
``exchange`` sends to all peers concurrently, so a round with n parties costs one RTT,
not n−1.

Robustness (DESIGN.md "a request that cannot finish ends everywhere"):

* The servicer checks that the caller holds a ``party`` certificate and that
  ``PeerMessage.sender`` is the party id of that certificate (CN ``party<N>``), so a party
  cannot impersonate another.
* Messages may arrive before the local party starts the session; the mailbox keeps them,
  bounded by ``mailbox_bytes`` overall and a TTL for sessions that nobody waits on.
* ``abort`` marks the session failed locally and tells the peers (``PeerExchange.Abort``),
  whose ``recv`` waiters then fail at once with PeerUnavailableError naming the sender.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

import grpc

from secureinfer.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    PeerUnavailableError,
    PermissionDeniedError,
    ProtocolError,
    SecureInferError,
    TransportError,
    UnauthenticatedError,
    error_from_status,
)
from secureinfer.transport.base import Transport
from secureinfer.transport.codec import Reassembler, split_chunks
from secureinfer.transport.mailbox import Mailbox
from secureinfer.v1 import party_pb2, party_pb2_grpc

if TYPE_CHECKING:
    from secureinfer.config import Topology

__all__ = ["Authenticator", "GrpcTransport", "PeerExchangeServicer", "tls_authenticator"]

log = logging.getLogger(__name__)

#: Chunks of one payload in flight at once (bounds the copies held in memory).
MAX_INFLIGHT_CHUNKS = 4
#: Longest session id accepted from the network.
MAX_SESSION_ID = 256
#: Longest abort reason kept from the network.
MAX_REASON = 1000
#: Room left for the PeerMessage fields around a chunk (session id ≤ 256 chars + ints).
_FRAMING_BYTES = 1024

#: Maps the caller of an RPC to its party id, or raises PermissionDenied/Unauthenticated.
Authenticator = Callable[[grpc.ServicerContext], int]


def tls_authenticator(*, insecure_metadata: bool = False) -> Authenticator:
    """The production authenticator: a verified certificate of role ``party``, CN ``party<N>``.

    ``insecure_metadata`` (``tls = false`` clusters only, no security) accepts the
    unauthenticated identity header instead, see :mod:`secureinfer.transport.tls`.
    """
    from secureinfer.config import ROLE_PARTY
    from secureinfer.transport import tls

    def authenticate(context: grpc.ServicerContext) -> int:
        ident = tls.require_role(context, ROLE_PARTY, insecure_metadata=insecure_metadata)
        if ident.party_id is None:
            raise PermissionDeniedError(f"certificate {ident.name!r} does not name a party (party<N>)")
        return ident.party_id

    return authenticate


def _abort_rpc(context: grpc.ServicerContext, exc: SecureInferError) -> None:
    if isinstance(exc, ProtocolError):  # a malformed message from the caller
        context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
    code = getattr(grpc.StatusCode, exc.grpc_code, grpc.StatusCode.INTERNAL)
    context.abort(code, str(exc))


class PeerExchangeServicer(party_pb2_grpc.PeerExchangeServicer):
    """Server side of ``PeerExchange``: authenticates the sender, fills the mailbox."""

    def __init__(self, transport: GrpcTransport) -> None:
        self._t = transport

    def _caller(self, context: grpc.ServicerContext, claimed: int) -> None:
        t = self._t
        if t.authenticate is not None:
            actual = t.authenticate(context)
            if actual != claimed:
                raise PermissionDeniedError(
                    f"caller with the certificate of party {actual} claims to be party {claimed}"
                )
        if not 0 <= claimed < t.n_parties or claimed == t.party_id:
            raise InvalidArgumentError(f"sender {claimed} is not a peer of party {t.party_id}")

    def Send(self, request: party_pb2.PeerMessage, context: grpc.ServicerContext) -> party_pb2.PeerAck:
        try:
            self._caller(context, request.sender)
            sid = request.session_id
            if not sid or len(sid) > MAX_SESSION_ID:
                raise InvalidArgumentError("session_id must have 1..256 characters")
            key = (sid, request.step, request.sender)
            count = max(request.chunk_count, 1)  # 0 (unset) means a single chunk
            whole = self._t._reassembler.add(key, request.chunk_index, count, request.payload)
            if whole is not None:
                self._t._mailbox.put(sid, request.step, request.sender, whole)
        except SecureInferError as exc:
            _abort_rpc(context, exc)
        return party_pb2.PeerAck()

    def Abort(self, request: party_pb2.AbortNotice, context: grpc.ServicerContext) -> party_pb2.PeerAck:
        try:
            self._caller(context, request.sender)
            if not request.session_id or len(request.session_id) > MAX_SESSION_ID:
                raise InvalidArgumentError("session_id must have 1..256 characters")
            reason = request.reason[:MAX_REASON]
            log.info("party %d: session %s aborted by party %d: %s",
                     self._t.party_id, request.session_id, request.sender, reason)
            self._t._mailbox.abort(
                request.session_id,
                f"session {request.session_id} aborted by party {request.sender}: {reason}",
            )
        except SecureInferError as exc:
            _abort_rpc(context, exc)
        return party_pb2.PeerAck()


class GrpcTransport(Transport):
    """Party ``party_id``'s endpoint: gRPC client to every peer plus a mailbox servicer.

    ``addresses[i]`` is party ``i``'s ``host:port`` (the own entry is not dialled).
    ``credentials`` are the mTLS channel credentials (``tls.channel_credentials``);
    ``None`` means plaintext, for tests only. ``authenticate`` maps an incoming RPC to the
    caller's party id (:func:`tls_authenticator` in production); ``None`` trusts the
    ``sender`` field and is only safe on plaintext test setups. ``metadata`` goes with every
    outgoing call. :meth:`from_topology` sets all of these from the topology file.
    """

    def __init__(
        self,
        party_id: int,
        addresses: Sequence[str],
        *,
        credentials: grpc.ChannelCredentials | None = None,
        authenticate: Authenticator | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
        metadata: Sequence[tuple[str, str]] = (),
        rpc_timeout_s: float = 10.0,
        chunk_bytes: int = 4 << 20,
        max_message_bytes: int = 64 << 20,
        mailbox_bytes: int = 1 << 30,
        mailbox_ttl_s: float = 300.0,
        max_sessions: int = 4096,
        abort_timeout_s: float = 2.0,
    ) -> None:
        if len(addresses) < 2:
            raise InvalidArgumentError("need at least two parties")
        if not 0 <= party_id < len(addresses):
            raise InvalidArgumentError(f"party id {party_id} out of range 0..{len(addresses) - 1}")
        if chunk_bytes <= 0 or max_message_bytes <= 2 * _FRAMING_BYTES:
            raise InvalidArgumentError(
                f"chunk_bytes ({chunk_bytes}) and max_message_bytes ({max_message_bytes}) too small"
            )
        self.party_id = party_id
        self.n_parties = len(addresses)
        self.addresses = tuple(addresses)
        self.credentials = credentials
        self.authenticate = authenticate
        self.rpc_timeout_s = rpc_timeout_s
        # A chunk plus its tag must fit the gRPC limit the receiver enforces.
        self.chunk_bytes = min(chunk_bytes, max_message_bytes - _FRAMING_BYTES)
        self.abort_timeout_s = abort_timeout_s
        self.metadata = tuple(metadata)
        options: dict[str, Any] = {
            "grpc.max_send_message_length": max_message_bytes,
            "grpc.max_receive_message_length": max_message_bytes,
            # A restarted peer must be reachable again within seconds, not minutes.
            "grpc.initial_reconnect_backoff_ms": 100,
            "grpc.max_reconnect_backoff_ms": 1000,
            "grpc.enable_http_proxy": 0,
        }
        options.update(dict(channel_options))
        self._options = list(options.items())
        self._mailbox = Mailbox(max_bytes=mailbox_bytes, ttl_s=mailbox_ttl_s, max_sessions=max_sessions)
        self._reassembler = Reassembler(max_bytes=mailbox_bytes, max_age_s=mailbox_ttl_s)
        self._lock = threading.Lock()
        self._channels: dict[int, grpc.Channel] = {}
        self._stubs: dict[int, party_pb2_grpc.PeerExchangeStub] = {}
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self.servicer = PeerExchangeServicer(self)

    @classmethod
    def from_topology(cls, topology: Topology, party_id: int, **kwargs: Any) -> GrpcTransport:
        """The transport of party ``party_id`` as the topology file describes it (mTLS if on).

        ``kwargs`` override any constructor argument (e.g. ``mailbox_bytes``).
        """
        from secureinfer.errors import ConfigError
        from secureinfer.transport import tls

        cluster = topology.cluster
        me = topology.party(party_id)
        kwargs.setdefault("channel_options", tuple(tls.channel_options(cluster)))
        if cluster.tls:
            if me.cert is None or me.key is None or cluster.ca_cert is None:
                raise ConfigError(f"tls = true needs cert, key and ca_cert for {me.name}")
            kwargs.setdefault("credentials", tls.channel_credentials(me.cert, me.key, cluster.ca_cert))
            kwargs.setdefault("authenticate", tls_authenticator())
        else:  # debugging only: the identity header is unauthenticated
            kwargs.setdefault("authenticate", tls_authenticator(insecure_metadata=True))
            kwargs.setdefault("metadata", tls.insecure_identity_metadata(me.name, me.role))
        kwargs.setdefault("rpc_timeout_s", cluster.rpc_timeout_s)
        kwargs.setdefault("chunk_bytes", cluster.chunk_bytes)
        kwargs.setdefault("max_message_bytes", cluster.max_message_bytes)
        return cls(party_id, [p.address for p in topology.parties], **kwargs)

    @property
    def pending_bytes(self) -> int:
        """Bytes held in mailboxes and partial chunked messages (not yet received)."""
        return self._mailbox.size + self._reassembler.pending_bytes

    @property
    def open_sessions(self) -> int:
        """Sessions with a mailbox (waited on, holding messages, or marked aborted)."""
        return len(self._mailbox.boxes)

    def add_to_server(self, server: grpc.Server) -> None:
        """Mount the ``PeerExchange`` service on the party's gRPC server."""
        party_pb2_grpc.add_PeerExchangeServicer_to_server(self.servicer, server)

    # ------------------------------------------------------------------ outgoing

    def _peer(self, dst: int) -> str:
        return f"party {dst} at {self.addresses[dst]}"

    def _stub(self, dst: int) -> party_pb2_grpc.PeerExchangeStub:
        if not 0 <= dst < self.n_parties or dst == self.party_id:
            raise InvalidArgumentError(f"party {dst} is not a peer of party {self.party_id}")
        stub = self._stubs.get(dst)
        if stub is not None:
            return stub
        with self._lock:
            if self._closed:
                raise TransportError(f"transport of party {self.party_id} is closed")
            if dst not in self._stubs:
                addr = self.addresses[dst]
                if self.credentials is None:
                    ch = grpc.insecure_channel(addr, options=self._options)
                else:
                    ch = grpc.secure_channel(addr, self.credentials, options=self._options)
                self._channels[dst] = ch
                self._stubs[dst] = party_pb2_grpc.PeerExchangeStub(ch)
            return self._stubs[dst]

    def _error(self, exc: grpc.RpcError, dst: int, what: str, timeout: float) -> SecureInferError:
        code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
        details = exc.details() if hasattr(exc, "details") else str(exc)
        peer = self._peer(dst)
        if code == grpc.StatusCode.UNAVAILABLE:
            return PeerUnavailableError(f"{peer} unavailable: {details}")
        if code == grpc.StatusCode.DEADLINE_EXCEEDED:
            return DeadlineExceededError(f"{peer} did not answer {what} within {timeout:.1f}s")
        if code == grpc.StatusCode.PERMISSION_DENIED:
            return PermissionDeniedError(f"{peer} refused {what}: {details}")
        if code == grpc.StatusCode.UNAUTHENTICATED:
            return UnauthenticatedError(f"{peer} refused {what}: {details}")
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
            return TransportError(f"{peer} refused {what}: {details}")
        return error_from_status(code.name, f"{peer} failed {what}: {details}")

    def send(self, session_id: str, step: int, dst: int, payload: bytes, *, timeout: float) -> None:
        """Deliver ``payload`` to ``dst``; returns once the peer holds it in its mailbox.

        The deadline is ``min(timeout, rpc_timeout_s)`` for all chunks together.
        """
        if step < 0:
            raise InvalidArgumentError(f"step must be non-negative, got {step}")
        stub = self._stub(dst)
        timeout = min(timeout, self.rpc_timeout_s)
        deadline = time.monotonic() + timeout
        chunks = split_chunks(payload, self.chunk_bytes)
        what = f"message (session {session_id}, step {step})"
        inflight: deque[grpc.Future] = deque()
        try:
            if len(chunks) == 1:  # the common case: one blocking call, no future machinery
                stub.Send(
                    party_pb2.PeerMessage(
                        session_id=session_id, step=step, sender=self.party_id,
                        chunk_index=0, chunk_count=1, payload=chunks[0],
                    ),
                    timeout=timeout,
                    metadata=self.metadata,
                )
                return
            for i, chunk in enumerate(chunks):
                if len(inflight) >= MAX_INFLIGHT_CHUNKS:
                    inflight.popleft().result()
                left = deadline - time.monotonic()
                if left <= 0:
                    raise DeadlineExceededError(
                        f"{self._peer(dst)} did not accept {what} within {timeout:.1f}s"
                    )
                msg = party_pb2.PeerMessage(
                    session_id=session_id, step=step, sender=self.party_id,
                    chunk_index=i, chunk_count=len(chunks), payload=chunk,
                )
                inflight.append(stub.Send.future(msg, timeout=left, metadata=self.metadata))
            while inflight:
                inflight.popleft().result()
        except grpc.RpcError as exc:
            raise self._error(exc, dst, what, timeout) from None
        finally:
            for f in inflight:
                f.cancel()

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(
                    max_workers=max(2, 2 * (self.n_parties - 1)),
                    thread_name_prefix=f"party{self.party_id}-send",
                )
            return self._pool

    def exchange(
        self, session_id: str, step: int, payloads: Mapping[int, bytes], *, timeout: float
    ) -> dict[int, bytes]:
        """One round: sends to every peer in the background while receiving from each.

        A send does not wait for the peer's acknowledgement before this party starts
        waiting for the peer's own message, so a round costs about one one-way trip
        instead of a full RPC round trip plus the wait. A failed send aborts the session
        locally at once, so a pending receive fails with the send's error (naming the
        peer) instead of running into its timeout.
        """
        peers = [p for p in range(self.n_parties) if p != self.party_id]
        missing = [p for p in peers if p not in payloads]
        if missing:
            raise InvalidArgumentError(f"exchange needs a payload for every peer, missing {missing}")
        pool = self._executor()
        futures = [pool.submit(self.send, session_id, step, p, payloads[p], timeout=timeout) for p in peers]

        def on_done(f: Future[None]) -> None:
            exc = f.exception()
            if exc is not None:
                self._mailbox.abort(session_id, str(exc))

        for f in futures:
            f.add_done_callback(on_done)
        try:
            got = {p: self.recv(session_id, step, p, timeout=timeout) for p in peers}
        except SecureInferError:
            for f in futures:  # a send error names the unreachable peer: prefer it
                if f.done() and f.exception() is not None:
                    raise f.exception() from None  # type: ignore[misc]
            raise
        for f in futures:
            if f.done() and f.exception() is not None:
                raise f.exception()  # type: ignore[misc]
        # A send still in flight is not waited for: every peer's reply has arrived, so the
        # round is complete for this party; if that send fails later, on_done aborts the
        # session, which fails the next receive (or the peer times out and aborts).
        return got

    # ------------------------------------------------------------------ incoming

    def recv(self, session_id: str, step: int, src: int, *, timeout: float) -> bytes:
        if not 0 <= src < self.n_parties or src == self.party_id:
            raise InvalidArgumentError(f"party {src} is not a peer of party {self.party_id}")
        return self._mailbox.take(
            session_id, step, src, timeout=timeout,
            describe=lambda: f"party {self.party_id} timed out waiting for {self._peer(src)}",
        )

    def abort(self, session_id: str, reason: str, *, notify_peers: bool = True) -> None:
        self._mailbox.abort(session_id, f"session {session_id} aborted: {reason}")
        if not notify_peers:
            return
        notice = party_pb2.AbortNotice(
            session_id=session_id, sender=self.party_id, reason=reason[:MAX_REASON]
        )
        futures: list[tuple[int, grpc.Future]] = []
        for p in range(self.n_parties):
            if p == self.party_id:
                continue
            try:
                call = self._stub(p).Abort.future(
                    notice, timeout=self.abort_timeout_s, metadata=self.metadata
                )
                futures.append((p, call))
            except SecureInferError as exc:  # closed transport: nothing to tell
                log.debug("party %d: abort notice to party %d not sent: %s", self.party_id, p, exc)
        for p, f in futures:
            try:
                f.result()
            except grpc.RpcError as exc:  # best effort: the peer's own deadline still applies
                log.warning("party %d: could not notify %s of abort: %s",
                            self.party_id, self._peer(p), exc.code() if hasattr(exc, "code") else exc)

    def close_session(self, session_id: str) -> None:
        self._mailbox.close(session_id)
        self._reassembler.discard(lambda key: isinstance(key, tuple) and key[0] == session_id)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            channels = list(self._channels.values())
            self._channels.clear()
            self._stubs.clear()
            pool, self._pool = self._pool, None
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
        for ch in channels:
            ch.close()
