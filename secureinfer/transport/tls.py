"""gRPC mTLS and role helpers shared by every server and client of secureinfer.

* Credentials: :func:`server_credentials` requires and verifies a client certificate
  signed by the cluster CA (mutual TLS); :func:`channel_credentials` presents the caller's
  certificate and verifies the server against the same CA (hostname checked against the
  certificate's SANs, which ``secureinfer certs`` fills with the address host).
* Options: :func:`channel_options` / :func:`server_options` set the message-size limit
  from ``cluster.max_message_bytes`` on both ends, keepalive suited to long-lived
  party-to-party channels, fast reconnect after a peer restarts, no HTTP proxy, and (on the
  server) no ``SO_REUSEPORT`` so that a port already taken is an error, not a silent share.
* :func:`socket_contexts` makes the same mutual TLS for the raw party-to-party data
  stream (:mod:`secureinfer.transport.stream`): TLS 1.3, client certificate required,
  only the cluster CA trusted, hostname checked; :func:`socket_peer_identity` reads the
  verified peer certificate of such a socket.
* :func:`open_channel` / :func:`bind_server` pick secure or plaintext from
  ``cluster.tls``. Plaintext exists only when a topology says ``tls = false`` (debugging).
* Roles: :func:`peer_identity` reads the verified peer certificate from the call's auth
  context and returns its (name, role) (see :mod:`secureinfer.certs`);
  :func:`require_role` raises PermissionDeniedError for any other role. A handler catches
  SecureInferError and calls :func:`abort_with` (sync server) or
  :func:`abort_with_async` (``grpc.aio`` server).

In a ``tls = false`` cluster there is no certificate; servers then pass
``insecure_metadata=True`` and trust the *unauthenticated* ``x-secureinfer-identity:
name/role`` header that clients add with :func:`insecure_identity_metadata`. This is for
local debugging only and provides no security at all.
"""

from __future__ import annotations

import functools
import os
import ssl
from pathlib import Path
from typing import Any, NamedTuple, NoReturn

import grpc
import grpc.aio

from secureinfer.certs import load_identity_role
from secureinfer.config import ALL_ROLES, ROLE_PARTY, ClusterSettings
from secureinfer.errors import (
    ERROR_CLASS_KEY,
    ConfigError,
    PermissionDeniedError,
    SecureInferError,
    UnauthenticatedError,
    error_from_status,
)

__all__ = [
    "IDENTITY_METADATA_KEY",
    "PeerIdentity",
    "abort_with",
    "abort_with_async",
    "bind_server",
    "channel_credentials",
    "channel_options",
    "error_from_rpc_error",
    "insecure_identity_metadata",
    "open_channel",
    "peer_identity",
    "require_role",
    "server_credentials",
    "server_options",
    "socket_contexts",
    "socket_peer_identity",
]

IDENTITY_METADATA_KEY = "x-secureinfer-identity"
_KEEPALIVE_TIME_MS = 20_000
_KEEPALIVE_TIMEOUT_MS = 10_000

PathLike = str | os.PathLike[str]


class PeerIdentity(NamedTuple):
    """Who called: the certificate CN and its role."""

    name: str
    role: str

    @property
    def party_id(self) -> int | None:
        """The party id for a ``party<i>`` peer with role party, else None."""
        if self.role == ROLE_PARTY and self.name.startswith("party") and self.name[5:].isdigit():
            return int(self.name[5:])
        return None


def _read(path: PathLike | None, what: str) -> bytes:
    if path is None:
        raise ConfigError(f"no {what} path configured (tls = true needs cert, key and ca_cert)")
    try:
        return Path(path).read_bytes()
    except FileNotFoundError:
        raise ConfigError(
            f"{what} {path} does not exist; create it with `secureinfer certs --config FILE`"
        ) from None
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc}") from None


def server_credentials(cert_path: PathLike, key_path: PathLike, ca_path: PathLike) -> grpc.ServerCredentials:
    """Server side of mTLS: our certificate, and client certificates must chain to the CA."""
    return grpc.ssl_server_credentials(
        [(_read(key_path, "private key"), _read(cert_path, "certificate"))],
        root_certificates=_read(ca_path, "CA certificate"),
        require_client_auth=True,
    )


def channel_credentials(cert_path: PathLike, key_path: PathLike, ca_path: PathLike) -> grpc.ChannelCredentials:
    """Client side of mTLS: present our certificate, trust only the cluster CA."""
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca_path, "CA certificate"),
        private_key=_read(key_path, "private key"),
        certificate_chain=_read(cert_path, "certificate"),
    )


def _common_options(settings: ClusterSettings) -> list[tuple[str, Any]]:
    """Message limits and keepalive, identical on both ends of every channel."""
    return [
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.keepalive_time_ms", _KEEPALIVE_TIME_MS),
        ("grpc.keepalive_timeout_ms", _KEEPALIVE_TIMEOUT_MS),
        ("grpc.keepalive_permit_without_calls", 1),
    ]


def channel_options(settings: ClusterSettings) -> list[tuple[str, Any]]:
    """Channel arguments for every client channel of the cluster."""
    return _common_options(settings) + [
        ("grpc.http2.max_pings_without_data", 0),
        # fast reconnects to a restarted peer; NOT grpc.min_reconnect_backoff_ms, which
        # gRPC also uses as the connect timeout (100 ms made TLS handshakes under load fail)
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 1_000),
        ("grpc.enable_http_proxy", 0),
    ]


def server_options(settings: ClusterSettings) -> list[tuple[str, Any]]:
    """Server arguments matching :func:`channel_options` (accepts its keepalive pings)."""
    return _common_options(settings) + [
        ("grpc.http2.min_recv_ping_interval_without_data_ms", _KEEPALIVE_TIME_MS // 2),
        ("grpc.http2.max_ping_strikes", 0),
        ("grpc.so_reuseport", 0),
    ]


def open_channel(
    address: str,
    *,
    settings: ClusterSettings,
    cert: PathLike | None,
    key: PathLike | None,
    aio: bool = False,
) -> grpc.Channel | grpc.aio.Channel:
    """A channel to ``address``: mTLS with our ``cert``/``key`` unless ``settings.tls`` is off."""
    options = channel_options(settings)
    if not settings.tls:
        return grpc.aio.insecure_channel(address, options=options) if aio else grpc.insecure_channel(address, options=options)
    if settings.ca_cert is None:
        raise ConfigError("tls = true but cluster.ca_cert is not set")
    creds = channel_credentials(_need(cert, "certificate"), _need(key, "private key"), settings.ca_cert)
    if aio:
        return grpc.aio.secure_channel(address, creds, options=options)
    return grpc.secure_channel(address, creds, options=options)


def bind_server(
    server: grpc.Server | grpc.aio.Server,
    address: str,
    *,
    settings: ClusterSettings,
    cert: PathLike | None,
    key: PathLike | None,
) -> int:
    """Listen on ``address`` (mTLS unless ``settings.tls`` is off); return the bound port.

    Create the server with ``options=server_options(settings)``. ConfigError if the
    address cannot be bound (e.g. the port is taken).
    """
    try:
        if settings.tls:
            if settings.ca_cert is None:
                raise ConfigError("tls = true but cluster.ca_cert is not set")
            creds = server_credentials(_need(cert, "certificate"), _need(key, "private key"), settings.ca_cert)
            port = server.add_secure_port(address, creds)
        else:
            port = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise ConfigError(f"cannot listen on {address} (port in use?): {exc}") from None
    if not port:
        raise ConfigError(f"cannot listen on {address} (port in use?)")
    return int(port)


def socket_contexts(
    settings: ClusterSettings, *, cert: PathLike | None, key: PathLike | None
) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """``(server, client)`` SSL contexts for a mutually authenticated TLS 1.3 socket.

    Both present ``cert``/``key`` and trust only the cluster CA; the server requires a
    client certificate, the client checks the server's hostname against its SANs. The
    server sends no session tickets, so after the handshake a client socket receives
    nothing (a readable client socket means the peer closed it).
    """
    if settings.ca_cert is None:
        raise ConfigError("tls = true but cluster.ca_cert is not set")
    cert_p, key_p = _need(cert, "certificate"), _need(key, "private key")
    for path, what in ((cert_p, "certificate"), (key_p, "private key"), (settings.ca_cert, "CA certificate")):
        _read(path, what)  # a clear ConfigError for a missing file
    contexts = []
    for purpose in (ssl.Purpose.CLIENT_AUTH, ssl.Purpose.SERVER_AUTH):
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER if purpose is ssl.Purpose.CLIENT_AUTH else ssl.PROTOCOL_TLS_CLIENT)
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
        ctx.verify_mode = ssl.CERT_REQUIRED
        ctx.load_verify_locations(cafile=os.fspath(settings.ca_cert))
        try:
            ctx.load_cert_chain(os.fspath(cert_p), os.fspath(key_p))
        except (ssl.SSLError, OSError) as exc:
            raise ConfigError(f"cannot load certificate {cert_p} / key {key_p}: {exc}") from None
        if purpose is ssl.Purpose.CLIENT_AUTH:
            ctx.num_tickets = 0
        else:
            ctx.check_hostname = True
        contexts.append(ctx)
    return contexts[0], contexts[1]


def socket_peer_identity(sock: ssl.SSLSocket) -> PeerIdentity:
    """(name, role) of the CA-verified certificate the peer of ``sock`` presented."""
    der = sock.getpeercert(binary_form=True)
    if not der:
        raise UnauthenticatedError("the peer presented no certificate (mTLS required)")
    name, role = _identity_of(ssl.DER_cert_to_PEM_cert(der).encode())
    return PeerIdentity(name, role)


def _need(path: PathLike | None, what: str) -> PathLike:
    if path is None:
        raise ConfigError(f"tls = true but no {what} path is configured for this process")
    return path


def insecure_identity_metadata(name: str, role: str) -> tuple[tuple[str, str], ...]:
    """Call metadata claiming (name, role) on a ``tls = false`` cluster. Unauthenticated."""
    return ((IDENTITY_METADATA_KEY, f"{name}/{role}"),)


def peer_identity(context: grpc.ServicerContext, *, insecure_metadata: bool = False) -> PeerIdentity:
    """(name, role) of the caller, from its CA-verified certificate.

    UnauthenticatedError if the call carries no certificate, IntegrityError (via
    :func:`~secureinfer.certs.load_identity_role`) if the certificate has no consistent
    role. With ``insecure_metadata`` (``tls = false`` clusters only) a call without a
    certificate may name itself in the ``x-secureinfer-identity`` header instead.
    """
    auth = context.auth_context() or {}
    pems = auth.get("x509_pem_cert") or []
    if pems:
        name, role = _identity_of(bytes(pems[0]))
        return PeerIdentity(name, role)
    if insecure_metadata:
        for k, v in context.invocation_metadata() or ():
            if k == IDENTITY_METADATA_KEY:
                text = v.decode() if isinstance(v, bytes) else str(v)
                name, sep, role = text.partition("/")
                if sep and name and role in ALL_ROLES:
                    return PeerIdentity(name, role)
                raise UnauthenticatedError(f"malformed {IDENTITY_METADATA_KEY} header {text!r}")
        raise UnauthenticatedError(f"no client certificate and no {IDENTITY_METADATA_KEY} header")
    raise UnauthenticatedError("the call carries no client certificate (mTLS required)")


@functools.lru_cache(maxsize=256)
def _identity_of(pem: bytes) -> tuple[str, str]:
    """(name, role) of a CA-verified certificate; cached: parsing costs ~90 us per call."""
    return load_identity_role(pem)


def require_role(
    context: grpc.ServicerContext, *roles: str, insecure_metadata: bool = False
) -> PeerIdentity:
    """The caller's identity if its role is one of ``roles``; PermissionDeniedError otherwise."""
    ident = peer_identity(context, insecure_metadata=insecure_metadata)
    if ident.role not in roles:
        allowed = ", ".join(roles) or "none"
        raise PermissionDeniedError(
            f"{ident.name!r} has role {ident.role!r}; this call is allowed for role(s): {allowed}"
        )
    return ident


def abort_with(context: grpc.ServicerContext, exc: SecureInferError) -> NoReturn:
    """End the call with ``exc``'s status code, message and class name (sync servers)."""
    context.set_trailing_metadata(((ERROR_CLASS_KEY, type(exc).__name__),))
    context.abort(grpc.StatusCode[exc.grpc_code], str(exc))
    raise exc  # context.abort always raises; this line only satisfies NoReturn


async def abort_with_async(context: grpc.aio.ServicerContext, exc: SecureInferError) -> NoReturn:  # type: ignore[type-arg]
    """End the call with ``exc``'s status code, message and class name (``grpc.aio`` servers)."""
    context.set_trailing_metadata(((ERROR_CLASS_KEY, type(exc).__name__),))
    await context.abort(grpc.StatusCode[exc.grpc_code], str(exc))
    raise exc


def error_from_rpc_error(err: grpc.RpcError, *, peer: str | None = None) -> SecureInferError:
    """The SecureInferError for a failed call, naming ``peer`` (client side of abort_with)."""
    code = err.code() if hasattr(err, "code") else None
    details = err.details() if hasattr(err, "details") else str(err)
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    prefix = f"{peer}: " if peer else ""
    return error_from_status(name, f"{prefix}{details or name}", class_name=_error_class(err))


def _error_class(err: grpc.RpcError) -> str | None:
    """The exception class a secureinfer server named in the trailing metadata, if any."""
    try:
        trailing = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    except Exception:  # an error raised locally (no call) has no metadata
        return None
    for key, value in trailing or ():
        if key == ERROR_CLASS_KEY and isinstance(value, str):
            return value
    return None
