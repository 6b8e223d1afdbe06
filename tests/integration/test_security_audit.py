"""Security regression (issue 14, finding 1): the watermark audit no longer extracts weights.

The old audit let the auditor send a secret-shared projection S, bits b and a threshold;
rows ``2^(52-j) e_i`` turned the sign gates into weight bits. Now the auditor reveals a
certificate and its key, and every party verifies them and derives S, b and the
threshold itself. Here an auditor with a valid certificate for its role tries every lever
it still has, through real parties over TLS.
"""

from __future__ import annotations

import dataclasses
import uuid

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from secureinfer.client.audit import verify_deployed
from secureinfer.client.sdk import _Cluster, deploy
from secureinfer.errors import InvalidArgumentError, ResourceExhaustedError
from secureinfer.localcluster import LocalCluster
from secureinfer.sharing import reconstruct
from secureinfer.transport.codec import share_from_proto
from secureinfer.v1 import party_pb2, party_pb2_grpc
from secureinfer.watermark.certificate import issue_certificate
from secureinfer.watermark.keys import WatermarkKey, public_key_bytes

pytestmark = pytest.mark.timeout(600)

LAYER = "0.weight"
SHAPE = (16, 8)


def _self_signed(*, bits: int = 64, target_fpr: float = 1e-9) -> tuple:
    """A certificate an attacker can make for any deployed layer: its own key, its own signature."""
    owner = Ed25519PrivateKey.generate()
    key = WatermarkKey.generate(public_key_bytes(owner))
    cert = issue_certificate(owner_key=owner, key=key, layer=LAYER, layer_shape=SHAPE, bits=bits, frac_bits=16,
                             target_fpr=target_fpr, weights_sha256="0" * 64)
    return cert, key


def _raw_audit(config, name: str, req: party_pb2.AuditRequest) -> list[party_pb2.AuditResponse]:
    """The same request to every party at once (the SDK's fan-out), errors as the SDK raises them."""
    c = _Cluster(config, "auditor")
    try:
        return c.call_all(lambda i, ch: party_pb2_grpc.ModelAdminStub(ch).Audit(req, timeout=60, metadata=c.metadata))
    finally:
        c.close()


def _request(cert, key, *, reveal: bool = False, cert_bytes: bytes | None = None) -> party_pb2.AuditRequest:
    return party_pb2.AuditRequest(
        model_name="victim", request_id=uuid.uuid4().hex, layer=LAYER,
        certificate=cert.to_json().encode() if cert_bytes is None else cert_bytes,
        watermark_seed=key.seed, watermark_nonce=key.nonce, reveal_distance=reveal,
    )


def test_auditor_cannot_aim_the_audit_or_read_distances(tmp_path) -> None:
    torch.manual_seed(0)  # test weights, not secret
    victim = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.rand(1, 8)
    with LocalCluster(tmp_path, env={"SECUREINFER_AUDITS_PER_HOUR": "4"}) as c:
        deploy(victim, x, name="victim", config=c.config_path)

        # the old wire fields are gone: a projection can no longer even be expressed
        with pytest.raises(ValueError):
            party_pb2.AuditRequest(projection=None)  # type: ignore[call-arg]

        # no certificate / a forged one / a dishonest threshold / a key that does not open it
        cert, key = _self_signed()
        with pytest.raises(InvalidArgumentError, match="certificate rejected"):
            _raw_audit(c.config_path, "victim", _request(cert, key, cert_bytes=b""))
        forged = dataclasses.replace(cert, threshold=cert.bits - 1)  # signature no longer matches
        with pytest.raises(InvalidArgumentError, match="signature"):
            _raw_audit(c.config_path, "victim", _request(forged, key))
        loose, loose_key = _self_signed(bits=64, target_fpr=0.5)  # validly signed, threshold 31 of 64
        with pytest.raises(InvalidArgumentError, match="FPR"):
            _raw_audit(c.config_path, "victim", _request(loose, loose_key))
        other_cert, _ = _self_signed()
        with pytest.raises(InvalidArgumentError, match="commitment|owner"):
            _raw_audit(c.config_path, "victim", _request(other_cert, key))
        wrong_layer = dataclasses.replace(cert, layer_shape=(8, 16))
        with pytest.raises(InvalidArgumentError):
            _raw_audit(c.config_path, "victim", _request(wrong_layer, key))

        # a valid, honest self-made certificate: the verdict fails and no distance leaks,
        # even when asked for (the parties open verdict * distance)
        for _ in range(3):
            cert, key = _self_signed()
            resps = _raw_audit(c.config_path, "victim", _request(cert, key, reveal=True))
            assert int(reconstruct([share_from_proto(r.verdict) for r in resps]).item()) == 0
            assert int(reconstruct([share_from_proto(r.distance) for r in resps]).item()) == 0
        v = verify_deployed(c.config_path, "victim", cert=cert, key=key, reveal_distance=True)
        assert not v.passed and v.bit_errors is None
        # audits are rate-limited per auditor and model (4 per hour here; refused ones do not count)
        with pytest.raises(ResourceExhaustedError, match="watermark audits"):
            verify_deployed(c.config_path, "victim", cert=cert, key=key)
        for p in (0, 1):
            log = c.log_text(f"party{p}")
            assert '"event": "audit"' in log and "audit refused" in log
            assert key.seed.hex() not in log and key.nonce.hex() not in log  # the key is never logged
