"""Real `secureinfer dealer` / `secureinfer party` processes with mTLS on loopback,
driven through the client SDK as a user would."""

from __future__ import annotations

import json
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import grpc
import numpy as np
import pytest
import torch
from torch import nn

from secureinfer.certs import create_certificates
from secureinfer.client.sdk import Client, deploy
from secureinfer.config import load_topology, write_local_topology
from secureinfer.demo import load_digits_split, train_digits_mlp
from secureinfer.errors import (
    AlreadyExistsError,
    InvalidArgumentError,
    PeerUnavailableError,
    PermissionDeniedError,
    SecureInferError,
    TransportError,
)
from secureinfer.localcluster import LocalCluster
from secureinfer.transport import tls
from secureinfer.v1 import common_pb2, party_pb2, party_pb2_grpc

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with LocalCluster(tmp_path_factory.mktemp("cluster"), request_timeout_s=20.0, rpc_timeout_s=5.0) as c:
        yield c


@pytest.fixture(scope="module")
def digits(cluster: LocalCluster):
    x_tr, x_te, y_tr, y_te = load_digits_split()
    model = train_digits_mlp(x_tr, y_tr, epochs=30)
    deploy(model, torch.from_numpy(x_te[:1]), name="digits", config=cluster.config_path)
    with torch.no_grad():
        plain = model(torch.from_numpy(x_te)).double().numpy()
    return model, x_te, plain


def test_digits_mlp_matches_plaintext_on_whole_test_split(cluster: LocalCluster, digits) -> None:
    _, x_te, plain = digits
    secure = np.zeros_like(plain)
    with Client(cluster.config_path) as c:
        for i in range(0, len(x_te), 60):
            secure[i : i + 60] = c.infer("digits", x_te[i : i + 60])
        assert c.last_cost is not None and c.last_cost.rounds == 5
    assert (secure.argmax(1) == plain.argmax(1)).all()
    assert np.abs(secure - plain).max() <= 1e-2


def test_secure_argmax_output(cluster: LocalCluster, digits) -> None:
    _, x_te, plain = digits
    with Client(cluster.config_path) as c:
        out = c.infer("digits", x_te[:20], outputs=("logits", "argmax"))
    assert isinstance(out, dict)
    assert (out["argmax"].argmax(1) == plain[:20].argmax(1)).all()
    assert (out["argmax"].sum(1) == 1).all()


def test_wrong_shape_and_dtype_are_invalid_argument(cluster: LocalCluster, digits) -> None:
    with Client(cluster.config_path) as c:
        with pytest.raises(InvalidArgumentError, match=r"\(batch, 64\)"):
            c.infer("digits", np.zeros((2, 65), dtype=np.float32))
    # a raw request with a float tensor instead of an int64 share
    topo = cluster.topology
    ident = topo.identity("client")
    with tls.open_channel(topo.party(0).address, settings=topo.cluster, cert=ident.cert, key=ident.key) as ch:
        req = party_pb2.InferRequest(
            model_name="digits", request_id=uuid.uuid4().hex,
            input=common_pb2.Tensor(dtype=common_pb2.DTYPE_FLOAT32, shape=[1, 64], data=bytes(256),
                                    encoding=common_pb2.ENCODING_ADDITIVE_SHARE, frac_bits=16),
        )
        with pytest.raises(grpc.RpcError) as err:
            party_pb2_grpc.InferenceStub(ch).Infer(req, timeout=10)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "INT64" in err.value.details()
        # seeded shares: a seed of the wrong length, and shapes that would expand 32 bytes
        # into 2^31 or 2^30 elements (refused on the shape, before anything is expanded)
        for shape, data, text in (([1, 64], bytes(31), "32-byte seed"),
                                  ([1 << 25, 64], bytes(32), "at most 4096 rows"), ([1, 1 << 30], bytes(32), "(batch, 64)")):
            req = party_pb2.InferRequest(
                model_name="digits", request_id=uuid.uuid4().hex,
                input=common_pb2.Tensor(dtype=common_pb2.DTYPE_INT64, shape=shape, data=data,
                                        encoding=common_pb2.ENCODING_SEEDED_SHARE, frac_bits=16),
            )
            with pytest.raises(grpc.RpcError) as err:
                party_pb2_grpc.InferenceStub(ch).Infer(req, timeout=10)
            assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert text in err.value.details()


def test_unknown_model_and_redeploy_without_replace(cluster: LocalCluster, digits) -> None:
    model, x_te, _ = digits
    with Client(cluster.config_path) as c, pytest.raises(SecureInferError, match="not deployed"):
        c.infer("no-such-model", x_te[:1])
    with pytest.raises(AlreadyExistsError):
        deploy(model, torch.from_numpy(x_te[:1]), name="digits", config=cluster.config_path)


def test_roles_are_enforced(cluster: LocalCluster, digits) -> None:
    model, x_te, _ = digits
    # a client may not deploy, an owner may not infer
    with pytest.raises(PermissionDeniedError):
        deploy(model, torch.from_numpy(x_te[:1]), name="evil", config=cluster.config_path, identity="client")
    with Client(cluster.config_path, identity="owner") as c, pytest.raises(PermissionDeniedError):
        c.infer("digits", x_te[:1])


def test_certificate_from_another_ca_is_refused(cluster: LocalCluster, digits, tmp_path) -> None:
    _, x_te, _ = digits
    other = write_local_topology(tmp_path / "other.toml", base_dir=tmp_path)
    create_certificates(load_topology(other))
    rogue = load_topology(other).identity("client")
    topo = cluster.topology
    # client side: trusts the real CA but presents a certificate of another CA
    creds = tls.channel_credentials(rogue.cert, rogue.key, topo.cluster.ca_cert)
    with grpc.secure_channel(topo.party(0).address, creds) as ch:
        with pytest.raises(grpc.RpcError) as err:
            party_pb2_grpc.InferenceStub(ch).ModelMetadata(common_pb2.ModelMetadataRequest(name="digits"), timeout=5)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    # peer side: a "party" with a foreign certificate cannot inject protocol messages
    rogue_party = load_topology(other).party(1)
    creds = tls.channel_credentials(rogue_party.cert, rogue_party.key, topo.cluster.ca_cert)
    with grpc.secure_channel(topo.party(0).address, creds) as ch:
        msg = party_pb2.PeerMessage(session_id="x", step=1, sender=1, chunk_index=0, chunk_count=1, payload=b"1")
        with pytest.raises(grpc.RpcError):
            party_pb2_grpc.PeerExchangeStub(ch).Send(msg, timeout=5)
    # and without any client certificate at all
    creds = grpc.ssl_channel_credentials(root_certificates=topo.cluster.ca_cert.read_bytes())
    with grpc.secure_channel(topo.party(0).address, creds) as ch:
        with pytest.raises(grpc.RpcError):
            party_pb2_grpc.InferenceStub(ch).ModelMetadata(common_pb2.ModelMetadataRequest(name="digits"), timeout=5)


def test_concurrent_clients_get_their_own_results(cluster: LocalCluster, digits) -> None:
    model, x_te, plain = digits

    def one(k: int) -> tuple[int, np.ndarray]:
        idx = np.arange(k * 7, k * 7 + 5)
        with Client(cluster.config_path) as c:
            return k, c.infer("digits", x_te[idx])

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(one, range(8)))
    for k, y in results:
        idx = np.arange(k * 7, k * 7 + 5)
        assert np.abs(y - plain[idx]).max() <= 1e-2


def test_party_killed_mid_request_then_restarted(cluster: LocalCluster, digits) -> None:
    model, x_te, plain = digits
    big = np.tile(x_te, (3, 1))[:1500]  # long enough to be interrupted
    errors: list[BaseException] = []
    elapsed: list[float] = []

    def run() -> None:
        t = time.monotonic()
        try:
            with Client(cluster.config_path, timeout=20.0) as c:
                c.infer("digits", big)
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)
        elapsed.append(time.monotonic() - t)

    th = threading.Thread(target=run)
    th.start()
    time.sleep(0.3)
    cluster.kill("party1")
    th.join(60)
    assert not th.is_alive(), "client hung after a party died"
    assert errors, "request should fail when a party dies"
    assert isinstance(errors[0], (TransportError, PeerUnavailableError, SecureInferError))
    assert "party 1" in str(errors[0]) or "party1" in str(errors[0])
    assert elapsed[0] < 20.0 + 5
    cluster.start_party(1)
    with Client(cluster.config_path) as c:
        y = c.infer("digits", x_te[:10])
    assert np.abs(y - plain[:10]).max() <= 1e-2


@pytest.mark.parametrize("data_transport", ["stream", "grpc"])
def test_three_party_cluster(tmp_path, data_transport: str) -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(20, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.rand(6, 20)
    with LocalCluster(tmp_path, n_parties=3, env={"SECUREINFER_DATA_TRANSPORT": data_transport}) as c:
        deploy(model, x[:1], name="tiny", config=c.config_path)
        with Client(c.config_path) as cl:
            y = cl.infer("tiny", x.numpy())
            assert cl.last_cost is not None and cl.last_cost.rounds > 5  # bitwise comparisons
        assert f'"data_transport": "{data_transport}"' in c.log_text("party2")
    with torch.no_grad():
        ref = model(x).double().numpy()
    assert np.abs(y - ref).max() <= 1e-2
    assert (y.argmax(1) == ref.argmax(1)).all()


def test_shape_error_message_names_expected_shape(cluster: LocalCluster, digits) -> None:
    with Client(cluster.config_path) as c, pytest.raises(InvalidArgumentError, match="expects input of shape"):
        c.infer("digits", np.zeros((1, 8, 8), dtype=np.float32))


def _dealer_counters(cluster: LocalCluster) -> dict[str, int]:
    from secureinfer.v1 import dealer_pb2, dealer_pb2_grpc

    topo = cluster.topology
    ident = topo.identity("owner")
    ch = tls.open_channel(topo.dealer.address, settings=topo.cluster, cert=ident.cert, key=ident.key)
    try:
        return dict(dealer_pb2_grpc.DealerStub(ch).Stats(dealer_pb2.StatsRequest(), timeout=5.0).counters)
    finally:
        ch.close()


def test_pool_batches_prewarms_a_batch_size_from_deploy_time(cluster: LocalCluster, digits) -> None:
    model, x_te, plain = digits
    with pytest.raises(InvalidArgumentError, match="pool.batches"):
        deploy(model, torch.from_numpy(x_te[:1]), name="prewarm-bad", config=cluster.config_path,
               parameters={"pool.batches": "0"})
    dep = deploy(model, torch.from_numpy(x_te[:1]), name="prewarm", config=cluster.config_path,
                 parameters={"pool.batches": "6"}).deployment_id
    for p in (0, 1):  # every party ran each pre-warmed kind once, together, before the deploy returned
        runs = [json.loads(line) for line in cluster.log_text(f"party{p}").splitlines()
                if f'"deployment": "{dep}"' in line and '"event": "warmup' in line]
        assert sorted((r["event"], r["batch"]) for r in runs) == [("warmup", 1), ("warmup", 6)]
    # wait until the dealer is idle: generation done, parts prefetched and claimed
    last, since, t0 = None, time.monotonic(), time.monotonic()
    while time.monotonic() - t0 < 60:
        c = _dealer_counters(cluster)
        level = (c["sets_generated"], c["parts_prefetched"], c["sets_claimed"], c["generating"])
        if level != last:
            last, since = level, time.monotonic()
        elif c["generating"] == 0 and time.monotonic() - since > 1.0:
            break
        time.sleep(0.1)
    binds = c["binds_prefetched"] + c["binds_fallback"]
    with Client(cluster.config_path) as cl:
        out = cl.infer("prewarm", x_te[:6])  # the first batch-6 request of this deployment
    after = _dealer_counters(cluster)
    assert after["binds_prefetched"] + after["binds_fallback"] == binds  # no dealer call on the request path
    assert (out.argmax(1) == plain[:6].argmax(1)).all()


def test_client_connect_reaches_every_party_or_names_the_missing_one(cluster: LocalCluster, digits) -> None:
    with Client(cluster.config_path) as c:
        assert c.connect(timeout=10) is c
    cluster.kill("party1")
    try:
        with Client(cluster.config_path) as c:
            t = time.monotonic()
            with pytest.raises(PeerUnavailableError, match="party 1 at") as info:
                c.connect(timeout=1.0)
            assert time.monotonic() - t < 5 and "party 0" not in str(info.value)
    finally:
        cluster.start_party(1)
    with Client(cluster.config_path) as c:
        c.connect(timeout=10)


def test_calibrated_deploy_through_real_parties(cluster: LocalCluster, digits) -> None:
    model, x_te, plain = digits
    deploy(model, torch.from_numpy(x_te[:1]), name="digits-cal", config=cluster.config_path,
           calibration=x_te[:200])
    with Client(cluster.config_path) as c:
        y = c.infer("digits-cal", x_te[200:300])
        cost = c.last_cost
        c.infer("digits", x_te[200:300])
        base = c.last_cost
    assert (y.argmax(1) == plain[200:300].argmax(1)).all()
    assert np.abs(y - plain[200:300]).max() <= 1e-2
    assert cost.bytes_offline < 0.8 * base.bytes_offline  # fewer DCF bits per ReLU
