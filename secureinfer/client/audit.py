"""Auditor SDK: verify the watermark of a deployed model through the MPC.

``verify_deployed(config, name, cert=..., key=...)`` checks the certificate (signature,
commitment, false-positive rate, dates) locally, then secret-shares the projection
matrix and watermark bits derived from the revealed key, sends one share to each party,
and reconstructs only the verdict (and the Hamming distance if asked). No party sees the
weights, the key material or the extracted bits; see :mod:`secureinfer.watermark.mpc`.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from pathlib import Path

import torch

from secureinfer.client.sdk import _Cluster
from secureinfer.config import Topology
from secureinfer.errors import SecureInferError
from secureinfer.prg import Prg
from secureinfer.sharing import reconstruct, share
from secureinfer.transport.codec import share_from_proto, tensor_to_proto
from secureinfer.v1 import common_pb2, party_pb2, party_pb2_grpc
from secureinfer.watermark.certificate import Certificate
from secureinfer.watermark.keys import WatermarkKey
from secureinfer.watermark.scheme import projection_signs, watermark_bits
from secureinfer.watermark.verify import Verdict, check_certificate, make_verdict

__all__ = ["verify_deployed"]


def verify_deployed(
    config: str | Path | Topology, name: str, *, cert: Certificate, key: WatermarkKey, version: str = "",
    identity: str = "auditor", registered_at: datetime | None = None, reveal_distance: bool = False,
) -> Verdict:
    reasons = check_certificate(cert, key, registered_at=registered_at)
    if reasons:
        return make_verdict(cert, reasons=reasons)
    c = _Cluster(config, identity)
    try:
        n = c.topology.n_parties
        prg = Prg.from_os()
        s = projection_signs(key.seed, bits=cert.bits, dim=cert.dim()).to(torch.int64)
        b = watermark_bits(key.seed, bits=cert.bits).to(torch.int64)
        s_sh, b_sh = share(s, n, prg=prg), share(b, n, prg=prg)
        rid = uuid.uuid4().hex
        enc = common_pb2.ENCODING_ADDITIVE_SHARE
        reqs = [
            party_pb2.AuditRequest(
                model_name=name, model_version=version, request_id=rid, layer=cert.layer,
                projection=tensor_to_proto(s_sh[i], encoding=enc), bits=tensor_to_proto(b_sh[i], encoding=enc),
                threshold=cert.threshold, reveal_distance=reveal_distance,
            )
            for i in range(n)
        ]
        timeout = c.topology.cluster.request_timeout_s
        resps = c.call_all(lambda i, ch: party_pb2_grpc.ModelAdminStub(ch).Audit(reqs[i], timeout=timeout,
                                                                                 metadata=c.metadata))
        verdict = int(reconstruct([share_from_proto(r.verdict) for r in resps]).item())
        if verdict not in (0, 1):
            raise SecureInferError(f"the parties returned an invalid verdict share sum {verdict}")
        distance = None
        if reveal_distance:
            distance = int(reconstruct([share_from_proto(r.distance) for r in resps]).item())
        return make_verdict(cert, reasons=[], errors=distance, below_threshold=bool(verdict))
    finally:
        c.close()
