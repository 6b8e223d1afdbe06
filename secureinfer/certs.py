"""Certificates for mTLS between all processes: a demo CA and one certificate per role.

``secureinfer certs --config FILE`` (:func:`create_certificates`) reads a topology and
writes, with ``cryptography``:

* a CA: ECDSA P-256 key and a self-signed certificate (``cluster.ca_cert``; the key goes
  to ``cluster.ca_key``, by default next to it with suffix ``.key``), valid
  ``ca_validity_days`` (default 10 years — a throw-away demo CA);
* for every party, the dealer, the HE server and every ``[[identity]]``: an ECDSA P-256
  key and a CA-signed certificate valid ``leaf_validity_days`` (default 825), usable as TLS
  server and client (EKU serverAuth + clientAuth), with SANs DNS:localhost, IP:127.0.0.1
  and the host of the entry's address;
* for every party, its 32-byte AES-GCM ``storage_key`` for model shares at rest. An
  existing storage key is kept (replacing it would make stored shares unreadable) unless
  ``rotate_storage_keys=True``.

Identity in a certificate: subject ``CN=<name>`` (``party0``, ``dealer``, ``he``, or the
identity name), ``OU=<role>``, ``O=secureinfer <cluster name>``; the role is written a
second time in a private, non-critical X.509 extension, OID
:data:`ROLE_EXTENSION_OID` = ``2.25.248924963943904512269081134043652086505.1`` (an
arc under ``2.25``, the UUID-derived OIDs of ITU-T X.667 that need no registration),
whose value is the DER ``UTF8String`` of the role. :func:`load_identity_role` insists that
both agree, so a subject field alone cannot confer a role.

Private keys are PKCS#8 PEM, **unencrypted** (a demo: processes start unattended), written
with mode 0600 through a temporary file and an atomic rename; certificates are 0644.
Nothing is replaced unless ``overwrite=True``: the call checks every target first and
fails before writing anything. Key pairs come from OpenSSL's CSPRNG (through
``cryptography``), storage keys from :func:`secureinfer.prg.fresh_seed` (``os.urandom``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import ipaddress
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from secureinfer.config import (
    ALL_ROLES,
    Topology,
    config_path,
    load_topology,
    split_address,
)
from secureinfer.errors import (
    AlreadyExistsError,
    ConfigError,
    IntegrityError,
    InvalidArgumentError,
)

__all__ = [
    "CA_VALIDITY_DAYS",
    "LEAF_VALIDITY_DAYS",
    "ROLE_EXTENSION_OID",
    "CertSubject",
    "create_certificates",
    "create_identity",
    "load_identity_role",
    "register_cli",
    "subjects",
]

ROLE_EXTENSION_OID = x509.ObjectIdentifier("2.25.248924963943904512269081134043652086505.1")
CA_VALIDITY_DAYS = 3650
LEAF_VALIDITY_DAYS = 825
STORAGE_KEY_BYTES = 32
_DEFAULT_HOSTS = ("localhost", "127.0.0.1")
_CLOCK_SKEW = dt.timedelta(minutes=5)


@dataclass(frozen=True)
class CertSubject:
    """One certificate to issue: who, which role, where, and which hosts go in the SAN."""

    name: str
    role: str
    cert: Path
    key: Path
    hosts: tuple[str, ...] = ()


# ----------------------------------------------------------------------------- encoding


def _der_utf8(text: str) -> bytes:
    """DER encoding of an ASN.1 UTF8String (tag 0x0C, definite length)."""
    body = text.encode("utf-8")
    n = len(body)
    if n < 0x80:
        length = bytes([n])
    else:
        raw = n.to_bytes((n.bit_length() + 7) // 8, "big")
        length = bytes([0x80 | len(raw)]) + raw
    return b"\x0c" + length + body


def _parse_der_utf8(data: bytes) -> str:
    """Inverse of :func:`_der_utf8`; IntegrityError on anything else."""
    if len(data) < 2 or data[0] != 0x0C:
        raise IntegrityError("role extension is not a DER UTF8String")
    first = data[1]
    if first < 0x80:
        n, start = first, 2
    else:
        k = first & 0x7F
        if k == 0 or k > 4 or len(data) < 2 + k:
            raise IntegrityError("role extension has a malformed length")
        n, start = int.from_bytes(data[2 : 2 + k], "big"), 2 + k
        if n < 0x80:
            raise IntegrityError("role extension length is not minimally encoded (not DER)")
    if len(data) != start + n:
        raise IntegrityError("role extension length does not match its content")
    try:
        return data[start:].decode("utf-8")
    except UnicodeDecodeError:
        raise IntegrityError("role extension is not valid UTF-8") from None


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in (*_DEFAULT_HOSTS, *hosts):
        if host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


# ----------------------------------------------------------------------------- files


def _write(path: Path, data: bytes, *, mode: int, overwrite: bool) -> None:
    """Write atomically with ``mode`` (temp file created with that mode, then renamed)."""
    if path.exists() and not overwrite:
        raise AlreadyExistsError(f"{path} exists; pass --overwrite (overwrite=True) to replace it")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _refuse_existing(paths: Sequence[Path]) -> None:
    existing = [p for p in paths if p.exists()]
    if existing:
        listing = "\n".join(f"  - {p}" for p in existing)
        raise AlreadyExistsError(
            f"{len(existing)} file(s) exist and would be replaced; pass --overwrite "
            f"(overwrite=True) to replace them:\n{listing}"
        )


# ----------------------------------------------------------------------------- issuing


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc)


def _make_ca(cluster_name: str, validity_days: int) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, f"secureinfer {cluster_name}"),
            x509.NameAttribute(NameOID.COMMON_NAME, f"secureinfer {cluster_name} CA"),
        ]
    )
    now = _now()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + dt.timedelta(days=validity_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=True,
                crl_sign=True, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _issue(
    subject: CertSubject,
    *,
    org: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    validity_days: int,
) -> tuple[bytes, bytes]:
    """A new key and CA-signed certificate for ``subject``; returns (cert PEM, key PEM)."""
    if subject.role not in ALL_ROLES:
        raise InvalidArgumentError(f"unknown role {subject.role!r}; roles are {', '.join(ALL_ROLES)}")
    if not subject.name:
        raise InvalidArgumentError("a certificate needs a non-empty name")
    key = ec.generate_private_key(ec.SECP256R1())
    now = _now()
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, org),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, subject.role),
            x509.NameAttribute(NameOID.COMMON_NAME, subject.name),
        ]
    )
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(min(now + dt.timedelta(days=validity_days), ca_cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, content_commitment=False, key_encipherment=False,
                data_encipherment=False, key_agreement=False, key_cert_sign=False,
                crl_sign=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
        .add_extension(_san(subject.hosts), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ca_ski), critical=False)
        .add_extension(x509.UnrecognizedExtension(ROLE_EXTENSION_OID, _der_utf8(subject.role)), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM), _key_pem(key)


def subjects(topology: Topology) -> list[CertSubject]:
    """Every certificate a topology names: parties, dealer, HE server, identities.

    ConfigError listing every entry without ``cert``/``key`` paths (e.g. a ``tls = false``
    file that omits them).
    """
    out: list[CertSubject] = []
    missing: list[str] = []
    entries: list[tuple[str, str, Path | None, Path | None, tuple[str, ...]]] = []
    for p in topology.parties:
        hosts = dict.fromkeys(split_address(a)[0] for a in (p.address, p.data_address) if a)
        entries.append((p.name, p.role, p.cert, p.key, tuple(hosts)))
    d = topology.dealer
    entries.append((d.name, d.role, d.cert, d.key, (split_address(d.address)[0],)))
    if topology.he is not None:
        h = topology.he
        entries.append((h.name, h.role, h.cert, h.key, (split_address(h.address)[0],)))
    for i in topology.identities:
        entries.append((i.name, i.role, i.cert, i.key, ()))
    for name, role, cert, key, hosts in entries:
        if cert is None or key is None:
            missing.append(name)
        else:
            out.append(CertSubject(name=name, role=role, cert=cert, key=key, hosts=hosts))
    if topology.cluster.ca_cert is None or topology.cluster.ca_key is None:
        missing.append("cluster (ca_cert)")
    if missing:
        raise ConfigError(f"{topology.path}: no cert/key paths for: {', '.join(missing)}")
    return out


def create_certificates(
    topology: Topology,
    *,
    overwrite: bool = False,
    rotate_storage_keys: bool = False,
    ca_validity_days: int = CA_VALIDITY_DAYS,
    leaf_validity_days: int = LEAF_VALIDITY_DAYS,
) -> list[Path]:
    """Create the CA, every certificate/key of the topology and the parties' storage keys.

    Returns the paths written, in order. Raises AlreadyExistsError listing every existing
    certificate/key before writing anything, unless ``overwrite``. Existing storage keys
    are kept unless ``rotate_storage_keys`` (see the module docstring).
    """
    if ca_validity_days <= 0 or leaf_validity_days <= 0:
        raise InvalidArgumentError("validity periods must be positive numbers of days")
    subs = subjects(topology)
    ca_cert_path, ca_key_path = topology.cluster.ca_cert, topology.cluster.ca_key
    if ca_cert_path is None or ca_key_path is None:  # subjects() already refused this
        raise ConfigError(f"{topology.path} names no CA (cluster.ca_cert)")
    targets = [ca_cert_path, ca_key_path] + [p for s in subs for p in (s.cert, s.key)]
    if not overwrite:
        _refuse_existing(targets)
    if rotate_storage_keys and not overwrite:
        _refuse_existing([p.storage_key for p in topology.parties])

    written: list[Path] = []
    ca_key, ca_cert = _make_ca(topology.cluster.name, ca_validity_days)
    _write(ca_key_path, _key_pem(ca_key), mode=0o600, overwrite=overwrite)
    _write(ca_cert_path, ca_cert.public_bytes(serialization.Encoding.PEM), mode=0o644, overwrite=overwrite)
    written += [ca_cert_path, ca_key_path]
    org = f"secureinfer {topology.cluster.name}"
    for s in subs:
        cert_pem, key_pem = _issue(s, org=org, ca_key=ca_key, ca_cert=ca_cert, validity_days=leaf_validity_days)
        _write(s.key, key_pem, mode=0o600, overwrite=overwrite)
        _write(s.cert, cert_pem, mode=0o644, overwrite=overwrite)
        written += [s.cert, s.key]

    from secureinfer.prg import fresh_seed  # lazy: keeps torch out of config-only imports

    for p in topology.parties:
        if p.storage_key.exists() and not rotate_storage_keys:
            continue
        _write(p.storage_key, fresh_seed()[:STORAGE_KEY_BYTES], mode=0o600, overwrite=True)
        written.append(p.storage_key)
    return written


def _load_ca(ca_cert_path: Path, ca_key_path: Path) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    try:
        cert = x509.load_pem_x509_certificate(ca_cert_path.read_bytes())
        key = serialization.load_pem_private_key(ca_key_path.read_bytes(), password=None)
    except FileNotFoundError as exc:
        raise ConfigError(f"CA file {exc.filename} does not exist; run `secureinfer certs` first") from None
    except ValueError as exc:
        raise ConfigError(f"cannot read the CA ({ca_cert_path}, {ca_key_path}): {exc}") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{ca_key_path} is not an ECDSA key")
    if key.public_key().public_numbers() != cert.public_key().public_numbers():  # type: ignore[union-attr]
        raise ConfigError(f"{ca_key_path} is not the key of {ca_cert_path}")
    return key, cert


def create_identity(
    source: Topology | tuple[str | os.PathLike[str], str | os.PathLike[str]],
    *,
    name: str,
    role: str,
    out_cert: str | os.PathLike[str],
    out_key: str | os.PathLike[str],
    hosts: Sequence[str] = (),
    overwrite: bool = False,
    validity_days: int = LEAF_VALIDITY_DAYS,
) -> tuple[Path, Path]:
    """Issue one more certificate from an existing CA (e.g. a second client).

    ``source`` is a topology (its ``ca_cert``/``ca_key``) or a ``(ca_cert, ca_key)`` pair.
    Returns ``(cert_path, key_path)``.
    """
    if isinstance(source, Topology):
        if source.cluster.ca_cert is None or source.cluster.ca_key is None:
            raise ConfigError(f"{source.path} names no CA (cluster.ca_cert)")
        ca_paths = (source.cluster.ca_cert, source.cluster.ca_key)
        org = f"secureinfer {source.cluster.name}"
    else:
        ca_paths = (Path(source[0]), Path(source[1]))
        org = ""
    ca_key, ca_cert = _load_ca(*ca_paths)
    if not org:
        orgs = ca_cert.subject.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)
        org = str(orgs[0].value) if orgs else "secureinfer"
    cert_path, key_path = Path(out_cert), Path(out_key)
    if not overwrite:
        _refuse_existing([cert_path, key_path])
    sub = CertSubject(name=name, role=role, cert=cert_path, key=key_path, hosts=tuple(hosts))
    cert_pem, key_pem = _issue(sub, org=org, ca_key=ca_key, ca_cert=ca_cert, validity_days=validity_days)
    _write(key_path, key_pem, mode=0o600, overwrite=overwrite)
    _write(cert_path, cert_pem, mode=0o644, overwrite=overwrite)
    return cert_path, key_path


def load_identity_role(cert_pem: bytes) -> tuple[str, str]:
    """(name, role) of a certificate issued by :func:`create_certificates`.

    Does not verify the signature (the TLS handshake did that); checks that the subject has
    exactly one CN and one OU, that the role extension is present and agrees with the OU,
    and that the role is known. IntegrityError otherwise.
    """
    try:
        cert = x509.load_pem_x509_certificate(cert_pem)
    except ValueError as exc:
        raise IntegrityError(f"not a PEM certificate: {exc}") from None
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    ous = cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)
    if len(cns) != 1 or len(ous) != 1:
        raise IntegrityError(
            f"certificate subject must have exactly one CN and one OU, has {len(cns)} and {len(ous)}"
        )
    name, ou = str(cns[0].value), str(ous[0].value)
    try:
        ext = cert.extensions.get_extension_for_oid(ROLE_EXTENSION_OID)
    except x509.ExtensionNotFound:
        raise IntegrityError(f"certificate of {name!r} has no secureinfer role extension") from None
    except ValueError as exc:  # duplicate or malformed extensions
        raise IntegrityError(f"certificate of {name!r} has malformed extensions: {exc}") from None
    value = ext.value
    if not isinstance(value, x509.UnrecognizedExtension):
        raise IntegrityError(f"certificate of {name!r}: unexpected role extension type")
    role = _parse_der_utf8(value.value)
    if role != ou:
        raise IntegrityError(f"certificate of {name!r}: role extension {role!r} disagrees with OU {ou!r}")
    if role not in ALL_ROLES:
        raise IntegrityError(f"certificate of {name!r} names unknown role {role!r}")
    return name, role


# ----------------------------------------------------------------------------- CLI


def register_cli(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:  # type: ignore[type-arg]
    """Add ``secureinfer certs --config FILE [--overwrite] [--rotate-storage-keys]``.

    The handler is stored as ``func`` (``args.func(args) -> int``); it prints each path
    written to stdout, one per line, and a summary to stderr. Errors are raised as
    SecureInferError for the caller to report.
    """
    p = subparsers.add_parser(
        "certs",
        help="create a demo CA, certificates for every party/role, and storage keys",
        description=(
            "Create an ECDSA P-256 CA, one certificate and unencrypted key (mode 0600) per "
            "party, dealer, HE server and identity of the topology, and each party's storage "
            "key. Existing files are never replaced without --overwrite."
        ),
    )
    p.add_argument("--config", default=None, help="topology TOML file (default: $SECUREINFER_CONFIG)")
    p.add_argument("--overwrite", action="store_true", help="replace existing certificates and keys")
    p.add_argument(
        "--rotate-storage-keys",
        action="store_true",
        help="also replace existing storage keys (makes stored model shares unreadable)",
    )
    p.set_defaults(func=run_certs_command)
    return p


def run_certs_command(args: argparse.Namespace) -> int:
    """Handler of ``secureinfer certs``."""
    topology = load_topology(config_path(args.config))
    written = create_certificates(
        topology, overwrite=bool(args.overwrite), rotate_storage_keys=bool(args.rotate_storage_keys)
    )
    for path in written:
        print(path)
    print(f"wrote {len(written)} file(s) for cluster {topology.cluster.name!r}", file=sys.stderr)
    return 0
