"""Topology loading: precedence, path resolution, the collecting validator, writing."""

from __future__ import annotations

from pathlib import Path

import pytest

from secureinfer.config import (
    ALL_ROLES,
    ROLE_CLIENT,
    ROLE_PARTY,
    TopologyError,
    config_path,
    load_topology,
    split_address,
    write_local_topology,
)
from secureinfer.errors import AlreadyExistsError, ConfigError

REPO = Path(__file__).resolve().parents[2]

MINIMAL = """
[cluster]
name = "t"
ca_cert = "certs/ca.pem"
request_timeout_s = 12.5

[dealer]
address = "127.0.0.1:7000"
cert = "certs/dealer.pem"
key = "certs/dealer.key"

[[party]]
id = 1
address = "127.0.0.1:7002"
cert = "certs/p1.pem"
key = "certs/p1.key"
data_dir = "data/p1"
storage_key = "certs/p1.sk"

[[party]]
id = 0
address = "127.0.0.1:7001"
cert = "certs/p0.pem"
key = "/abs/p0.key"
data_dir = "data/p0"
storage_key = "certs/p0.sk"

[[identity]]
name = "alice"
role = "client"
cert = "certs/alice.pem"
key = "certs/alice.key"
"""


def _write(tmp_path: Path, text: str, name: str = "topo.toml") -> Path:
    sub = tmp_path / "conf"
    sub.mkdir(exist_ok=True)
    f = sub / name
    f.write_text(text)
    return f


def test_minimal_file_defaults_and_relative_paths(tmp_path: Path) -> None:
    f = _write(tmp_path, MINIMAL)
    t = load_topology(f, environ={})
    conf = f.parent.resolve()
    assert t.n_parties == 2
    assert [p.id for p in t.parties] == [0, 1]  # sorted by id
    assert t.party(1).address == "127.0.0.1:7002"
    assert t.party(0).name == "party0" and t.party(0).role == ROLE_PARTY
    assert t.cluster.ca_cert == conf / "certs" / "ca.pem"
    assert t.cluster.ca_key == conf / "certs" / "ca.key"  # default: next to the CA cert
    assert t.party(1).data_dir == conf / "data" / "p1"
    assert t.party(0).key == Path("/abs/p0.key")
    assert t.cluster.request_timeout_s == 12.5  # file
    assert t.cluster.frac_bits == 16 and t.cluster.tls is True  # defaults
    assert t.cluster.rpc_timeout_s == 10.0 and t.dealer.pool_size == 4
    assert t.dealer.worker_processes is True
    assert load_topology(f, environ={"SECUREINFER_DEALER_WORKER_PROCESSES": "0"}).dealer.worker_processes is False
    assert t.dealer.pool_idle_class is True
    assert load_topology(f, environ={"SECUREINFER_DEALER_POOL_IDLE_CLASS": "false"}).dealer.pool_idle_class is False
    assert t.he is None
    assert t.identity("alice").role == ROLE_CLIENT
    assert [p.id for p in t.peers(0)] == [1]
    with pytest.raises(ConfigError, match="no party with id 2"):
        t.party(2)
    with pytest.raises(ConfigError, match="known: alice"):
        t.identity("bob")


def test_precedence_override_env_file_default(tmp_path: Path) -> None:
    f = _write(tmp_path, MINIMAL)
    env = {
        "SECUREINFER_REQUEST_TIMEOUT_S": "40",  # file says 12.5
        "SECUREINFER_FRAC_BITS": "20",  # default 16
        "SECUREINFER_TLS": "off",
        "SECUREINFER_DEALER_ADDRESS": "127.0.0.1:7100",
        "SECUREINFER_UNRELATED": "ignored",
    }
    t = load_topology(f, environ=env)
    assert t.cluster.request_timeout_s == 40.0
    assert t.cluster.frac_bits == 20
    assert t.cluster.tls is False
    assert t.dealer.address == "127.0.0.1:7100"
    assert t.cluster.rpc_timeout_s == 10.0  # default untouched

    over = {"request_timeout_s": 5, "cluster.frac_bits": "24", "tls": None, "dealer.pool_size": 0}
    t = load_topology(f, environ=env, overrides=over)
    assert t.cluster.request_timeout_s == 5.0  # override beats env and file
    assert t.cluster.frac_bits == 24  # string flag parsed
    assert t.cluster.tls is False  # None override = flag not given -> env wins
    assert t.dealer.pool_size == 0


def test_env_and_override_paths_resolve_against_cwd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = _write(tmp_path, MINIMAL)
    monkeypatch.chdir(tmp_path)
    t = load_topology(f, environ={"SECUREINFER_CA_CERT": "other/ca.pem"})
    assert t.cluster.ca_cert == (tmp_path / "other" / "ca.pem").resolve()


def test_validator_reports_every_problem_at_once(tmp_path: Path) -> None:
    text = """
[cluster]
frac_bits = 40
request_timeout_s = -1
rpc_timeout_s = "soon"
chunk_bytes = 100000000
reqest_timeout_s = 3
prefetch_depth = 65
prefetch_kind_bytes = -1

[dealer]
address = "127.0.0.1:7001"
cert = "d.pem"
key = "d.key"
pool_nice = 25
pool_kind_bytes = -5

[[party]]
id = 0
address = "127.0.0.1:7001"
cert = "p0.pem"
key = "p0.key"
data_dir = "d0"
storage_key = "s0"

[[party]]
id = 0
address = "localhost"
cert = "p1.pem"
data_dir = "d1"
storage_key = "s1"

[[identity]]
name = "x"
role = "emperor"
cert = "x.pem"
key = "x.key"
"""
    f = _write(tmp_path, text)
    with pytest.raises(TopologyError) as info:
        load_topology(f, environ={"SECUREINFER_MAX_MESSAGE_BYTES": "lots"})
    err = info.value
    assert isinstance(err, ConfigError)
    msg = str(err)
    expected = [
        "frac_bits must be in 1..30",
        "request_timeout_s must be a positive",
        "rpc_timeout_s: expected a number",
        "unknown key 'reqest_timeout_s'",
        "missing 'ca_cert'",
        "duplicate party id(s): [0]",
        "bad address 'localhost'",
        "missing 'key'",
        "unknown role 'emperor'",
        "duplicate address '127.0.0.1:7001'",
        "SECUREINFER_MAX_MESSAGE_BYTES",
        "dealer.pool_nice must be in 0..19, got 25",
        "cluster.prefetch_depth must be in 0..64, got 65",
        "cluster.prefetch_kind_bytes must be >= 0, got -1",
        "dealer.pool_kind_bytes must be >= 0, got -5",
    ]
    for fragment in expected:
        assert fragment in msg, fragment
    assert len(err.problems) >= len(expected)


def test_validator_ids_and_party_count(tmp_path: Path) -> None:
    one_party = MINIMAL.split("[[party]]")[0] + "[[party]]" + MINIMAL.split("[[party]]")[1]
    f = _write(tmp_path, one_party.replace("id = 1", "id = 3"))
    with pytest.raises(TopologyError) as info:
        load_topology(f, environ={})
    msg = str(info.value)
    assert "need at least 2 [[party]] entries, found 1" in msg
    assert "party ids must be exactly 0..0, got [3]" in msg

    f = _write(tmp_path, MINIMAL.replace("[dealer]", "[dealerx]"), "nodealer.toml")
    with pytest.raises(TopologyError) as info:
        load_topology(f, environ={})
    assert "missing [dealer] table" in str(info.value)
    assert "unknown top-level key or table 'dealerx'" in str(info.value)


def test_bad_override_key_and_bad_toml(tmp_path: Path) -> None:
    f = _write(tmp_path, MINIMAL)
    with pytest.raises(TopologyError, match="override 'nonsense'"):
        load_topology(f, environ={}, overrides={"nonsense": 1})
    bad = _write(tmp_path, "[cluster\n", "bad.toml")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_topology(bad, environ={})
    with pytest.raises(ConfigError, match="does not exist"):
        load_topology(tmp_path / "missing.toml", environ={})


def test_tls_false_needs_no_certificates(tmp_path: Path) -> None:
    text = """
[cluster]
tls = false
[dealer]
address = "127.0.0.1:7000"
[[party]]
id = 0
address = "127.0.0.1:7001"
data_dir = "d0"
storage_key = "s0"
[[party]]
id = 1
address = "[::1]:7002"
data_dir = "d1"
storage_key = "s1"
"""
    t = load_topology(_write(tmp_path, text), environ={})
    assert t.cluster.tls is False and t.cluster.ca_cert is None and t.party(0).cert is None
    with pytest.raises(TopologyError, match="missing 'ca_cert'"):
        load_topology(_write(tmp_path, text), environ={"SECUREINFER_TLS": "1"})


def test_split_address() -> None:
    assert split_address("127.0.0.1:50051") == ("127.0.0.1", 50051)
    assert split_address("party1.example.org:443") == ("party1.example.org", 443)
    assert split_address("[::1]:9") == ("::1", 9)
    for bad in ["", "host", ":80", "h:0", "h:70000", "::1:80", "[zz]:1", "h h:1"]:
        with pytest.raises(ConfigError):
            split_address(bad)


def test_write_local_topology_is_loadable(tmp_path: Path) -> None:
    f = write_local_topology(tmp_path / "cfg" / "cluster.toml", base_dir=tmp_path / "demo", n_parties=3, ports={"dealer": 6553, 1: 6554})
    t = load_topology(f, environ={})
    assert t.n_parties == 3
    assert t.dealer.address == "127.0.0.1:6553" and t.party(1).address == "127.0.0.1:6554"
    addresses = {p.address for p in t.parties} | {t.dealer.address, t.he.address if t.he else ""}
    assert len(addresses) == 5  # all distinct
    assert t.cluster.ca_cert == (tmp_path / "demo" / "certs" / "ca.pem").resolve()
    assert t.party(2).storage_key == (tmp_path / "demo" / "certs" / "party2.storage.key").resolve()
    assert {i.name for i in t.identities} == {"owner", "client", "client2", "auditor"}
    assert "../demo/certs" in f.read_text()  # written relative to the file
    with pytest.raises(AlreadyExistsError):
        write_local_topology(f, base_dir=tmp_path / "demo")
    write_local_topology(f, base_dir=tmp_path / "demo", overwrite=True, include_he=False, tls=False)
    assert load_topology(f, environ={}).he is None


@pytest.mark.parametrize("name", ["local.toml", "three-party.toml"])
def test_shipped_topologies_are_valid(name: str) -> None:
    t = load_topology(REPO / "parties" / name, environ={})
    assert t.n_parties == (2 if name == "local.toml" else 3)
    assert t.cluster.tls
    roles = {i.role for i in t.identities}
    assert roles <= set(ALL_ROLES) and {"owner", "client", "auditor"} <= roles
    if name == "local.toml":
        assert t.he is not None and t.identity("client2").role == ROLE_CLIENT


def test_config_path() -> None:
    assert config_path("a.toml", environ={"SECUREINFER_CONFIG": "b.toml"}) == Path("a.toml")
    assert config_path(None, environ={"SECUREINFER_CONFIG": "b.toml"}) == Path("b.toml")
    with pytest.raises(ConfigError, match="--config"):
        config_path(None, environ={})


def test_data_address_default_explicit_and_checked(tmp_path: Path) -> None:
    t = load_topology(_write(tmp_path, MINIMAL), environ={})
    assert t.party(0).data_address == "127.0.0.1:7101" and t.party(1).data_address == "127.0.0.1:7102"
    assert t.cluster.data_transport == "stream"
    explicit = MINIMAL.replace('address = "127.0.0.1:7002"', 'address = "127.0.0.1:7002"\ndata_address = "10.0.0.2:9000"')
    assert load_topology(_write(tmp_path, explicit, "e.toml"), environ={}).party(1).data_address == "10.0.0.2:9000"
    env = {"SECUREINFER_DATA_TRANSPORT": "grpc"}
    assert load_topology(_write(tmp_path, MINIMAL, "g.toml"), environ=env).cluster.data_transport == "grpc"
    clash = MINIMAL.replace('address = "127.0.0.1:7002"', 'address = "127.0.0.1:7002"\ndata_address = "127.0.0.1:7000"')
    clash = clash.replace('request_timeout_s = 12.5', 'request_timeout_s = 12.5\ndata_transport = "carrier-pigeon"')
    with pytest.raises(TopologyError) as info:
        load_topology(_write(tmp_path, clash, "c.toml"), environ={})
    text = str(info.value)
    assert "duplicate address '127.0.0.1:7000' used by dealer and party 1 (data)" in text or \
        "duplicate address '127.0.0.1:7000' used by party 1 (data) and dealer" in text
    assert "cluster.data_transport must be one of stream, grpc" in text
    high = MINIMAL.replace('address = "127.0.0.1:7001"', 'address = "127.0.0.1:65500"')
    with pytest.raises(TopologyError, match="no port \\+ 100 for the data path; set data_address"):
        load_topology(_write(tmp_path, high, "h.toml"), environ={})
