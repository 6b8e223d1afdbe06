"""GrpcTransport on loopback: real gRPC servers, mTLS certificates from secureinfer.certs."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from secureinfer.certs import create_certificates
from secureinfer.config import Topology, free_ports, load_topology, write_local_topology
from secureinfer.errors import (
    DeadlineExceededError,
    PeerUnavailableError,
    PermissionDeniedError,
    SecureInferError,
    TransportError,
)
from secureinfer.prg import Prg
from secureinfer.transport import tls
from secureinfer.transport.grpc import GrpcTransport
from secureinfer.v1 import party_pb2, party_pb2_grpc


@dataclass
class Cluster:
    topology: Topology
    transports: list[GrpcTransport]
    servers: list[grpc.Server]

    def stop(self, i: int) -> None:
        self.servers[i].stop(0).wait()


def _start(
    tmp_path: Path, n: int, *, tls_on: bool = True, rpc_timeout_s: float = 10.0, **kwargs: object
) -> Cluster:
    path = write_local_topology(
        tmp_path / "topology.toml", base_dir=tmp_path, n_parties=n, tls=tls_on,
        include_he=False, rpc_timeout_s=rpc_timeout_s,
    )
    topo = load_topology(path, environ={})
    if tls_on:
        create_certificates(topo)
    cluster = Cluster(topo, [], [])
    for p in topo.parties:
        t = GrpcTransport.from_topology(topo, p.id, **kwargs)  # type: ignore[arg-type]
        server = grpc.server(ThreadPoolExecutor(max_workers=8), options=tls.server_options(topo.cluster))
        t.add_to_server(server)
        tls.bind_server(server, p.address, settings=topo.cluster, cert=p.cert, key=p.key)
        server.start()
        cluster.transports.append(t)
        cluster.servers.append(server)
    return cluster


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
        for s in c.servers:
            s.stop(0)


def _payload(session: str, step: int, src: int, dst: int) -> bytes:
    return f"{session}/{step}/{src}->{dst}".encode() * (step + 1)


def _run_party(t: GrpcTransport, sessions: list[str], steps: int, out: dict[tuple[str, int], dict[int, bytes]]) -> None:
    # Interleave the sessions step by step from one thread per (party, session).
    def one(session: str) -> None:
        for step in range(steps):
            peers = [p for p in range(t.n_parties) if p != t.party_id]
            got = t.exchange(
                session, step, {p: _payload(session, step, t.party_id, p) for p in peers}, timeout=10
            )
            out[(session, step)] = got

    threads = [threading.Thread(target=one, args=(s,)) for s in sessions]
    for th in threads:
        th.start()
    for th in threads:
        th.join()


@pytest.mark.parametrize(("n", "tls_on"), [(2, True), (3, True), (2, False)])
def test_concurrent_sessions_interleaved(make_cluster: Callable[..., Cluster], n: int, tls_on: bool) -> None:
    c = make_cluster(n, tls_on=tls_on)
    sessions = ["sess-a", "sess-b"]
    results: list[dict[tuple[str, int], dict[int, bytes]]] = [{} for _ in range(n)]
    threads = [
        threading.Thread(target=_run_party, args=(t, sessions, 5, results[t.party_id]))
        for t in c.transports
    ]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=60)
    for me in range(n):
        for s in sessions:
            for step in range(5):
                got = results[me][(s, step)]
                assert got == {p: _payload(s, step, p, me) for p in range(n) if p != me}
    for t in c.transports:
        for s in sessions:
            t.close_session(s)
        assert t.pending_bytes == 0 and t.open_sessions == 0


def test_message_before_session_start_is_kept(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(2)
    t0, t1 = c.transports
    t0.send("early", 0, 1, b"first", timeout=5)
    t0.send("early", 1, 1, b"second", timeout=5)
    assert t1.open_sessions == 1 and t1.pending_bytes == 11
    assert t1.recv("early", 1, 0, timeout=5) == b"second"
    assert t1.recv("early", 0, 0, timeout=5) == b"first"
    t0.send("early", 0, 1, b"first", timeout=5)  # same tag again after it was consumed
    t1.close_session("early")
    assert t1.pending_bytes == 0 and t1.open_sessions == 0


def test_large_payload_is_chunked_and_intact(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(2)
    t0, t1 = c.transports
    assert t0.chunk_bytes == 4 << 20
    big = Prg(b"\x05" * 32).bytes(20 << 20)  # test data
    t0.send("big", 0, 1, big, timeout=30)
    assert t1.recv("big", 0, 0, timeout=30) == big
    assert t1.pending_bytes == 0


def test_many_small_chunks_pipelined(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(3, chunk_bytes=1000)
    payloads = {p: Prg(bytes([p]) * 32).bytes(25_500) for p in range(3)}  # 26 chunks each
    out: dict[int, dict[int, bytes]] = {}

    def run(t: GrpcTransport) -> None:
        peers = [p for p in range(3) if p != t.party_id]
        out[t.party_id] = t.exchange("chunky", 7, {p: payloads[t.party_id] for p in peers}, timeout=20)

    threads = [threading.Thread(target=run, args=(t,)) for t in c.transports]
    for th in threads:
        th.start()
    for th in threads:
        th.join(timeout=30)
    for me in range(3):
        assert out[me] == {p: payloads[p] for p in range(3) if p != me}
        assert c.transports[me].pending_bytes == 0


def test_chunk_size_fits_message_limit() -> None:
    t = GrpcTransport(0, ["127.0.0.1:1", "127.0.0.1:2"], chunk_bytes=8 << 20, max_message_bytes=4 << 20)
    assert t.chunk_bytes < 4 << 20
    t.close()


def test_recv_timeout_names_peer(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(2)
    t1 = c.transports[1]
    with pytest.raises(DeadlineExceededError) as info:
        t1.recv("quiet", 3, 0, timeout=0.3)
    msg = str(info.value)
    assert f"party 0 at {c.topology.parties[0].address}" in msg and "step 3" in msg


def test_abort_from_peer_fails_waiter_promptly(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(3)
    t0, t1, t2 = c.transports
    errors: dict[int, BaseException] = {}

    def wait(t: GrpcTransport) -> None:
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
    with pytest.raises(PeerUnavailableError, match="aborted"):  # later receives fail at once too
        t1.recv("doomed", 5, 0, timeout=20)
    for t in c.transports:
        t.close_session("doomed")
    t0.send("doomed", 9, 1, b"fresh", timeout=5)  # a closed session id is usable again
    assert t1.recv("doomed", 9, 0, timeout=5) == b"fresh"


def test_send_to_dead_peer_is_unavailable(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(3, rpc_timeout_s=5.0)
    c.stop(2)
    addr = c.topology.parties[2].address
    with pytest.raises(PeerUnavailableError, match=f"party 2 at {addr} unavailable"):
        c.transports[0].send("s", 0, 2, b"x", timeout=5)
    with pytest.raises(PeerUnavailableError, match="party 2"):
        c.transports[1].exchange("s", 0, {0: b"a", 2: b"b"}, timeout=5)


def test_send_to_port_nobody_listens_on() -> None:
    (port,) = free_ports(1)
    t = GrpcTransport(0, ["127.0.0.1:1", f"127.0.0.1:{port}"])
    try:
        with pytest.raises(PeerUnavailableError, match=f"party 1 at 127.0.0.1:{port} unavailable"):
            t.send("s", 0, 1, b"x", timeout=5)
    finally:
        t.close()


class _SlowPeer(party_pb2_grpc.PeerExchangeServicer):
    def __init__(self) -> None:
        self.release = threading.Event()

    def Send(self, request: party_pb2.PeerMessage, context: grpc.ServicerContext) -> party_pb2.PeerAck:
        self.release.wait(10)
        return party_pb2.PeerAck()


def test_send_to_stuck_peer_hits_deadline() -> None:
    slow = _SlowPeer()
    server = grpc.server(ThreadPoolExecutor(max_workers=2))
    party_pb2_grpc.add_PeerExchangeServicer_to_server(slow, server)
    addr = f"127.0.0.1:{server.add_insecure_port('127.0.0.1:0')}"
    server.start()
    t = GrpcTransport(0, ["127.0.0.1:1", addr], rpc_timeout_s=0.5)
    try:
        with pytest.raises(DeadlineExceededError, match=f"party 1 at {addr} did not answer"):
            t.send("s", 0, 1, b"x", timeout=30)  # capped by rpc_timeout_s
    finally:
        slow.release.set()
        t.close()
        server.stop(0)


def _raw_stub(topo: Topology, *, as_name: str, dst: int, tls_on: bool = True) -> tuple[grpc.Channel, party_pb2_grpc.PeerExchangeStub]:
    if as_name.startswith("party"):
        entry = topo.party(int(as_name[5:]))
        cert, key = entry.cert, entry.key
    else:
        ident = topo.identity(as_name)
        cert, key = ident.cert, ident.key
    assert cert is not None and key is not None and topo.cluster.ca_cert is not None
    creds = tls.channel_credentials(cert, key, topo.cluster.ca_cert)
    ch = grpc.secure_channel(topo.party(dst).address, creds)
    return ch, party_pb2_grpc.PeerExchangeStub(ch)


def test_forged_sender_is_rejected(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(3)
    t2 = c.transports[2]
    ch, stub = _raw_stub(c.topology, as_name="party1", dst=2)
    try:
        forged = party_pb2.PeerMessage(session_id="s", step=0, sender=0, chunk_count=1, payload=b"evil")
        with pytest.raises(grpc.RpcError) as info:
            stub.Send(forged, timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "party 1 claims to be party 0" in info.value.details()
        with pytest.raises(grpc.RpcError) as info:
            stub.Abort(party_pb2.AbortNotice(session_id="s", sender=0, reason="x"), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
        honest = party_pb2.PeerMessage(session_id="s", step=0, sender=1, chunk_count=1, payload=b"ok")
        stub.Send(honest, timeout=5)
    finally:
        ch.close()
    assert t2.recv("s", 0, 1, timeout=5) == b"ok"
    with pytest.raises(DeadlineExceededError):
        t2.recv("s", 0, 0, timeout=0.2)
    ch, stub = _raw_stub(c.topology, as_name="client", dst=2)  # valid certificate, wrong role
    try:
        with pytest.raises(grpc.RpcError) as info:
            stub.Send(party_pb2.PeerMessage(session_id="s", step=1, sender=1, payload=b"x"), timeout=5)
        assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    finally:
        ch.close()


def test_malformed_messages_are_rejected(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(2, mailbox_bytes=1000)
    t0, t1 = c.transports
    ch, stub = _raw_stub(c.topology, as_name="party0", dst=1)
    try:
        bad = [
            party_pb2.PeerMessage(session_id="", step=0, sender=0, payload=b"x"),
            party_pb2.PeerMessage(session_id="s", step=0, sender=0, chunk_index=2, chunk_count=2),
        ]
        for msg in bad:
            with pytest.raises(grpc.RpcError) as info:
                stub.Send(msg, timeout=5)
            assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        ch.close()
    t0.send("s", 0, 1, b"a", timeout=5)
    with pytest.raises(SecureInferError, match="conflicting duplicate"):
        t0.send("s", 0, 1, b"b", timeout=5)
    with pytest.raises(TransportError, match="mailbox full"):
        t0.send("s", 1, 1, b"z" * 1001, timeout=5)
    assert t1.recv("s", 0, 0, timeout=5) == b"a"


def test_unclaimed_sessions_expire(make_cluster: Callable[..., Cluster]) -> None:
    c = make_cluster(2, mailbox_ttl_s=0.05)
    t0, t1 = c.transports
    t0.send("never-claimed", 0, 1, b"x" * 100, timeout=5)
    assert t1.pending_bytes == 100
    time.sleep(0.2)
    t0.send("other", 0, 1, b"y", timeout=5)
    assert t1.open_sessions == 1 and t1.pending_bytes == 1
    assert t1.recv("other", 0, 0, timeout=5) == b"y"


@pytest.mark.slow
def test_round_trip_latency(make_cluster: Callable[..., Cluster]) -> None:
    """Prints the round-trip time of one exchange on loopback with mTLS (no timing asserts)."""
    c = make_cluster(2)
    t0, t1 = c.transports
    for size in (1 << 10, 1 << 20):
        reps = 200 if size <= 1 << 10 else 20
        payload = b"\x01" * size

        def peer() -> None:
            for i in range(reps + 5):
                t1.exchange(f"rt{size}", i, {0: payload}, timeout=30)

        th = threading.Thread(target=peer)
        th.start()
        times = []
        for i in range(reps + 5):
            start = time.perf_counter()
            got = t0.exchange(f"rt{size}", i, {1: payload}, timeout=30)
            if i >= 5:
                times.append(time.perf_counter() - start)
            assert len(got[1]) == size
        th.join()
        times.sort()
        print(
            f"\nexchange {size} B over mTLS loopback: median {1e3 * times[len(times) // 2]:.3f} ms, "
            f"p90 {1e3 * times[int(len(times) * 0.9)]:.3f} ms ({reps} rounds)"
        )
