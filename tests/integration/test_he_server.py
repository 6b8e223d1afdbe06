"""A real `secureinfer he serve` process over mTLS on loopback, driven by the HE SDK and
the CLI as a user would: digits CNN (x^2 activations, trained here on scikit-learn's
bundled digits) vs its plaintext version, the bytes the server receives, and the errors
a user can cause."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
import tenseal as ts

from secureinfer.certs import create_certificates
from secureinfer.config import load_topology, write_local_topology
from secureinfer.errors import InvalidArgumentError, NotFoundError
from secureinfer.he.ckks import ClientContext, _fields, context_has_secret_key
from secureinfer.he.client import HEClient
from secureinfer.he.convert import train_digits_he
from secureinfer.he.model import forward, save_model
from secureinfer.he.params import CkksParams
from secureinfer.he.wire import chunk_blobs
from secureinfer.transport import tls
from secureinfer.v1 import he_pb2, he_pb2_grpc

pytestmark = pytest.mark.timeout(300)
FLOOD_SIGMA = 2.0 ** -12
ROOT = Path(__file__).resolve().parents[2]


def he_command() -> list[str]:
    """`python -m secureinfer he ...` once the main CLI has the command, else the module."""
    try:
        from secureinfer.cli import build_parser

        sub = next(a for a in build_parser()._actions if isinstance(a, __import__("argparse")._SubParsersAction))
        if "he" in sub.choices:
            return [sys.executable, "-m", "secureinfer", "he"]
    except Exception:  # noqa: BLE001 - the main CLI may not be importable yet
        pass
    return [sys.executable, "-m", "secureinfer.he.cli", "he"]


class Recorder(grpc.UnaryUnaryClientInterceptor, grpc.StreamUnaryClientInterceptor,
               grpc.StreamStreamClientInterceptor):
    """Records the method and the serialised bytes of every request message sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    def _wrap(self, method: str, it: Iterator) -> Iterator:
        for msg in it:
            self.sent.append((method, msg.SerializeToString()))
            yield msg

    def intercept_unary_unary(self, continuation, details, request):  # noqa: ANN001, ANN201
        self.sent.append((details.method, request.SerializeToString()))
        return continuation(details, request)

    def intercept_stream_unary(self, continuation, details, request_iterator):  # noqa: ANN001, ANN201
        return continuation(details, self._wrap(details.method, request_iterator))

    def intercept_stream_stream(self, continuation, details, request_iterator):  # noqa: ANN001, ANN201
        return continuation(details, self._wrap(details.method, request_iterator))

    def methods(self) -> set[str]:
        return {m.rsplit("/", 1)[-1] for m, _ in self.sent}


@pytest.fixture(scope="module")
def digits():
    model, _, x_te, _, y_te = train_digits_he(kind="cnn", epochs=6)
    return model, x_te, y_te


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, digits):
    d = tmp_path_factory.mktemp("he")
    cfg = write_local_topology(d / "topology.toml", base_dir=d)
    create_certificates(load_topology(cfg))
    model_path = save_model(digits[0], d / "digits.npz")
    log = open(d / "server.log", "wb")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([*he_command(), "serve", "--model", str(model_path), "--config", str(cfg),
                             "--flood-sigma", repr(FLOOD_SIGMA)], stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        with HEClient(cfg, timeout_s=60) as probe:
            deadline = time.monotonic() + 90
            while not probe.server_live(timeout_s=1.0):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"he serve did not start:\n{(d / 'server.log').read_text()[-3000:]}")
                time.sleep(0.3)
        yield cfg, d
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def test_digits_cnn_matches_plaintext_over_tls(server, digits) -> None:
    cfg, _ = server
    model, x_te, y_te = digits
    rec = Recorder()
    with HEClient(cfg, interceptors=[rec], timeout_s=120) as c:
        y = c.infer("digits-cnn", x_te)
        cost = c.last_cost
        client_ctx = next(iter(c._contexts.values()))
        # the bytes the server received: reassemble the context from the OpenSession stream
        ctx_bytes = b"".join(he_pb2.OpenSessionChunk.FromString(b).context
                             for m, b in rec.sent if m.endswith("/OpenSession"))
        assert ctx_bytes and not context_has_secret_key(ctx_bytes)
        assert not ts.context_from(ctx_bytes).is_private()
        private = client_ctx._ctx.serialize(save_secret_key=True)
        sk = next(v for n, _, v in _fields(private) if n == 3)
        sk = next(v for n, _, v in _fields(sk) if n == 1)
        assert len(sk) > 1000 and not any(sk[:256] in b for _, b in rec.sent)
        # and the single-image path
        y1 = c.infer("digits-cnn", x_te[0])
        assert c.last_cost.batch_pack == 1
    plain = forward(model, x_te)
    agree = float((y.argmax(1) == plain.argmax(1)).mean())
    err = float(np.abs(y - plain).max())
    print(f"\nHE vs plaintext on {len(x_te)} digits: argmax agreement {agree:.4f}, max |logit error| {err:.2e}, "
          f"accuracy {float((y.argmax(1) == y_te).mean()):.4f}; cost {json.dumps(cost.as_dict())}")
    assert agree >= 0.99 and err <= 1e-2
    assert np.abs(y1 - plain[0]).max() <= 1e-2
    assert cost.batch == len(x_te) and cost.bytes_up > cost.session_bytes > 0 and cost.bytes_down > 0
    assert rec.methods() == {"ModelMetadata", "OpenSession", "Infer", "CloseSession"}


def test_too_deep_model_is_refused_before_any_ciphertext(server) -> None:
    cfg, _ = server
    rec = Recorder()
    shallow = CkksParams(8192, (40, 30, 30, 46), 30)
    with HEClient(cfg, params=shallow, interceptors=[rec]) as c:
        with pytest.raises(InvalidArgumentError, match="needs 5 rescaling levels but the parameters allow 2"):
            c.infer("digits-cnn", np.zeros((1, 1, 8, 8)))
    assert rec.methods() == {"ModelMetadata"}  # no session, no key, no ciphertext left the client


def test_ciphertext_from_another_context_is_a_clear_error(server, digits) -> None:
    cfg, _ = server
    topo = load_topology(cfg)
    with HEClient(cfg) as c:
        c.infer("digits-cnn", digits[1][:2])
        (key, s), = c._sessions.items()
        params = key[1]
        ident = topo.identity("client")
        with ClientContext(params) as other, \
                tls.open_channel(topo.he.address, settings=topo.cluster, cert=ident.cert, key=ident.key) as ch:
            stub = he_pb2_grpc.HEInferenceStub(ch)
            blobs = other.encrypt([np.zeros(params.slots)] * s.plan.input.n_ct)

            def request(fingerprint: str, cts: list[bytes]):
                yield he_pb2.HEInferRequest(header=he_pb2.HEInferHeader(
                    session_id=s.id, model_name="digits-cnn", batch_size=1, n_ciphertexts=len(cts),
                    context_fingerprint=fingerprint))
                for chunk in chunk_blobs(cts, 1 << 20):
                    yield he_pb2.HEInferRequest(ciphertext=chunk)

            corrupt = [b[:-64] + bytes(64) for b in blobs]
            for fp, cts, expected in ((other.fingerprint(), blobs, "different CKKS context"),
                                      (s.fingerprint, corrupt, "not valid for this session")):
                with pytest.raises(grpc.RpcError) as ei:
                    list(stub.Infer(request(fp, cts), timeout=60))
                assert ei.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert expected in ei.value.details()
        # the server and the session are unharmed
        y = c.infer("digits-cnn", digits[1][:2])
        assert np.abs(y - forward(digits[0], digits[1][:2])).max() <= 1e-2


def test_roles_and_sessions_are_enforced(server) -> None:
    cfg, _ = server
    with HEClient(cfg) as c:
        c.infer("digits-cnn", np.zeros((1, 1, 8, 8)))
        (_, s), = c._sessions.items()
        topo = load_topology(cfg)
        for name in ("client2", "owner"):  # another client's session; a valid certificate, wrong role
            ident = topo.identity(name)
            with tls.open_channel(topo.he.address, settings=topo.cluster, cert=ident.cert, key=ident.key) as ch:
                stub = he_pb2_grpc.HEInferenceStub(ch)
                with pytest.raises(grpc.RpcError) as ei:
                    stub.CloseSession(he_pb2.CloseSessionRequest(session_id=s.id), timeout=10)
                assert ei.value.code() == grpc.StatusCode.PERMISSION_DENIED, name
        with pytest.raises(NotFoundError, match="no HE model"):
            c.infer("nope", np.zeros((1, 64)))
        assert c.server_ready()
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    ident = topo.identity("client")
    with tls.open_channel(topo.he.address, settings=topo.cluster, cert=ident.cert, key=ident.key) as ch:
        resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


def test_cli_infer_writes_the_output(server, digits, tmp_path: Path) -> None:
    cfg, _ = server
    x = digits[1][:4]
    np.save(tmp_path / "x.npy", x)
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([*he_command(), "infer", "--model", "digits-cnn", "--input", str(tmp_path / "x.npy"),
                          "--output", str(tmp_path / "y.npy"), "--config", str(cfg)],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads(out.stdout.strip().splitlines()[-1])
    assert report["shape"] == [4, 10] and report["batch"] == 4
    y = np.load(tmp_path / "y.npy", allow_pickle=False)
    assert np.abs(y - forward(digits[0], x)).max() <= 1e-2
