"""StreamTransport on loopback: real TLS sockets, mTLS certificates from secureinfer.certs."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from secureinfer.certs import create_certificates
from secureinfer.config import Topology, free_ports, load_topology, split_address, write_local_topology
from secureinfer.errors import DeadlineExceededError, PeerUnavailableError, PermissionDeniedError
from secureinfer.prg import Prg
from secureinfer.transport import tls
from secureinfer.transport.stream import ABORT, HELLO, MESSAGE, StreamTransport

_HEADER = struct.Struct("!2sBBIHHQ")


@dataclass
class Cluster:
    topology: Topology
    transports: list[StreamTransport]
    kwargs: dict[str, object]

    def restart(self, i: int) -> StreamTransport:
        self.transports[i].close()
        t = StreamTransport.from_topology(self.topology, i, **self.kwargs)  # type: ignore[arg-type]
        t.start()
        self.transports[i] = t
        return t


def _start(tmp_path: Path, n: int, *, tls_on: bool = True, rpc_timeout_s: float = 10.0, **kwargs: object) -> Cluster:
    path = write_local_topology(tmp_path / "topology.toml", base_dir=tmp_path, n_parties=n, tls=tls_on,
                                include_he=False, rpc_timeout_s=rpc_timeout_s)
    topo = load_topology(path, environ={})
    if tls_on:
        create_certificates(topo)
    c = Cluster(topo, [], dict(kwargs))
    for p in topo.parties:
        t = StreamTransport.from_topology(topo, p.id, **kwargs)  # type: ignore[arg-type]
        t.start()
        c.transports.append(t)
    return c


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(n: int, **kwargs: object) -> Cluster:
        c = _start(tmp_path / f"c{len(made)}", n, **kwargs)  # type: ignore[arg-type]
        made.append(c)
        return c

    yield make
    for c in made:
        for t in c.transports:
            t.close()


def _payload(session: str, step: int, src: int, dst: int) -> bytes:
    return f"{session}/{step}/{src}->{dst}".encode() * (step + 1)


@pytest.mark.parametrize(("n", "tls_on"), [(2, True), (3, True), (2, False)])
def test_concurrent_sessions_interleaved(make_cluster: Callable[..., Cluster], n: int, tls_on: bool) -> None:
    c = make_cluster(n, tls_on=tls_on)
    results: dict[tuple[int, str, int], dict[int, bytes]] = {}

    def one(t: StreamTransport, session: str) -> None:
        for step in range(5):
            peers = [p for p in range(n) if p != t.party_id]
            results[(t.party_id, session, step)] = t.exchange(
                session, step, {p: _payload(session, step, t.party_id, p) for p in peers}, timeout=10)

    threads = [threading.Thread(target=one, args=(t, s)) for t in c.transports for s in ("a", "b", "c")]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    for me in range(n):
        for s in ("a", "b", "c"):
            for step in range(5):
                assert results[(me, s, step)] == {p: _payload(s, step, p, me) for p in range(n) if p != me}
    for t in c.transports:
        for s in ("a", "b", "c"):
            t.close_session(s)
        assert t.pending_bytes == 0 and t.open_sessions == 0


def test_message_before_session_start_is_kept_and_large_payloads_are_intact(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(2)
    t0, t1 = c.transports
    t0.send("early", 0, 1, b"first", timeout=5)
    t0.send("early", 1, 1, b"second", timeout=5)
    assert t1.recv("early", 1, 0, timeout=5) == b"second"
    assert t1.recv("early", 0, 0, timeout=5) == b"first"
    big = Prg(b"\x05" * 32).bytes(20 << 20)  # test data
    t0.send("big", 0, 1, big, timeout=30)
    assert t1.recv("big", 0, 0, timeout=30) == big
    t1.close_session("early")
    t1.close_session("big")
    assert t1.pending_bytes == 0


def test_recv_timeout_names_peer(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(2)
    with pytest.raises(DeadlineExceededError) as info:
        c.transports[1].recv("quiet", 3, 0, timeout=0.3)
    msg = str(info.value)
    assert f"party 0 at {c.topology.parties[0].data_address}" in msg and "step 3" in msg


def test_abort_from_peer_fails_waiters_promptly(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(3)
    t0, t1, t2 = c.transports
    errors: dict[int, BaseException] = {}

    def wait(t: StreamTransport) -> None:
        try:
            t.recv("doomed", 4, 1, timeout=20)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertions
            errors[t.party_id] = exc

    waiters = [threading.Thread(target=wait, args=(t,)) for t in (t0, t2)]
    for w in waiters:
        w.start()
    time.sleep(0.2)
    t1.abort("doomed", "dealer unreachable")
    for w in waiters:
        w.join(timeout=5)
        assert not w.is_alive(), "abort did not wake the waiter"
    for pid in (0, 2):
        assert isinstance(errors[pid], PeerUnavailableError)
        assert "aborted by party 1" in str(errors[pid]) and "dealer unreachable" in str(errors[pid])
    for t in c.transports:
        t.close_session("doomed")
    t0.send("doomed", 9, 1, b"fresh", timeout=5)  # a closed session id is usable again
    assert t1.recv("doomed", 9, 0, timeout=5) == b"fresh"


def test_a_lost_peer_fails_its_waiters_at_once_and_a_restarted_peer_is_redialled(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(2, rpc_timeout_s=5.0)
    t0, t1 = c.transports
    t0.send("warm", 0, 1, b"x", timeout=5)  # the connection 0 -> 1 exists
    t1.send("warm", 0, 0, b"y", timeout=5)
    assert t1.recv("warm", 0, 0, timeout=5) == b"x"
    err: list[BaseException] = []

    def wait() -> None:
        try:
            t1.recv("s", 0, 0, timeout=30)
        except BaseException as exc:  # noqa: BLE001 - recorded for the assertion
            err.append(exc)

    th = threading.Thread(target=wait)
    th.start()
    time.sleep(0.2)
    t_lost = time.monotonic()
    c.transports[0].close()  # party 0 dies
    th.join(timeout=5)
    assert not th.is_alive() and time.monotonic() - t_lost < 3
    assert isinstance(err[0], PeerUnavailableError) and "lost" in str(err[0])
    addr = c.topology.parties[0].data_address
    with pytest.raises(PeerUnavailableError, match=f"party 0 at {addr}"):
        t1.send("s2", 0, 0, b"z", timeout=5)  # nobody listens there now
    t0 = c.restart(0)
    t1.send("s3", 0, 0, b"after restart", timeout=5)  # the stale connection is replaced
    assert t0.recv("s3", 0, 1, timeout=5) == b"after restart"
    t0.send("s3", 1, 1, b"and back", timeout=5)
    assert t1.recv("s3", 1, 0, timeout=5) == b"and back"


def test_send_to_port_nobody_listens_on() -> None:
    (port,) = free_ports(1)
    t = StreamTransport(0, ["127.0.0.1:1", f"127.0.0.1:{port}"])
    try:
        t0 = time.monotonic()
        with pytest.raises(PeerUnavailableError, match=f"party 1 at 127.0.0.1:{port}"):
            t.send("s", 0, 1, b"x", timeout=5)
        assert time.monotonic() - t0 < 3  # a short re-dial, not the whole deadline
    finally:
        t.close()


def test_connect_peers_opens_the_streams_ahead_and_reports_the_unreached(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(3)
    t0 = c.transports[0]
    assert all(o.sock is None for o in t0._out.values())  # lazily dialled by default
    assert t0.connect_peers(timeout=5) == []
    socks = {p: o.sock for p, o in t0._out.items()}
    assert all(s is not None for s in socks.values())
    assert t0.connect_peers(timeout=5) == [] and {p: o.sock for p, o in t0._out.items()} == socks  # kept
    t0.send("s", 0, 2, b"hello", timeout=5)  # the first message uses the open stream
    assert c.transports[2].recv("s", 0, 0, timeout=5) == b"hello" and t0._out[2].sock is socks[2]
    c.transports[1].close()
    time.sleep(0.2)
    assert t0.connect_peers(timeout=2) == [1]  # the stale stream is dropped, the redial fails


def test_send_to_stuck_peer_hits_deadline() -> None:
    lsock = socket.create_server(("127.0.0.1", 0))
    port = lsock.getsockname()[1]
    held: list[socket.socket] = []
    th = threading.Thread(target=lambda: held.append(lsock.accept()[0]), daemon=True)
    th.start()
    t = StreamTransport(0, ["127.0.0.1:1", f"127.0.0.1:{port}"], rpc_timeout_s=0.5)  # plaintext
    try:
        t0 = time.monotonic()
        with pytest.raises(DeadlineExceededError, match="did not accept"):
            t.send("s", 0, 1, bytes(64 << 20), timeout=30)  # nobody reads: capped by rpc_timeout_s
        assert time.monotonic() - t0 < 5
    finally:
        t.close()
        for s in held:
            s.close()
        lsock.close()


def _raw(topo: Topology, *, as_name: str, dst: int) -> socket.socket:
    """A TLS connection to party ``dst``'s data port with the certificate of ``as_name``."""
    if as_name.startswith("party"):
        e = topo.party(int(as_name[5:]))
        cert, key = e.cert, e.key
    else:
        ident = topo.identity(as_name)
        cert, key = ident.cert, ident.key
    _, client = tls.socket_contexts(topo.cluster, cert=cert, key=key)
    host, port = split_address(topo.party(dst).data_address)
    return client.wrap_socket(socket.create_connection((host, port), timeout=5), server_hostname=host)


def _frame(kind: int, sid: bytes, step: int, payload: bytes) -> bytes:
    return _HEADER.pack(b"SI", 1, kind, step, len(sid), 0, len(payload)) + sid + payload


def _hello(sender: int) -> bytes:
    return _HEADER.pack(b"SI", 1, HELLO, 0, 0, 0, 2) + struct.pack("!H", sender)


def _closed_by_peer(s: socket.socket) -> bool:
    """True once the peer closed ``s`` (EOF or reset within 5 s); the listener never
    writes on a data connection, so anything read is the closing TLS alert."""
    s.settimeout(5)
    try:
        while s.recv(4096):
            pass
        return True
    except socket.timeout:
        return False
    except (ConnectionError, OSError):
        return True


def test_forged_sender_and_wrong_role_are_refused(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(3)
    t2 = c.transports[2]
    s = _raw(c.topology, as_name="party1", dst=2)
    s.sendall(_hello(0) + _frame(MESSAGE, b"s", 0, b"evil"))  # party 1 claims to be party 0
    assert _closed_by_peer(s)
    s.close()
    try:  # a valid certificate with the wrong role is refused at the handshake
        s = _raw(c.topology, as_name="client", dst=2)
        s.sendall(_hello(1) + _frame(MESSAGE, b"s", 0, b"evil"))
        assert _closed_by_peer(s)
        s.close()
    except (ConnectionError, OSError):
        pass
    s = _raw(c.topology, as_name="party1", dst=2)
    s.sendall(_hello(1) + _frame(MESSAGE, b"s", 0, b"ok"))
    assert t2.recv("s", 0, 1, timeout=5) == b"ok"
    s.close()
    with pytest.raises(DeadlineExceededError):
        t2.recv("s", 0, 0, timeout=0.2)  # nothing was delivered as party 0


def test_dialler_checks_the_server_is_the_party_it_dialled(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(3)
    topo = c.topology
    server, client = tls.socket_contexts(topo.cluster, cert=topo.party(0).cert, key=topo.party(0).key)
    (port,) = free_ports(1)
    # "party 1" resolves to party 2's listener: its certificate names party2
    t = StreamTransport(0, [f"127.0.0.1:{port}", topo.party(2).data_address], server_context=server,
                        client_context=client)
    try:
        with pytest.raises(PermissionDeniedError, match="party2"):
            t.send("s", 0, 1, b"x", timeout=5)
    finally:
        t.close()


def test_malformed_frames_close_the_connection_and_nothing_else(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(2, mailbox_bytes=1000)
    t0, t1 = c.transports
    bad = [
        b"XX" + _frame(MESSAGE, b"s", 0, b"x")[2:],  # bad magic
        _frame(7, b"s", 0, b"x"),  # unknown kind
        _frame(MESSAGE, b"", 0, b"x"),  # empty session id
        _HEADER.pack(b"SI", 1, MESSAGE, 0, 1, 0, 1 << 62) + b"s",  # huge length: refused before reading
        _frame(MESSAGE, b"\xff\xfe", 0, b"x"),  # session id not UTF-8
        _hello(0),  # a second HELLO
        _frame(MESSAGE, b"s", 0, b"tru")[:-1],  # truncated, then EOF
    ]
    for frame in bad:
        s = _raw(c.topology, as_name="party0", dst=1)
        s.sendall(_hello(0) + frame)
        if frame.endswith(b"tr"):
            s.shutdown(socket.SHUT_WR)
        assert _closed_by_peer(s)
        s.close()
    t0.send("s", 0, 1, b"a", timeout=5)  # the real transport is unaffected
    assert t1.recv("s", 0, 0, timeout=5) == b"a"


def test_full_mailbox_and_conflicting_duplicates_abort_the_session_everywhere(
    make_cluster: Callable[..., Cluster],
) -> None:
    c = make_cluster(2, mailbox_bytes=1000)
    t0, t1 = c.transports
    t0.send("full", 0, 1, b"z" * 1001, timeout=5)  # accepted by the kernel, refused by party 1
    with pytest.raises(PeerUnavailableError, match="mailbox full"):
        t0.recv("full", 0, 1, timeout=5)  # party 1's ABORT arrives
    with pytest.raises(PeerUnavailableError, match="mailbox full"):
        t1.recv("full", 0, 0, timeout=5)
    t0.send("dup", 0, 1, b"a", timeout=5)
    t0.send("dup", 0, 1, b"a", timeout=5)  # a retransmission: ignored
    t0.send("dup", 0, 1, b"b", timeout=5)  # a conflicting one: the session ends
    with pytest.raises(PeerUnavailableError, match="conflicting duplicate"):
        t0.recv("dup", 1, 1, timeout=5)
    for t in c.transports:
        t.close_session("full")
        t.close_session("dup")
    t0.send("next", 0, 1, b"ok", timeout=5)
    assert t1.recv("next", 0, 0, timeout=5) == b"ok"


def test_abort_frame_reason_is_bounded(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(2)
    t1 = c.transports[1]
    s = _raw(c.topology, as_name="party0", dst=1)
    s.sendall(_hello(0) + _frame(ABORT, b"s", 0, b"r" * 100_000))  # over the limit: connection closed
    assert _closed_by_peer(s)
    s.close()
    s = _raw(c.topology, as_name="party0", dst=1)
    s.sendall(_hello(0) + _frame(ABORT, b"s", 0, b"because"))
    with pytest.raises(PeerUnavailableError, match="aborted by party 0: because"):
        t1.recv("s", 0, 0, timeout=5)
    s.close()
