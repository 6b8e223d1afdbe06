"""Certificates and mTLS: a real gRPC health server on loopback, with role checks."""

from __future__ import annotations

import argparse
import datetime as dt
import os
import stat
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from secureinfer.certs import (
    ROLE_EXTENSION_OID,
    _der_utf8,
    create_certificates,
    create_identity,
    load_identity_role,
    register_cli,
)
from secureinfer.config import (
    ROLE_AUDITOR,
    ROLE_CLIENT,
    ROLE_OWNER,
    ROLE_PARTY,
    Topology,
    load_topology,
    write_local_topology,
)
from secureinfer.errors import (
    AlreadyExistsError,
    IntegrityError,
    PermissionDeniedError,
    SecureInferError,
)
from secureinfer.transport.tls import (
    PeerIdentity,
    abort_with,
    bind_server,
    channel_credentials,
    channel_options,
    error_from_rpc_error,
    insecure_identity_metadata,
    open_channel,
    require_role,
    server_options,
)

TIMEOUT = 10.0


def _topology(root: Path, name: str = "local") -> Topology:
    f = write_local_topology(root / "topo.toml", base_dir=root / "demo", name=name)
    return load_topology(f, environ={})


@pytest.fixture(scope="module")
def topo(tmp_path_factory: pytest.TempPathFactory) -> Topology:
    t = _topology(tmp_path_factory.mktemp("cluster"))
    create_certificates(t)
    return t


class _RoleCheckingHealth(health.HealthServicer):
    """The standard health service, but only the given roles may call Check."""

    def __init__(self, *roles: str) -> None:
        super().__init__()
        self.roles = roles
        self.seen: list[PeerIdentity] = []

    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext):  # noqa: N802
        try:
            self.seen.append(require_role(context, *self.roles))
        except SecureInferError as exc:
            abort_with(context, exc)
        return super().Check(request, context)


@pytest.fixture(scope="module")
def server(topo: Topology) -> Iterator[tuple[str, _RoleCheckingHealth]]:
    servicer = _RoleCheckingHealth(ROLE_CLIENT, ROLE_PARTY)
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=server_options(topo.cluster))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    p0 = topo.party(0)
    port = bind_server(srv, "127.0.0.1:0", settings=topo.cluster, cert=p0.cert, key=p0.key)
    srv.start()
    try:
        yield f"127.0.0.1:{port}", servicer
    finally:
        srv.stop(grace=None)


def _check(channel: grpc.Channel) -> health_pb2.HealthCheckResponse:
    stub = health_pb2_grpc.HealthStub(channel)
    return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=TIMEOUT)


def test_files_modes_and_roles(topo: Topology) -> None:
    for entry in [topo.party(0), topo.party(1), topo.dealer, topo.he, *topo.identities]:
        assert entry is not None and entry.key is not None and entry.cert is not None
        assert stat.S_IMODE(os.stat(entry.key).st_mode) == 0o600
        assert load_identity_role(entry.cert.read_bytes()) == (entry.name, entry.role)
    assert topo.cluster.ca_key is not None and stat.S_IMODE(os.stat(topo.cluster.ca_key).st_mode) == 0o600
    for p in topo.parties:
        assert len(p.storage_key.read_bytes()) == 32
        assert stat.S_IMODE(os.stat(p.storage_key).st_mode) == 0o600
    assert topo.party(0).storage_key.read_bytes() != topo.party(1).storage_key.read_bytes()
    cert = x509.load_pem_x509_certificate(topo.party(1).cert.read_bytes())  # type: ignore[union-attr]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in san.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert not cert.extensions.get_extension_for_oid(ROLE_EXTENSION_OID).critical
    with pytest.raises(IntegrityError, match="exactly one CN and one OU"):
        load_identity_role(topo.cluster.ca_cert.read_bytes())  # type: ignore[union-attr]


def test_refuses_to_overwrite_and_keeps_storage_keys(tmp_path: Path) -> None:
    t = _topology(tmp_path)
    written = create_certificates(t)
    assert t.party(0).storage_key in written
    old_cert = t.party(0).cert.read_bytes()  # type: ignore[union-attr]
    old_storage = t.party(0).storage_key.read_bytes()
    with pytest.raises(AlreadyExistsError, match="--overwrite"):
        create_certificates(t)
    assert t.party(0).cert.read_bytes() == old_cert  # type: ignore[union-attr]
    rewritten = create_certificates(t, overwrite=True)
    assert t.party(0).cert.read_bytes() != old_cert  # type: ignore[union-attr]
    assert t.party(0).storage_key not in rewritten
    assert t.party(0).storage_key.read_bytes() == old_storage  # stored shares stay readable


def test_cli_prints_written_paths(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    t = _topology(tmp_path)
    parser = argparse.ArgumentParser()
    register_cli(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["certs", "--config", str(t.path)])
    assert args.func(args) == 0
    out = capsys.readouterr().out.split()
    assert str(t.cluster.ca_cert) in out and str(t.identity("client2").key) in out


def test_mtls_accepts_ca_signed_client_and_sees_identity(topo: Topology, server: tuple[str, _RoleCheckingHealth]) -> None:
    address, servicer = server
    client = topo.identity("client")
    with open_channel(address, settings=topo.cluster, cert=client.cert, key=client.key) as ch:
        assert _check(ch).status == health_pb2.HealthCheckResponse.SERVING
    assert servicer.seen[-1] == PeerIdentity("client", ROLE_CLIENT)
    peer = topo.party(1)
    with open_channel(address, settings=topo.cluster, cert=peer.cert, key=peer.key) as ch:
        _check(ch)
    assert servicer.seen[-1] == PeerIdentity("party1", ROLE_PARTY)
    assert servicer.seen[-1].party_id == 1


def test_wrong_role_gets_permission_denied(topo: Topology, server: tuple[str, _RoleCheckingHealth]) -> None:
    address, _ = server
    auditor = topo.identity("auditor")
    with open_channel(address, settings=topo.cluster, cert=auditor.cert, key=auditor.key) as ch:
        with pytest.raises(grpc.RpcError) as info:
            _check(ch)
    assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert "'auditor'" in info.value.details() and "client, party" in info.value.details()
    err = error_from_rpc_error(info.value, peer="party0")
    assert isinstance(err, PermissionDeniedError) and str(err).startswith("party0: ")


def test_client_without_certificate_is_refused(topo: Topology, server: tuple[str, _RoleCheckingHealth]) -> None:
    address, _ = server
    creds = grpc.ssl_channel_credentials(root_certificates=topo.cluster.ca_cert.read_bytes())  # type: ignore[union-attr]
    with grpc.secure_channel(address, creds, options=channel_options(topo.cluster)) as ch:
        with pytest.raises(grpc.RpcError) as info:
            _check(ch)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_certificate_from_another_ca_is_refused(
    tmp_path: Path, topo: Topology, server: tuple[str, _RoleCheckingHealth]
) -> None:
    address, servicer = server
    n_seen = len(servicer.seen)
    other = _topology(tmp_path, name="rogue")
    create_certificates(other)
    rogue = other.identity("client")  # right role and name, wrong CA
    assert rogue.cert is not None and rogue.key is not None and topo.cluster.ca_cert is not None
    creds = channel_credentials(rogue.cert, rogue.key, topo.cluster.ca_cert)
    with grpc.secure_channel(address, creds, options=channel_options(topo.cluster)) as ch:
        with pytest.raises(grpc.RpcError) as info:
            _check(ch)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert len(servicer.seen) == n_seen  # the handler never ran
    # ...and a client trusting only the rogue CA refuses our server.
    assert other.cluster.ca_cert is not None
    creds = channel_credentials(rogue.cert, rogue.key, other.cluster.ca_cert)
    with grpc.secure_channel(address, creds, options=channel_options(topo.cluster)) as ch:
        with pytest.raises(grpc.RpcError) as info:
            _check(ch)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE


def test_create_identity_adds_a_client(tmp_path: Path, topo: Topology, server: tuple[str, _RoleCheckingHealth]) -> None:
    address, servicer = server
    cert, key = create_identity(topo, name="carol", role=ROLE_CLIENT, out_cert=tmp_path / "c.pem", out_key=tmp_path / "c.key")
    assert stat.S_IMODE(os.stat(key).st_mode) == 0o600
    with open_channel(address, settings=topo.cluster, cert=cert, key=key) as ch:
        _check(ch)
    assert servicer.seen[-1] == PeerIdentity("carol", ROLE_CLIENT)
    assert topo.cluster.ca_cert is not None and topo.cluster.ca_key is not None
    with pytest.raises(AlreadyExistsError):
        create_identity((topo.cluster.ca_cert, topo.cluster.ca_key), name="carol", role=ROLE_OWNER, out_cert=cert, out_key=key)


def _forged(ou: str, ext_role: str | None) -> bytes:
    """A self-signed certificate whose OU and role extension may disagree."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, ou),
            x509.NameAttribute(NameOID.COMMON_NAME, "mallory"),
        ]
    )
    now = dt.datetime.now(dt.timezone.utc)
    b = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
    )
    if ext_role is not None:
        b = b.add_extension(x509.UnrecognizedExtension(ROLE_EXTENSION_OID, _der_utf8(ext_role)), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_role_must_agree_between_ou_and_extension() -> None:
    assert load_identity_role(_forged(ROLE_AUDITOR, ROLE_AUDITOR)) == ("mallory", ROLE_AUDITOR)
    with pytest.raises(IntegrityError, match="disagrees"):
        load_identity_role(_forged(ROLE_OWNER, ROLE_CLIENT))
    with pytest.raises(IntegrityError, match="no secureinfer role extension"):
        load_identity_role(_forged(ROLE_OWNER, None))
    with pytest.raises(IntegrityError, match="unknown role"):
        load_identity_role(_forged("emperor", "emperor"))
    with pytest.raises(IntegrityError, match="not a PEM"):
        load_identity_role(b"garbage")


def test_plaintext_mode_only_when_tls_false(tmp_path: Path) -> None:
    f = write_local_topology(tmp_path / "topo.toml", base_dir=tmp_path / "demo", tls=False)
    t = load_topology(f, environ={})
    servicer = _InsecureHealth()
    srv = grpc.server(futures.ThreadPoolExecutor(max_workers=2), options=server_options(t.cluster))
    health_pb2_grpc.add_HealthServicer_to_server(servicer, srv)
    port = bind_server(srv, "127.0.0.1:0", settings=t.cluster, cert=None, key=None)
    srv.start()
    try:
        with open_channel(f"127.0.0.1:{port}", settings=t.cluster, cert=None, key=None) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            req = health_pb2.HealthCheckRequest(service="")
            stub.Check(req, timeout=TIMEOUT, metadata=insecure_identity_metadata("owner", ROLE_OWNER))
            assert servicer.seen == [PeerIdentity("owner", ROLE_OWNER)]
            with pytest.raises(grpc.RpcError) as info:
                stub.Check(req, timeout=TIMEOUT)
            assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    finally:
        srv.stop(grace=None)


class _InsecureHealth(health.HealthServicer):
    def __init__(self) -> None:
        super().__init__()
        self.seen: list[PeerIdentity] = []

    def Check(self, request: health_pb2.HealthCheckRequest, context: grpc.ServicerContext):  # noqa: N802
        try:
            self.seen.append(require_role(context, ROLE_OWNER, insecure_metadata=True))
        except SecureInferError as exc:
            abort_with(context, exc)
        return super().Check(request, context)
