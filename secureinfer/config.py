"""Cluster topology and settings: one TOML file shared by every process.

Every process of a deployment — compute parties, dealer, HE server, and the people and
programs that call them (owner, client, auditor) — reads the same topology file and picks
its own entry (a party with ``--id``, an identity by name). Relative paths inside the file
are resolved against the file's own directory, so a file and its certificates can be moved
together.

Schema (``parties/README.md`` has the same with examples)::

    [cluster]                       # optional table; every key has a default except ca_cert
    name = "local"                  # [A-Za-z0-9._-], written into certificates
    frac_bits = 16                  # fixed-point fractional bits, 1..30
    ca_cert = "certs/ca.pem"        # required when tls = true
    ca_key = "certs/ca.key"         # optional; default: ca_cert with suffix ".key"
    request_timeout_s = 30.0        # deadline of one whole inference, > 0
    rpc_timeout_s = 10.0            # deadline of one party-to-party / dealer RPC, > 0
    max_message_bytes = 67108864    # gRPC send/receive limit on both ends, < 2^31
    chunk_bytes = 4194304           # payloads above this are chunked, < max_message_bytes
    tls = true                      # false = plaintext gRPC, for debugging only
    audits_per_hour = 30            # watermark audits one auditor may run per model per hour, >= 1
    max_client_requests = 16        # requests one client may have in flight on a party, >= 1
    prefetch_depth = 2              # dealer parts each party caches per kind of request, 0..64
    prefetch_kind_bytes = 1073741824 # ... or more, up to this many bytes of them (at most 32 parts)
    data_transport = "stream"       # party-to-party rounds: "stream" (framed mTLS socket on
                                    # each party's data_address) or "grpc" (unary calls)

    [dealer]                        # required
    address = "127.0.0.1:50050"     # host:port, IPv6 as [::1]:50050
    cert = "certs/dealer.pem"       # cert and key required when tls = true
    key = "certs/dealer.key"
    pool_size = 4                   # correlated-randomness bundles generated ahead, >= 0
    max_pool_bytes = 2147483648     # all pooled material together, >= 1 MiB
    max_set_bytes = 1073741824      # the material of one request (bigger batches refused), >= 1 MiB
    pool_nice = 10                  # added to the pool-refill thread's nice value (Linux), 0..19:
                                    # generation ahead of requests yields the CPU to requests
    pool_kind_bytes = 268435456     # a kind with small sets is pooled deeper than pool_size: up to
                                    # this many bytes of its sets (at most 32), >= 0
    worker_processes = true         # pools are filled in two spawned worker processes (the deep
                                    # one at pool_nice), not in threads of the dealer process
    pool_idle_class = true          # the deep worker also runs in Linux's SCHED_IDLE class: it
                                    # gets only CPU time that requests leave unused

    [[party]]                       # at least 2; ids exactly 0..n-1
    id = 0
    address = "127.0.0.1:50051"
    data_address = "127.0.0.1:50151"  # optional; default: the host of address, port + 100
    cert = "certs/party0.pem"
    key = "certs/party0.key"
    data_dir = "data/party0"        # model shares at rest
    storage_key = "certs/party0.storage.key"   # 32-byte AES-GCM key file

    [he]                            # optional: the CKKS inference server
    address = "127.0.0.1:50060"
    cert = "certs/he.pem"
    key = "certs/he.key"

    [[identity]]                    # certificates for callers (see secureinfer.certs)
    name = "owner"                  # certificate CN; unique
    role = "owner"                  # one of ALL_ROLES
    cert = "certs/owner.pem"
    key = "certs/owner.key"

Certificate common names: party ``i`` is ``party<i>``, the dealer ``dealer``, the HE server
``he``, an identity its ``name``; these names are therefore reserved for identities.

Precedence of a setting: explicit ``overrides`` (command-line flags) > ``SECUREINFER_*``
environment variables > the file > built-in defaults. Overridable settings and their
environment variables are listed in :data:`ENV_VARS`: ``SECUREINFER_`` + the key in upper
case for ``[cluster]`` (``SECUREINFER_REQUEST_TIMEOUT_S``, ``SECUREINFER_FRAC_BITS``,
``SECUREINFER_TLS`` = 1/0, true/false, yes/no, on/off, ...; the cluster name is
``SECUREINFER_CLUSTER_NAME``), plus ``SECUREINFER_DEALER_ADDRESS``,
``SECUREINFER_DEALER_POOL_SIZE``, ``SECUREINFER_DEALER_WORKER_PROCESSES`` and
``SECUREINFER_HE_ADDRESS``.

Override keys are the same settings, either dotted (``"cluster.tls"``, ``"dealer.address"``)
or, for ``[cluster]`` keys, bare (``"request_timeout_s"``); a ``None`` value means "flag not
given" and is skipped. Paths given by environment or override resolve against the current
directory. ``SECUREINFER_CONFIG`` names the topology file itself (:func:`config_path`).

The validator collects every problem it finds (missing or unknown keys, wrong types, bad
addresses, duplicate ids/addresses/names/files, ids not 0..n-1, fewer than two parties,
out-of-range numbers) and raises a single :class:`TopologyError` (a ``ConfigError``) that
lists all of them.
"""

from __future__ import annotations

import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from secureinfer.errors import ConfigError

__all__ = [
    "ALL_ROLES", "CONFIG_ENV_VAR", "DATA_TRANSPORTS", "DEFAULT_IDENTITIES", "ENV_VARS", "ROLE_AUDITOR",
    "ROLE_CLIENT", "ROLE_DEALER", "ROLE_HE", "ROLE_OWNER", "ROLE_PARTY",
    "ClusterSettings", "DealerEntry", "HEEntry", "Identity", "PartyEntry", "Topology",
    "TopologyError", "config_path", "free_ports", "load_topology", "split_address",
    "write_local_topology",
]

ROLE_PARTY = "party"
ROLE_DEALER = "dealer"
ROLE_OWNER = "owner"
ROLE_CLIENT = "client"
ROLE_AUDITOR = "auditor"
ROLE_HE = "he"
ALL_ROLES: tuple[str, ...] = (ROLE_PARTY, ROLE_DEALER, ROLE_OWNER, ROLE_CLIENT, ROLE_AUDITOR, ROLE_HE)

CONFIG_ENV_VAR = "SECUREINFER_CONFIG"
#: party-to-party data paths (``cluster.data_transport``), see secureinfer.transport
DATA_TRANSPORTS = ("stream", "grpc")
#: the largest batch of one request (rows); parties and dealer refuse more
MAX_BATCH = 4096

ENV_VARS: Mapping[str, tuple[str, str]] = {
    "SECUREINFER_CLUSTER_NAME": ("cluster", "name"),
    "SECUREINFER_FRAC_BITS": ("cluster", "frac_bits"),
    "SECUREINFER_CA_CERT": ("cluster", "ca_cert"),
    "SECUREINFER_CA_KEY": ("cluster", "ca_key"),
    "SECUREINFER_REQUEST_TIMEOUT_S": ("cluster", "request_timeout_s"),
    "SECUREINFER_RPC_TIMEOUT_S": ("cluster", "rpc_timeout_s"),
    "SECUREINFER_MAX_MESSAGE_BYTES": ("cluster", "max_message_bytes"),
    "SECUREINFER_CHUNK_BYTES": ("cluster", "chunk_bytes"),
    "SECUREINFER_TLS": ("cluster", "tls"),
    "SECUREINFER_AUDITS_PER_HOUR": ("cluster", "audits_per_hour"),
    "SECUREINFER_MAX_CLIENT_REQUESTS": ("cluster", "max_client_requests"),
    "SECUREINFER_DATA_TRANSPORT": ("cluster", "data_transport"),
    "SECUREINFER_DEALER_ADDRESS": ("dealer", "address"),
    "SECUREINFER_DEALER_POOL_SIZE": ("dealer", "pool_size"),
    "SECUREINFER_DEALER_MAX_POOL_BYTES": ("dealer", "max_pool_bytes"),
    "SECUREINFER_DEALER_MAX_SET_BYTES": ("dealer", "max_set_bytes"),
    "SECUREINFER_DEALER_WORKER_PROCESSES": ("dealer", "worker_processes"),
    "SECUREINFER_DEALER_POOL_IDLE_CLASS": ("dealer", "pool_idle_class"),
    "SECUREINFER_HE_ADDRESS": ("he", "address"),
}

DEFAULT_IDENTITIES: tuple[tuple[str, str], ...] = (
    ("owner", ROLE_OWNER),
    ("client", ROLE_CLIENT),
    ("client2", ROLE_CLIENT),
    ("auditor", ROLE_AUDITOR),
)

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_MAX_GRPC_MESSAGE = 2**31 - 1
_REQ = object()  # marker: the key has no default


class TopologyError(ConfigError):
    """A topology file (or its overrides) is invalid; ``problems`` lists every problem."""

    def __init__(self, source: str, problems: Sequence[str]) -> None:
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"invalid topology {source} ({len(self.problems)} problem(s)):\n{lines}")


@dataclass(frozen=True)
class ClusterSettings:
    """The ``[cluster]`` table: settings every process must agree on."""

    name: str
    frac_bits: int
    ca_cert: Path | None
    ca_key: Path | None
    request_timeout_s: float
    rpc_timeout_s: float
    max_message_bytes: int
    chunk_bytes: int
    tls: bool
    audits_per_hour: int = 30
    max_client_requests: int = 16
    prefetch_depth: int = 2
    prefetch_kind_bytes: int = 1 << 30
    data_transport: str = "stream"


@dataclass(frozen=True)
class DealerEntry:
    """The ``[dealer]`` table."""

    address: str
    cert: Path | None
    key: Path | None
    pool_size: int
    max_pool_bytes: int = 2 << 30
    max_set_bytes: int = 1 << 30
    pool_nice: int = 10
    pool_kind_bytes: int = 256 << 20
    worker_processes: bool = True
    pool_idle_class: bool = True
    name: str = "dealer"
    role: str = ROLE_DEALER


@dataclass(frozen=True)
class PartyEntry:
    """One ``[[party]]`` table; its certificate CN is :attr:`name` (``party<id>``)."""

    id: int
    address: str
    cert: Path | None
    key: Path | None
    data_dir: Path
    storage_key: Path
    data_address: str = ""  # filled by the validator (default: address's host, port + 100)
    role: str = ROLE_PARTY

    @property
    def name(self) -> str:
        return f"party{self.id}"


@dataclass(frozen=True)
class HEEntry:
    """The optional ``[he]`` table: the CKKS inference server."""

    address: str
    cert: Path | None
    key: Path | None
    name: str = "he"
    role: str = ROLE_HE


@dataclass(frozen=True)
class Identity:
    """One ``[[identity]]``: a caller's certificate (owner, client, auditor, ...)."""

    name: str
    role: str
    cert: Path | None
    key: Path | None


@dataclass(frozen=True)
class Topology:
    """A validated topology file. ``parties`` is sorted by id (ids are 0..n-1)."""

    path: Path
    cluster: ClusterSettings
    dealer: DealerEntry
    parties: tuple[PartyEntry, ...]
    he: HEEntry | None
    identities: tuple[Identity, ...]

    @property
    def n_parties(self) -> int:
        return len(self.parties)

    @property
    def base_dir(self) -> Path:
        """The directory relative paths in the file were resolved against."""
        return self.path.parent

    def party(self, party_id: int) -> PartyEntry:
        """The entry of party ``party_id``; ConfigError if there is none."""
        if isinstance(party_id, bool) or not isinstance(party_id, int) or not 0 <= party_id < len(self.parties):
            raise ConfigError(
                f"no party with id {party_id!r} in {self.path}; ids are 0..{len(self.parties) - 1}"
            )
        return self.parties[party_id]

    def peers(self, party_id: int) -> tuple[PartyEntry, ...]:
        """Every party except ``party_id``."""
        self.party(party_id)
        return tuple(p for p in self.parties if p.id != party_id)

    def identity(self, name: str) -> Identity:
        """The identity called ``name``; ConfigError listing the known names if absent."""
        for ident in self.identities:
            if ident.name == name:
                return ident
        known = ", ".join(i.name for i in self.identities) or "none"
        raise ConfigError(f"no identity named {name!r} in {self.path}; known: {known}")

    def identities_with_role(self, role: str) -> tuple[Identity, ...]:
        return tuple(i for i in self.identities if i.role == role)


# ----------------------------------------------------------------------------- helpers


def split_address(address: str) -> tuple[str, int]:
    """Split ``host:port`` (IPv6 as ``[::1]:port``) into (host, port); ConfigError if bad."""
    if not isinstance(address, str) or not address:
        raise ConfigError(f"address must be a non-empty 'host:port' string, got {address!r}")
    if address.startswith("["):
        end = address.find("]")
        if end < 0 or address[end + 1 : end + 2] != ":":
            raise ConfigError(f"bad address {address!r}: expected '[ipv6]:port'")
        host, port_s = address[1:end], address[end + 2 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"bad address {address!r}: {host!r} is not an IPv6 address") from None
    else:
        host, sep, port_s = address.rpartition(":")
        if not sep or not host or ":" in host:
            raise ConfigError(f"bad address {address!r}: expected 'host:port' (IPv6 as '[::1]:port')")
        if not re.fullmatch(r"[A-Za-z0-9.-]+", host):
            raise ConfigError(f"bad address {address!r}: host {host!r} has invalid characters")
    if not port_s.isdigit() or not 1 <= int(port_s) <= 65535:
        raise ConfigError(f"bad address {address!r}: port must be 1..65535")
    return host, int(port_s)


def config_path(flag: str | os.PathLike[str] | None, *, environ: Mapping[str, str] | None = None) -> Path:
    """The topology file to use: ``--config`` flag, else ``$SECUREINFER_CONFIG``."""
    env = os.environ if environ is None else environ
    chosen = flag if flag is not None else env.get(CONFIG_ENV_VAR)
    if not chosen:
        raise ConfigError(f"no topology file: pass --config FILE or set {CONFIG_ENV_VAR}")
    return Path(chosen)


# ----------------------------------------------------------------------------- parsing

# (kind, default) per key; kind one of str, int, float, bool, path, address, role.
_CLUSTER_SPEC: dict[str, tuple[str, object]] = {
    "name": ("str", "secureinfer"),
    "frac_bits": ("int", 16),
    "ca_cert": ("path", None),
    "ca_key": ("path", None),
    "request_timeout_s": ("float", 30.0),
    "rpc_timeout_s": ("float", 10.0),
    "max_message_bytes": ("int", 64 * 1024 * 1024),
    "chunk_bytes": ("int", 4 * 1024 * 1024),
    "tls": ("bool", True),
    "audits_per_hour": ("int", 30),
    "max_client_requests": ("int", 16),
    "prefetch_depth": ("int", 2),
    "prefetch_kind_bytes": ("int", 1 << 30),
    "data_transport": ("str", "stream"),
}
_DEALER_SPEC: dict[str, tuple[str, object]] = {
    "address": ("address", _REQ),
    "cert": ("path", None),
    "key": ("path", None),
    "pool_size": ("int", 4),
    "max_pool_bytes": ("int", 2 << 30),
    "max_set_bytes": ("int", 1 << 30),
    "pool_nice": ("int", 10),
    "pool_kind_bytes": ("int", 256 << 20),
    "worker_processes": ("bool", True),
    "pool_idle_class": ("bool", True),
}
_PARTY_SPEC: dict[str, tuple[str, object]] = {
    "id": ("int", _REQ),
    "address": ("address", _REQ),
    "data_address": ("address", None),
    "cert": ("path", None),
    "key": ("path", None),
    "data_dir": ("path", _REQ),
    "storage_key": ("path", _REQ),
}
_HE_SPEC: dict[str, tuple[str, object]] = {
    "address": ("address", _REQ),
    "cert": ("path", None),
    "key": ("path", None),
}
_IDENTITY_SPEC: dict[str, tuple[str, object]] = {
    "name": ("str", _REQ),
    "role": ("role", _REQ),
    "cert": ("path", None),
    "key": ("path", None),
}
_SECTION_SPECS = {"cluster": _CLUSTER_SPEC, "dealer": _DEALER_SPEC, "he": _HE_SPEC}
_TOP_LEVEL = ("cluster", "dealer", "party", "he", "identity")
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


@dataclass(frozen=True)
class _Layered:
    """A value that came from the environment or an override, not the file."""

    value: object
    origin: str  # e.g. "SECUREINFER_TLS" or "override 'tls'"


def _from_string(kind: str, text: str) -> object:
    """Parse an environment/flag string into ``kind``; ValueError if it does not parse."""
    text = text.strip()
    if kind == "int":
        return int(text, 10)
    if kind == "float":
        return float(text)
    if kind == "bool":
        low = text.lower()
        if low in _TRUE:
            return True
        if low in _FALSE:
            return False
        raise ValueError(f"expected one of {sorted(_TRUE | _FALSE)}")
    return text


def _convert(
    raw: object, kind: str, where: str, key: str, base: Path, problems: list[str]
) -> object:
    """Check one value against its kind; append a problem and return None if it is wrong."""
    origin = f"{where}.{key}"
    if isinstance(raw, _Layered):
        origin = f"{raw.origin} ({where}.{key})"
        base = Path.cwd()
        raw = raw.value
        if isinstance(raw, str) and kind in ("int", "float", "bool"):
            try:
                raw = _from_string(kind, raw)
            except ValueError as exc:
                problems.append(f"{origin}: cannot parse {raw!r} as {kind}: {exc}")
                return None
        if isinstance(raw, os.PathLike) and kind == "path":
            raw = os.fspath(raw)
    if kind == "int":
        if isinstance(raw, bool) or not isinstance(raw, int):
            problems.append(f"{origin}: expected an integer, got {type(raw).__name__} {raw!r}")
            return None
        return raw
    if kind == "float":
        if isinstance(raw, bool) or not isinstance(raw, (int, float)):
            problems.append(f"{origin}: expected a number, got {type(raw).__name__} {raw!r}")
            return None
        return float(raw)
    if kind == "bool":
        if not isinstance(raw, bool):
            problems.append(f"{origin}: expected true or false, got {type(raw).__name__} {raw!r}")
            return None
        return raw
    if not isinstance(raw, str) or not raw:
        problems.append(f"{origin}: expected a non-empty string, got {type(raw).__name__} {raw!r}")
        return None
    if kind == "path":
        p = Path(raw).expanduser()
        return p if p.is_absolute() else (base / p).resolve()
    if kind == "address":
        try:
            split_address(raw)
        except ConfigError as exc:
            problems.append(f"{origin}: {exc}")
            return None
        return raw
    if kind == "role":
        if raw not in ALL_ROLES:
            problems.append(f"{origin}: unknown role {raw!r}; roles are {', '.join(ALL_ROLES)}")
            return None
        return raw
    if kind == "str":
        return raw
    raise ValueError(f"internal: unknown kind {kind}")  # not reachable by users


def _section(
    table: object,
    spec: Mapping[str, tuple[str, object]],
    where: str,
    base: Path,
    problems: list[str],
) -> dict[str, Any]:
    """Convert one table against ``spec``; missing required keys and unknown keys are problems."""
    if not isinstance(table, Mapping):
        problems.append(f"[{where}] must be a table, got {type(table).__name__}")
        return {k: None for k in spec}
    out: dict[str, Any] = {}
    for key in sorted(set(table) - set(spec)):
        problems.append(f"[{where}]: unknown key {key!r} (known: {', '.join(spec)})")
    for key, (kind, default) in spec.items():
        if key in table:
            out[key] = _convert(table[key], kind, where, key, base, problems)
        elif default is _REQ:
            problems.append(f"[{where}]: missing required key {key!r}")
            out[key] = None
        else:
            out[key] = default
    return out


def _apply_layers(
    doc: dict[str, Any],
    overrides: Mapping[str, object] | None,
    environ: Mapping[str, str],
    problems: list[str],
) -> None:
    """Write environment then override values into ``doc`` (later layers win)."""
    layers: list[tuple[str, str, _Layered]] = []
    for var, (section, key) in ENV_VARS.items():
        if var in environ:
            layers.append((section, key, _Layered(environ[var], var)))
    for name, value in (overrides or {}).items():
        if value is None:
            continue
        section, _, key = name.rpartition(".")
        section = section or "cluster"
        if section not in _SECTION_SPECS or key not in _SECTION_SPECS[section]:
            problems.append(f"override {name!r}: not a setting (use e.g. 'request_timeout_s' or 'dealer.address')")
            continue
        layers.append((section, key, _Layered(value, f"override {name!r}")))
    for section, key, layered in layers:
        table = doc.setdefault(section, {})
        if isinstance(table, dict):
            table[key] = layered


def load_topology(
    path: str | os.PathLike[str],
    *,
    overrides: Mapping[str, object] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Topology:
    """Read, layer and validate a topology file.

    ``overrides`` are command-line values (see the module docstring for the keys),
    ``environ`` defaults to ``os.environ``. Raises :class:`TopologyError` listing every
    problem, or ConfigError if the file cannot be read or is not TOML.
    """
    file = Path(path).expanduser().resolve()
    try:
        doc: dict[str, Any] = tomllib.loads(file.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"topology file {file} does not exist") from None
    except OSError as exc:
        raise ConfigError(f"cannot read topology file {file}: {exc}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"topology file {file} is not valid TOML: {exc}") from None
    return _validate(doc, file, overrides, os.environ if environ is None else environ)


def _validate(
    doc: dict[str, Any], file: Path, overrides: Mapping[str, object] | None, environ: Mapping[str, str]
) -> Topology:
    problems: list[str] = []
    base = file.parent
    for key in sorted(set(doc) - set(_TOP_LEVEL)):
        problems.append(f"unknown top-level key or table {key!r} (known: {', '.join(_TOP_LEVEL)})")
    _apply_layers(doc, overrides, environ, problems)

    c = _section(doc.get("cluster", {}), _CLUSTER_SPEC, "cluster", base, problems)
    tls = c["tls"] if c["tls"] is not None else True
    if c["name"] is not None and not _NAME_RE.match(c["name"]):
        problems.append(f"cluster.name {c['name']!r}: use 1-64 characters from [A-Za-z0-9._-]")
    if c["frac_bits"] is not None and not 1 <= c["frac_bits"] <= 30:
        problems.append(f"cluster.frac_bits must be in 1..30, got {c['frac_bits']}")
    for key in ("request_timeout_s", "rpc_timeout_s"):
        v = c[key]
        if v is not None and not (math.isfinite(v) and v > 0):
            problems.append(f"cluster.{key} must be a positive number of seconds, got {v}")
    mmb, chunk = c["max_message_bytes"], c["chunk_bytes"]
    if mmb is not None and not 1024 <= mmb <= _MAX_GRPC_MESSAGE:
        problems.append(f"cluster.max_message_bytes must be in 1024..{_MAX_GRPC_MESSAGE}, got {mmb}")
    if chunk is not None and chunk <= 0:
        problems.append(f"cluster.chunk_bytes must be positive, got {chunk}")
    elif chunk is not None and mmb is not None and chunk >= mmb:
        problems.append(f"cluster.chunk_bytes ({chunk}) must be smaller than cluster.max_message_bytes ({mmb})")
    if c["audits_per_hour"] is not None and not 1 <= c["audits_per_hour"] <= 1_000_000:
        problems.append(f"cluster.audits_per_hour must be in 1..1000000, got {c['audits_per_hour']}")
    if c["max_client_requests"] is not None and not 1 <= c["max_client_requests"] <= 100_000:
        problems.append(f"cluster.max_client_requests must be in 1..100000, got {c['max_client_requests']}")
    if c["prefetch_depth"] is not None and not 0 <= c["prefetch_depth"] <= 64:
        problems.append(f"cluster.prefetch_depth must be in 0..64, got {c['prefetch_depth']}")
    if c["prefetch_kind_bytes"] is not None and c["prefetch_kind_bytes"] < 0:
        problems.append(f"cluster.prefetch_kind_bytes must be >= 0, got {c['prefetch_kind_bytes']}")
    if c["data_transport"] is not None and c["data_transport"] not in DATA_TRANSPORTS:
        problems.append(f"cluster.data_transport must be one of {', '.join(DATA_TRANSPORTS)}, "
                        f"got {c['data_transport']!r}")
    cluster_table = doc.get("cluster", {})
    if tls and isinstance(cluster_table, Mapping) and "ca_cert" not in cluster_table:
        problems.append("[cluster]: missing 'ca_cert' (required when tls = true)")
    if c["ca_key"] is None and c["ca_cert"] is not None:
        c["ca_key"] = c["ca_cert"].with_suffix(".key")

    def need_cert(table: object, where: str) -> None:
        if tls and isinstance(table, Mapping):
            for k in ("cert", "key"):
                if k not in table:
                    problems.append(f"[{where}]: missing {k!r} (required when tls = true)")

    if "dealer" not in doc:
        problems.append("missing [dealer] table")
        d: dict[str, Any] | None = None
    else:
        d = _section(doc["dealer"], _DEALER_SPEC, "dealer", base, problems)
        need_cert(doc["dealer"], "dealer")
        if d["pool_size"] is not None and d["pool_size"] < 0:
            problems.append(f"dealer.pool_size must be >= 0, got {d['pool_size']}")
        if d["pool_nice"] is not None and not 0 <= d["pool_nice"] <= 19:
            problems.append(f"dealer.pool_nice must be in 0..19, got {d['pool_nice']}")
        if d["pool_kind_bytes"] is not None and d["pool_kind_bytes"] < 0:
            problems.append(f"dealer.pool_kind_bytes must be >= 0, got {d['pool_kind_bytes']}")
        for key in ("max_pool_bytes", "max_set_bytes"):
            if d[key] is not None and d[key] < 1 << 20:
                problems.append(f"dealer.{key} must be at least 1 MiB (1048576), got {d[key]}")

    h: dict[str, Any] | None = None
    if "he" in doc:
        h = _section(doc["he"], _HE_SPEC, "he", base, problems)
        need_cert(doc["he"], "he")

    raw_parties = doc.get("party", [])
    if not isinstance(raw_parties, list):
        problems.append("parties must be an array of tables: write [[party]], not [party]")
        raw_parties = []
    parties: list[dict[str, Any]] = []
    for i, table in enumerate(raw_parties):
        p = _section(table, _PARTY_SPEC, f"party #{i + 1}", base, problems)
        need_cert(table, f"party #{i + 1}")
        if p["data_address"] is None and p["address"] is not None:
            p["data_address"] = _data_default(p["address"], problems, f"party #{i + 1}")
        parties.append(p)
    if len(parties) < 2:
        problems.append(f"need at least 2 [[party]] entries, found {len(parties)}")
    ids = [p["id"] for p in parties if p["id"] is not None]
    dup_ids = sorted({i for i in ids if ids.count(i) > 1})
    if dup_ids:
        problems.append(f"duplicate party id(s): {dup_ids}")
    if len(ids) == len(parties) and not dup_ids and sorted(ids) != list(range(len(parties))):
        problems.append(f"party ids must be exactly 0..{len(parties) - 1}, got {sorted(ids)}")

    raw_idents = doc.get("identity", [])
    if not isinstance(raw_idents, list):
        problems.append("identities must be an array of tables: write [[identity]], not [identity]")
        raw_idents = []
    idents: list[dict[str, Any]] = []
    for i, table in enumerate(raw_idents):
        ident = _section(table, _IDENTITY_SPEC, f"identity #{i + 1}", base, problems)
        need_cert(table, f"identity #{i + 1}")
        idents.append(ident)
    names = [x["name"] for x in idents if x["name"] is not None]
    for name in names:
        if not _NAME_RE.match(name):
            problems.append(f"identity name {name!r}: use 1-64 characters from [A-Za-z0-9._-]")
    dup_names = sorted({n for n in names if names.count(n) > 1})
    if dup_names:
        problems.append(f"duplicate identity name(s): {dup_names}")
    reserved = {"dealer", "he"} | {f"party{p['id']}" for p in parties if p["id"] is not None}
    clash = sorted(set(names) & reserved)
    if clash:
        problems.append(f"identity name(s) {clash} are reserved for the dealer, HE server and parties")

    # Addresses and files must be distinct across every entry.
    labelled: list[tuple[str, dict[str, Any]]] = [(f"party {p['id']}", p) for p in parties]
    if d is not None:
        labelled.append(("dealer", d))
    if h is not None:
        labelled.append(("he", h))
    _duplicates(problems, "address", [(lab, e["address"]) for lab, e in labelled]
                + [(f"party {p['id']} (data)", p["data_address"]) for p in parties])
    files = [(lab, e[k]) for lab, e in labelled for k in ("cert", "key")]
    files += [(f"party {p['id']}", p["storage_key"]) for p in parties]
    files += [(f"identity {x['name']}", x[k]) for x in idents for k in ("cert", "key")]
    files += [("cluster", c["ca_cert"]), ("cluster", c["ca_key"])]
    _duplicates(problems, "file", files)
    _duplicates(problems, "data_dir", [(f"party {p['id']}", p["data_dir"]) for p in parties])

    if problems or d is None:
        raise TopologyError(str(file), problems)
    return Topology(
        path=file,
        cluster=ClusterSettings(**c),
        dealer=DealerEntry(**d),
        parties=tuple(sorted((PartyEntry(**p) for p in parties), key=lambda e: e.id)),
        he=HEEntry(**h) if h is not None else None,
        identities=tuple(Identity(**x) for x in idents),
    )


#: the default data port of a party is its gRPC port + this (``data_address`` overrides it)
DATA_PORT_OFFSET = 100


def _data_default(address: str, problems: list[str], where: str) -> str | None:
    """``address`` with its port + :data:`DATA_PORT_OFFSET`: the default data address."""
    host, port = split_address(address)
    if port + DATA_PORT_OFFSET > 65535:
        problems.append(f"[{where}]: address {address!r} leaves no port + {DATA_PORT_OFFSET} for the data path; "
                        "set data_address")
        return None
    port += DATA_PORT_OFFSET
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _duplicates(problems: list[str], what: str, items: list[tuple[str, object]]) -> None:
    seen: dict[object, str] = {}
    for label, value in items:
        if value is None:
            continue
        if value in seen and seen[value] != label:
            problems.append(f"duplicate {what} {str(value)!r} used by {seen[value]} and {label}")
        elif value in seen:
            problems.append(f"{label} uses the {what} {str(value)!r} twice")
        else:
            seen[value] = label


def __getattr__(name: str) -> Any:
    """``free_ports`` and ``write_local_topology`` live in :mod:`secureinfer.localtopology`
    (which imports this module); they stay importable from here."""
    if name in ("free_ports", "write_local_topology"):
        from secureinfer import localtopology

        return getattr(localtopology, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
