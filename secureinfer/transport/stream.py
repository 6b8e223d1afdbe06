"""The party-to-party data path: one framed mutual-TLS stream per ordered peer pair.

Party ``i`` listens on its ``data_address`` (a port beside its gRPC port) and dials every
peer's once, lazily; the connection ``i -> j`` carries only ``i``'s messages to ``j``, so
no connection is shared by two writers and none needs tie-breaking. Control (deploy,
inference requests, the dealer) stays on gRPC; only the per-round traffic of the
protocols moves here, because a unary gRPC call costs ~0.4 ms of framework per message in
Python (HTTP/2 stream set-up, completion-queue threads), several times a loopback RTT.

Frame (big-endian)::

    magic "SI" | version 1 (u8) | kind (u8) | step (u32) | len(session id) (u16) | 0 (u16)
    | len(payload) (u64) | session id (UTF-8) | payload

Kinds: ``HELLO`` (first frame of a connection; payload = the sender's party id, u16),
``MESSAGE`` and ``ABORT`` (payload = the reason, UTF-8). A message is one frame whatever
its size (no chunking: the stream is ordered), at most ``max_frame_bytes``.

Cost per round and peer: one ``sendall`` of header + payload (one TLS record per 16 KiB)
and one wake-up of the waiting thread by the connection's reader thread; measured by
``scripts/bench_transport.py``.

Security and robustness (DESIGN.md "a request that cannot finish ends everywhere"):

* TLS 1.3 with client certificates, only the cluster CA trusted, hostname checked
  (:func:`~secureinfer.transport.tls.socket_contexts`). The dialler checks that the server
  is ``party<dst>``; the listener reads the sender's party id from its certificate
  (role ``party``, CN ``party<N>``) and closes a connection whose HELLO claims another id.
  With ``tls = false`` (debugging only) the HELLO claim is trusted.
* The listener validates every header (magic, version, kind, lengths) before it reads a
  byte of payload; a malformed frame closes that connection, never the process.
* Deadlines: a send gets ``min(timeout, rpc_timeout_s)`` for the connect, handshake and
  write together; a timed-out or failed write closes the connection (the next send dials
  again) and raises DeadlineExceededError / PeerUnavailableError naming the peer.
* A lost incoming connection (the peer died or closed it) aborts, at once, every session
  waiting for that peer's message: TCP delivered everything sent before the loss, so
  nothing more will come for them. A full mailbox or a conflicting duplicate aborts the
  session on every party (ABORT frames), since the sender is not waiting for an answer.
* Before writing on an idle outgoing connection the sender checks it is not readable:
  the receiver never writes on it, so readable means closed (e.g. the peer restarted),
  and it dials again instead of losing the message into a dead socket.
"""

from __future__ import annotations

import logging
import select
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from secureinfer.errors import (
    DeadlineExceededError,
    InvalidArgumentError,
    PeerUnavailableError,
    PermissionDeniedError,
    ProtocolError,
    SecureInferError,
    TransportError,
)
from secureinfer.transport.base import Transport
from secureinfer.transport.mailbox import Mailbox

if TYPE_CHECKING:
    from secureinfer.config import Topology

__all__ = ["StreamTransport"]

log = logging.getLogger(__name__)

_HEADER = struct.Struct("!2sBBIHHQ")
_MAGIC = b"SI"
_VERSION = 1
HELLO, MESSAGE, ABORT = 1, 2, 3
#: Longest session id accepted from the network.
MAX_SESSION_ID = 256
#: Longest abort reason sent or kept.
MAX_REASON = 1000
#: Payloads up to this size go out in one write with their header (one copy, one record).
_COALESCE_BYTES = 64 << 10
#: How long a send keeps re-dialling a peer that refuses connections (a restart).
_REDIAL_S = 1.0


class _Closed(Exception):
    """The connection ended (EOF) while a frame was expected."""


def _split(address: str) -> tuple[str, int]:
    from secureinfer.config import split_address

    return split_address(address)


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray(n)
    view = memoryview(buf)
    got = 0
    while got < n:
        k = sock.recv_into(view[got:], n - got)
        if k == 0:
            raise _Closed()
        got += k
    return bytes(buf)


class _Out:
    """The outgoing connection to one peer; its lock keeps frames whole."""

    __slots__ = ("lock", "sock")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.sock: socket.socket | None = None


class StreamTransport(Transport):
    """Party ``party_id``'s data-path endpoint: a listener plus one dialled stream per peer.

    ``addresses[i]`` is party ``i``'s data address (``host:port``; the own entry is where
    this party listens). ``server_context`` / ``client_context`` come from
    :func:`~secureinfer.transport.tls.socket_contexts`; both ``None`` means plaintext
    (``tls = false``, tests and debugging only). :meth:`from_topology` sets everything
    from the topology file. Call :meth:`start` to listen.
    """

    def __init__(
        self,
        party_id: int,
        addresses: Sequence[str],
        *,
        server_context: ssl.SSLContext | None = None,
        client_context: ssl.SSLContext | None = None,
        rpc_timeout_s: float = 10.0,
        max_frame_bytes: int = 1 << 30,
        mailbox_bytes: int = 1 << 30,
        mailbox_ttl_s: float = 300.0,
        max_sessions: int = 4096,
        abort_timeout_s: float = 2.0,
        handshake_timeout_s: float = 10.0,
    ) -> None:
        if len(addresses) < 2:
            raise InvalidArgumentError("need at least two parties")
        if not 0 <= party_id < len(addresses):
            raise InvalidArgumentError(f"party id {party_id} out of range 0..{len(addresses) - 1}")
        if (server_context is None) != (client_context is None):
            raise InvalidArgumentError("give both SSL contexts (mTLS) or neither (plaintext)")
        self.party_id = party_id
        self.n_parties = len(addresses)
        self.addresses = tuple(addresses)
        self._endpoints = [_split(a) for a in addresses]
        self._server_ctx = server_context
        self._client_ctx = client_context
        self.rpc_timeout_s = rpc_timeout_s
        self.max_frame_bytes = max_frame_bytes
        self.abort_timeout_s = abort_timeout_s
        self.handshake_timeout_s = handshake_timeout_s
        self._mailbox = Mailbox(max_bytes=mailbox_bytes, ttl_s=mailbox_ttl_s, max_sessions=max_sessions)
        self._out = {p: _Out() for p in range(self.n_parties) if p != party_id}
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._incoming: set[socket.socket] = set()
        self._threads: list[threading.Thread] = []
        self._pool: ThreadPoolExecutor | None = None
        self._closed = False
        self.port: int | None = None
        #: called with a peer's id when its incoming connection is lost (it died or
        #: restarted); the party server drops state that peer may no longer share
        self.on_peer_lost: Callable[[int], None] | None = None

    @classmethod
    def from_topology(cls, topology: Topology, party_id: int, **kwargs: Any) -> StreamTransport:
        """The data path of party ``party_id`` as the topology describes it (mTLS if on)."""
        from secureinfer.transport import tls

        cluster = topology.cluster
        me = topology.party(party_id)
        if cluster.tls:
            server, client = tls.socket_contexts(cluster, cert=me.cert, key=me.key)
            kwargs.setdefault("server_context", server)
            kwargs.setdefault("client_context", client)
        kwargs.setdefault("rpc_timeout_s", cluster.rpc_timeout_s)
        return cls(party_id, [p.data_address for p in topology.parties], **kwargs)

    @property
    def pending_bytes(self) -> int:
        """Bytes held in mailboxes (received, not yet taken)."""
        return self._mailbox.size

    @property
    def open_sessions(self) -> int:
        """Sessions with a mailbox (waited on, holding messages, or marked aborted)."""
        return len(self._mailbox.boxes)

    def _peer(self, p: int) -> str:
        return f"party {p} at {self.addresses[p]} (data)"

    # ------------------------------------------------------------------ listening

    def start(self) -> int:
        """Listen on this party's data address; returns the bound port.

        Raises :class:`~secureinfer.errors.ConfigError` if the address cannot be bound.
        """
        from secureinfer.errors import ConfigError

        host, port = self._endpoints[self.party_id]
        try:
            lsock = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET,
                                         backlog=64)
        except OSError as exc:
            raise ConfigError(f"cannot listen on data address {self.addresses[self.party_id]}: {exc}") from None
        self._listener = lsock
        self.port = lsock.getsockname()[1]
        t = threading.Thread(target=self._accept_loop, name=f"party{self.party_id}-data-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self.port

    def _accept_loop(self) -> None:
        lsock = self._listener
        while lsock is not None and not self._closed:
            try:
                conn, addr = lsock.accept()
            except OSError:
                return  # closed
            if self._closed:
                conn.close()
                return
            t = threading.Thread(target=self._serve, args=(conn, addr), daemon=True,
                                 name=f"party{self.party_id}-data-in")
            t.start()

    def _handshake(self, conn: socket.socket) -> tuple[socket.socket, int]:
        """TLS handshake and HELLO; returns (socket, sender id) or raises."""
        conn.settimeout(self.handshake_timeout_s)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock: socket.socket = conn
        cert_party: int | None = None
        if self._server_ctx is not None:
            from secureinfer.transport import tls

            sock = self._server_ctx.wrap_socket(conn, server_side=True)  # takes over conn's descriptor
        try:
            if self._server_ctx is not None:
                ident = tls.socket_peer_identity(sock)  # type: ignore[arg-type]
                if ident.party_id is None:
                    raise PermissionDeniedError(f"{ident.name!r} (role {ident.role!r}) is not a party")
                cert_party = ident.party_id
            magic, version, kind, _step, sid_len, _, plen = _HEADER.unpack(_read_exact(sock, _HEADER.size))
            if magic != _MAGIC or version != _VERSION or kind != HELLO or sid_len != 0 or plen != 2:
                raise ProtocolError("the first frame of a data connection must be HELLO")
            (sender,) = struct.unpack("!H", _read_exact(sock, 2))
            if cert_party is not None and cert_party != sender:
                raise PermissionDeniedError(
                    f"caller with the certificate of party {cert_party} claims to be party {sender}")
            if not 0 <= sender < self.n_parties or sender == self.party_id:
                raise ProtocolError(f"sender {sender} is not a peer of party {self.party_id}")
            sock.settimeout(None)  # an idle connection is normal; TCP keepalive finds dead ones
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            return sock, sender
        except BaseException:
            sock.close()
            raise

    def _serve(self, conn: socket.socket, addr: Any) -> None:
        """Reader of one incoming connection: frames into the mailbox until it ends."""
        sender: int | None = None
        sock = conn
        try:
            sock, sender = self._handshake(conn)
            with self._lock:
                if self._closed:
                    return
                self._incoming.add(sock)
            while True:
                self._read_frame(sock, sender)
        except _Closed:
            pass
        except (OSError, ssl.SSLError, SecureInferError, struct.error) as exc:
            if not self._closed:
                log.warning("party %d: data connection from %s (party %s) closed: %s",
                            self.party_id, addr, sender, exc)
        finally:
            with self._lock:
                self._incoming.discard(sock)
            try:
                sock.close()
            except OSError:
                pass
            if sender is not None and not self._closed:
                n = self._mailbox.abort_waiting_on(
                    sender, f"connection from {self._peer(sender)} lost (did it stop?)")
                if n:
                    log.info("party %d: %d session(s) waiting for party %d aborted: connection lost",
                             self.party_id, n, sender)
                if self.on_peer_lost is not None:
                    try:
                        self.on_peer_lost(sender)
                    except Exception as exc:  # a hook must not kill the reader's cleanup
                        log.error("party %d: on_peer_lost hook failed: %r", self.party_id, exc)

    def _read_frame(self, sock: socket.socket, sender: int) -> None:
        magic, version, kind, step, sid_len, _, plen = _HEADER.unpack(_read_exact(sock, _HEADER.size))
        if magic != _MAGIC or version != _VERSION:
            raise ProtocolError("bad frame magic or version")
        if kind not in (MESSAGE, ABORT):
            raise ProtocolError(f"unexpected frame kind {kind}")
        if not 1 <= sid_len <= MAX_SESSION_ID:
            raise ProtocolError(f"session id of {sid_len} bytes (1..{MAX_SESSION_ID})")
        limit = self.max_frame_bytes if kind == MESSAGE else MAX_REASON * 4
        if plen > limit:
            raise ProtocolError(f"frame of {plen} bytes exceeds the limit of {limit}")
        try:
            sid = _read_exact(sock, sid_len).decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError("session id is not UTF-8") from None
        payload = _read_exact(sock, plen) if plen else b""
        if kind == ABORT:
            reason = payload.decode("utf-8", "replace")[:MAX_REASON]
            log.info("party %d: session %s aborted by party %d: %s", self.party_id, sid, sender, reason)
            self._mailbox.abort(sid, f"session {sid} aborted by party {sender}: {reason}")
            return
        try:
            self._mailbox.put(sid, step, sender, payload)
        except (ProtocolError, TransportError) as exc:  # conflicting duplicate, mailbox full
            log.warning("party %d: message of party %d refused (session %s): %s", self.party_id, sender, sid, exc)
            # the sender does not wait for an answer: end the session everywhere
            self._executor().submit(self.abort, sid, f"party {self.party_id} refused a message: {exc}")

    # ------------------------------------------------------------------ sending

    def _dial(self, dst: int, deadline: float) -> socket.socket:
        """Connect, handshake and HELLO to ``dst`` (re-dialling briefly if refused)."""
        host, port = self._endpoints[dst]
        redial_until = min(deadline, time.monotonic() + _REDIAL_S)
        delay = 0.02
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceededError(f"{self._peer(dst)}: no connection within the deadline")
            try:
                raw = socket.create_connection((host, port), timeout=left)
            except OSError as exc:
                if time.monotonic() + delay < redial_until:
                    time.sleep(delay)
                    delay = min(delay * 2, 0.2)
                    continue
                raise PeerUnavailableError(f"{self._peer(dst)} unavailable: {exc}") from None
            sock: socket.socket = raw
            try:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                raw.settimeout(max(deadline - time.monotonic(), 1e-3))
                if self._client_ctx is not None:
                    from secureinfer.transport import tls

                    # the SSL socket takes over raw's descriptor (and closes it if the handshake fails)
                    sock = self._client_ctx.wrap_socket(raw, server_hostname=host)
                    ident = tls.socket_peer_identity(sock)  # type: ignore[arg-type]
                    if ident.party_id != dst:
                        raise PermissionDeniedError(
                            f"{self._peer(dst)} presented the certificate of {ident.name!r} (role {ident.role!r})")
                sock.sendall(_HEADER.pack(_MAGIC, _VERSION, HELLO, 0, 0, 0, 2) + struct.pack("!H", self.party_id))
                return sock
            except socket.timeout:
                sock.close()
                raise DeadlineExceededError(f"{self._peer(dst)}: TLS handshake not done within the deadline") from None
            except (OSError, ssl.SSLError) as exc:
                sock.close()
                raise PeerUnavailableError(f"{self._peer(dst)}: TLS handshake failed: {exc}") from None
            except SecureInferError:
                sock.close()
                raise

    @staticmethod
    def _stale(sock: socket.socket) -> bool:
        """True if the peer closed ``sock`` (it never writes on it, so readable = closed)."""
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _send_frame(self, dst: int, kind: int, session_id: str, step: int, payload: bytes | memoryview,
                    timeout: float) -> None:
        if not 0 <= dst < self.n_parties or dst == self.party_id:
            raise InvalidArgumentError(f"party {dst} is not a peer of party {self.party_id}")
        sid = session_id.encode("utf-8")
        if not 1 <= len(sid) <= MAX_SESSION_ID:
            raise InvalidArgumentError(f"session id must have 1..{MAX_SESSION_ID} bytes")
        if len(payload) > self.max_frame_bytes:
            raise InvalidArgumentError(
                f"message of {len(payload)} bytes exceeds the data path's limit of {self.max_frame_bytes}")
        if self._closed:
            raise TransportError(f"transport of party {self.party_id} is closed")
        head = _HEADER.pack(_MAGIC, _VERSION, kind, step, len(sid), 0, len(payload)) + sid
        deadline = time.monotonic() + timeout
        out = self._out[dst]
        with out.lock:
            if out.sock is not None and self._stale(out.sock):
                self._drop(out)
            if out.sock is None:
                out.sock = self._dial(dst, deadline)
            sock = out.sock
            try:
                sock.settimeout(max(deadline - time.monotonic(), 1e-3))
                if len(payload) <= _COALESCE_BYTES:
                    sock.sendall(head + payload)
                else:
                    sock.sendall(head)
                    sock.sendall(payload)
            except socket.timeout:
                self._drop(out)  # a partial frame may be on the wire: the stream is unusable
                raise DeadlineExceededError(
                    f"{self._peer(dst)} did not accept a message (session {session_id}, step {step}) "
                    f"within {timeout:.1f}s") from None
            except (OSError, ssl.SSLError) as exc:
                self._drop(out)
                raise PeerUnavailableError(f"{self._peer(dst)} unavailable: {exc}") from None

    def connect_peers(self, *, timeout: float) -> list[int]:
        """Dial every peer whose outgoing stream is not open (TCP + TLS 1.3 handshake with
        certificates, a few ms each), so that the first request after a start or a peer's
        restart does not pay for it; returns the peers not reached (they are dialled again
        by the next send)."""
        failed = []
        for dst, out in self._out.items():
            with out.lock:
                if out.sock is not None and not self._stale(out.sock):
                    continue
                self._drop(out)
                try:
                    out.sock = self._dial(dst, time.monotonic() + timeout)
                except (SecureInferError, OSError):
                    failed.append(dst)
        return failed

    @staticmethod
    def _drop(out: _Out) -> None:
        if out.sock is not None:
            try:
                out.sock.close()
            except OSError:
                pass
            out.sock = None

    def send(self, session_id: str, step: int, dst: int, payload: bytes, *, timeout: float) -> None:
        """Write ``payload`` to ``dst``'s stream; returns once the kernel has taken it."""
        if step < 0 or step >= 1 << 32:
            raise InvalidArgumentError(f"step must be in 0..2^32-1, got {step}")
        self._send_frame(dst, MESSAGE, session_id, step, payload, min(timeout, self.rpc_timeout_s))

    def _executor(self) -> ThreadPoolExecutor:
        with self._lock:
            if self._pool is None:
                self._pool = ThreadPoolExecutor(max_workers=max(2, self.n_parties),
                                                thread_name_prefix=f"party{self.party_id}-data-send")
            return self._pool

    def exchange(
        self, session_id: str, step: int, payloads: Mapping[int, bytes], *, timeout: float
    ) -> dict[int, bytes]:
        """One round: write to every peer, then read from each.

        Writes go out from the calling thread (no hand-off) unless there are several peers
        and large payloads, which then go out concurrently so both links carry data at
        once. A write returns once the kernel holds the bytes, so no party waits on
        another's acknowledgement: a round costs about one one-way trip.
        """
        peers = [p for p in range(self.n_parties) if p != self.party_id]
        missing = [p for p in peers if p not in payloads]
        if missing:
            raise InvalidArgumentError(f"exchange needs a payload for every peer, missing {missing}")
        try:
            if len(peers) > 1 and sum(len(payloads[p]) for p in peers) > 4 * _COALESCE_BYTES:
                futures = [self._executor().submit(self.send, session_id, step, p, payloads[p], timeout=timeout)
                           for p in peers]
                for f in futures:
                    f.result()
            else:
                for p in peers:
                    self.send(session_id, step, p, payloads[p], timeout=timeout)
        except SecureInferError as exc:
            self._mailbox.abort(session_id, str(exc))
            raise
        return {p: self.recv(session_id, step, p, timeout=timeout) for p in peers}

    # ------------------------------------------------------------------ receiving and sessions

    def recv(self, session_id: str, step: int, src: int, *, timeout: float) -> bytes:
        if not 0 <= src < self.n_parties or src == self.party_id:
            raise InvalidArgumentError(f"party {src} is not a peer of party {self.party_id}")
        return self._mailbox.take(
            session_id, step, src, timeout=timeout,
            describe=lambda: f"party {self.party_id} timed out waiting for {self._peer(src)}",
        )

    def abort(self, session_id: str, reason: str, *, notify_peers: bool = True) -> None:
        self._mailbox.abort(session_id, f"session {session_id} aborted: {reason}")
        if not notify_peers or self._closed:
            return
        note = reason[:MAX_REASON].encode("utf-8", "replace")
        for p in self._out:
            try:
                self._send_frame(p, ABORT, session_id, 0, note, self.abort_timeout_s)
            except SecureInferError as exc:  # best effort: the peer's own deadline still applies
                log.warning("party %d: could not notify %s of abort: %s", self.party_id, self._peer(p), exc)

    def close_session(self, session_id: str) -> None:
        self._mailbox.close(session_id)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            incoming = list(self._incoming)
            self._incoming.clear()
            pool, self._pool = self._pool, None
        if self._listener is not None:
            try:  # wakes the accept() blocked in another thread (close alone does not)
                self._listener.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._listener.close()
        for s in incoming:
            try:
                s.shutdown(socket.SHUT_RDWR)
                s.close()
            except OSError:
                pass
        for out in self._out.values():
            with out.lock:
                self._drop(out)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)
