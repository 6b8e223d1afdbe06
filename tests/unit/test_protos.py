"""The committed generated code matches the protos, and the wire format is what we expect."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]


def _gen_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("gen_protos", ROOT / "scripts" / "gen_protos.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["gen_protos"] = mod
    spec.loader.exec_module(mod)
    return mod


def test_generated_code_is_up_to_date() -> None:
    pytest.importorskip("grpc_tools")
    problems = _gen_module().check()
    assert problems == [], "\n".join(problems)


def test_check_detects_drift(tmp_path: Path) -> None:
    pytest.importorskip("grpc_tools")
    gen = _gen_module()
    repo = tmp_path / "repo"
    shutil.copytree(ROOT / "secureinfer" / "v1", repo / "secureinfer" / "v1")
    assert gen.check(repo_root=repo) == []
    target = repo / "secureinfer" / "v1" / "common_pb2.py"
    target.write_text(target.read_text() + "# edited by hand\n")
    (repo / "secureinfer" / "v1" / "old_pb2.py").write_text("")
    problems = gen.check(repo_root=repo)
    assert any("out of date: secureinfer/v1/common_pb2.py" in p for p in problems)
    assert any("stale generated file" in p and "old_pb2.py" in p for p in problems)


def test_every_proto_is_compiled() -> None:
    protos = sorted(p.stem for p in (ROOT / "protos" / "secureinfer" / "v1").glob("*.proto"))
    assert {"common", "party", "dealer"} <= set(protos)
    for stem in protos:
        for suffix in ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py"):
            assert (ROOT / "secureinfer" / "v1" / f"{stem}{suffix}").exists(), stem + suffix


def test_package_and_field_numbers() -> None:
    from secureinfer.v1 import common_pb2, dealer_pb2, party_pb2

    assert common_pb2.DESCRIPTOR.package == "secureinfer.v1"
    fields = {f.name: f.number for f in common_pb2.Tensor.DESCRIPTOR.fields}
    assert fields == {"dtype": 1, "shape": 2, "data": 3, "encoding": 4, "frac_bits": 5}
    assert common_pb2.DType.Value("DTYPE_INT32") == 6
    assert common_pb2.Encoding.Value("ENCODING_CKKS") == 3
    msg = {f.name: f.number for f in party_pb2.PeerMessage.DESCRIPTOR.fields}
    assert msg == {
        "session_id": 1, "step": 2, "sender": 3, "chunk_index": 4, "chunk_count": 5, "payload": 6
    }
    chunk = party_pb2.DeployChunk(data=b"x")
    assert chunk.WhichOneof("part") == "data"
    services = {
        "Inference": party_pb2, "ModelAdmin": party_pb2, "PeerExchange": party_pb2,
        "Dealer": dealer_pb2,
    }
    for name, mod in services.items():
        assert name in mod.DESCRIPTOR.services_by_name
    fetch = dealer_pb2.DESCRIPTOR.services_by_name["Dealer"].methods_by_name["Fetch"]
    assert fetch.server_streaming and not fetch.client_streaming
    deploy = party_pb2.DESCRIPTOR.services_by_name["ModelAdmin"].methods_by_name["Deploy"]
    assert deploy.client_streaming and not deploy.server_streaming


def test_bundle_round_trip() -> None:
    from secureinfer.v1 import common_pb2, dealer_pb2

    b = dealer_pb2.Bundle()
    b.tensors["a"].CopyFrom(common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64, shape=[1], data=b"\0" * 8))
    b.blobs["seed"] = b"\x01" * 32
    back = dealer_pb2.Bundle.FromString(b.SerializeToString())
    assert back.tensors["a"].shape == [1] and back.blobs["seed"] == b"\x01" * 32
