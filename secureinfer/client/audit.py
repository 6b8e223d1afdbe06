"""Auditor SDK: verify the watermark of a deployed model through the MPC.

``verify_deployed(config, name, cert=..., key=...)`` checks the certificate (signature,
commitment, false-positive rate, dates) locally, then reveals the certificate and the
watermark key to every party. Each party verifies them again and derives the projection,
the bits and the threshold itself; the parties compute the verdict on their weight shares
and the auditor reconstructs only the verdict (and, if asked, the Hamming distance, which
the parties release only for a passing model). No party or auditor sees the weights or
the extracted bits; see :mod:`secureinfer.watermark.mpc`. After an audit the parties know
the watermark key, as the auditor does: treat a key revealed once as public.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path

from secureinfer.client.sdk import _Cluster
from secureinfer.config import Topology
from secureinfer.errors import SecureInferError
from secureinfer.sharing import reconstruct
from secureinfer.transport.codec import share_from_proto
from secureinfer.v1 import party_pb2, party_pb2_grpc
from secureinfer.watermark.certificate import Certificate
from secureinfer.watermark.keys import WatermarkKey
from secureinfer.watermark.verify import Verdict, check_certificate, make_verdict

__all__ = ["verify_deployed"]


def verify_deployed(
    config: str | Path | Topology, name: str, *, cert: Certificate, key: WatermarkKey, version: str = "",
    identity: str = "auditor", registered_at: datetime | None = None, reveal_distance: bool = False,
) -> Verdict:
    """Audit the deployed model ``name``: a :class:`Verdict` (``bit_errors`` only for a pass)."""
    reasons = check_certificate(cert, key, registered_at=registered_at)
    if reasons:
        return make_verdict(cert, reasons=reasons)
    c = _Cluster(config, identity)
    try:
        req = party_pb2.AuditRequest(
            model_name=name, model_version=version, request_id=uuid.uuid4().hex, layer=cert.layer,
            certificate=cert.to_json().encode(), watermark_seed=key.seed, watermark_nonce=key.nonce,
            reveal_distance=reveal_distance,
        )
        timeout = c.topology.cluster.request_timeout_s
        resps = c.call_all(lambda i, ch: party_pb2_grpc.ModelAdminStub(ch).Audit(req, timeout=timeout,
                                                                                 metadata=c.metadata))
        verdict = int(reconstruct([share_from_proto(r.verdict) for r in resps]).item())
        if verdict not in (0, 1):
            raise SecureInferError(f"the parties returned an invalid verdict share sum {verdict}")
        distance = None
        if reveal_distance and verdict == 1:
            distance = int(reconstruct([share_from_proto(r.distance) for r in resps]).item())
            if not 0 <= distance <= cert.threshold:
                raise SecureInferError(f"the parties returned a distance {distance} that contradicts the verdict")
        return make_verdict(cert, reasons=[], errors=distance, below_threshold=bool(verdict))
    finally:
        c.close()
