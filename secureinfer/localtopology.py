"""Writing a loopback topology file: the demo, local clusters, tests and benchmarks.

:func:`write_local_topology` writes a valid ``[cluster]`` / ``[dealer]`` / ``[[party]]`` /
``[he]`` / ``[[identity]]`` file for processes on one host, with ports from
:func:`free_ports`, and loads it back through :func:`secureinfer.config.load_topology`
before it replaces anything. Both names are also importable from :mod:`secureinfer.config`.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Mapping, Sequence
from pathlib import Path

from secureinfer.config import DEFAULT_IDENTITIES, load_topology
from secureinfer.errors import AlreadyExistsError, ConfigError

__all__ = ["free_ports", "write_local_topology"]


def free_ports(count: int, *, host: str = "127.0.0.1") -> list[int]:
    """``count`` distinct TCP ports that were free on ``host`` a moment ago.

    All sockets are held open until every port is picked, so the ports are distinct; another
    process may still take one before it is used (an unavoidable race on a shared machine).
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _toml(value: object) -> str:
    """A TOML literal for a str/bool/int/float (JSON basic strings are valid TOML)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value), ensure_ascii=False)


def write_local_topology(
    path: str | os.PathLike[str],
    *,
    base_dir: str | os.PathLike[str],
    n_parties: int = 2,
    ports: Mapping[str | int, int] | None = None,
    name: str = "local",
    host: str = "127.0.0.1",
    frac_bits: int = 16,
    tls: bool = True,
    request_timeout_s: float = 30.0,
    rpc_timeout_s: float = 10.0,
    max_message_bytes: int = 64 * 1024 * 1024,
    chunk_bytes: int = 4 * 1024 * 1024,
    pool_size: int = 4,
    include_he: bool = True,
    identities: Sequence[tuple[str, str]] = DEFAULT_IDENTITIES,
    overwrite: bool = False,
    data_transport: str = "stream",
) -> Path:
    """Write a valid loopback topology file and return its path.

    Certificates go to ``base_dir/certs``, party data to ``base_dir/data/party<i>``; paths
    are written relative to the file's directory. ``ports`` may give ``"dealer"``, ``"he"``,
    party ports (keyed ``i`` or ``"party<i>"``) and their data ports (``"party<i>.data"``);
    the rest are picked with
    :func:`free_ports`. The file is loaded back (validated) before returning. Refuses to
    replace an existing file unless ``overwrite`` (AlreadyExistsError).
    """
    file = Path(path).expanduser().resolve()
    if file.exists() and not overwrite:
        raise AlreadyExistsError(f"{file} exists; pass overwrite=True to replace it")
    if n_parties < 2:
        raise ConfigError(f"n_parties must be at least 2, got {n_parties}")
    base = Path(base_dir).expanduser().resolve()
    given = dict(ports or {})
    wanted = ["dealer", *(f"party{i}" for i in range(n_parties)), *(f"party{i}.data" for i in range(n_parties))]
    wanted += ["he"] if include_he else []
    chosen: dict[str, int] = {}
    for key in wanted:
        party_key = int(key[5:]) if key.startswith("party") and key[5:].isdigit() else None
        port = given.get(key, given.get(party_key) if party_key is not None else None)  # type: ignore[arg-type]
        if port is not None:
            chosen[key] = int(port)
    missing = [k for k in wanted if k not in chosen]
    for key, port in zip(missing, free_ports(len(missing), host=host)):
        chosen[key] = port
    addr_host = f"[{host}]" if ":" in host else host
    address = {key: f"{addr_host}:{port}" for key, port in chosen.items()}

    def rel(p: Path) -> str:
        try:
            return os.path.relpath(p, file.parent)
        except ValueError:  # different drive on Windows
            return str(p)

    certs = base / "certs"

    def cert_lines(cn: str) -> list[str]:
        return [f"cert = {_toml(rel(certs / f'{cn}.pem'))}", f"key = {_toml(rel(certs / f'{cn}.key'))}"]

    lines = [
        "# Loopback topology written by secureinfer.config.write_local_topology.",
        "[cluster]",
        f"name = {_toml(name)}",
        f"frac_bits = {frac_bits}",
        f"ca_cert = {_toml(rel(certs / 'ca.pem'))}",
        f"request_timeout_s = {_toml(float(request_timeout_s))}",
        f"rpc_timeout_s = {_toml(float(rpc_timeout_s))}",
        f"max_message_bytes = {max_message_bytes}",
        f"chunk_bytes = {chunk_bytes}",
        f"tls = {_toml(tls)}",
        f"data_transport = {_toml(data_transport)}",
        "",
        "[dealer]",
        f"address = {_toml(address['dealer'])}",
        *cert_lines("dealer"),
        f"pool_size = {pool_size}",
    ]
    for i in range(n_parties):
        lines += [
            "",
            "[[party]]",
            f"id = {i}",
            f"address = {_toml(address[f'party{i}'])}",
            f"data_address = {_toml(address[f'party{i}.data'])}",
            *cert_lines(f"party{i}"),
            f"data_dir = {_toml(rel(base / 'data' / f'party{i}'))}",
            f"storage_key = {_toml(rel(certs / f'party{i}.storage.key'))}",
        ]
    if include_he:
        lines += ["", "[he]", f"address = {_toml(address['he'])}", *cert_lines("he")]
    for ident_name, role in identities:
        lines += ["", "[[identity]]", f"name = {_toml(ident_name)}", f"role = {_toml(role)}", *cert_lines(ident_name)]
    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(file.name + ".tmp")
    tmp.write_text("\n".join(lines) + "\n", encoding="utf-8")
    try:
        load_topology(tmp, environ={})
    except ConfigError:
        tmp.unlink()
        raise
    os.replace(tmp, file)
    return file
