"""Party-side checks of a watermark audit, the audit rate limit, and error classes on the wire."""

from __future__ import annotations

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from secureinfer.errors import (
    BudgetExhaustedError,
    InvalidArgumentError,
    ResourceExhaustedError,
    error_from_status,
)
from secureinfer.party.limits import RateLimiter
from secureinfer.watermark.certificate import issue_certificate
from secureinfer.watermark.keys import WatermarkKey, public_key_bytes
from secureinfer.watermark.mpc import check_audit_request, project_shares
from secureinfer.watermark.scheme import project_fixed_point


def _cert(bits: int = 64, fpr: float = 1e-9):
    owner = Ed25519PrivateKey.generate()
    key = WatermarkKey.generate(public_key_bytes(owner))
    cert = issue_certificate(owner_key=owner, key=key, layer="fc.weight", layer_shape=(4, 8), bits=bits,
                             frac_bits=16, target_fpr=fpr, weights_sha256="0" * 64)
    return cert, key


def test_audit_spec_is_derived_from_a_verified_certificate() -> None:
    cert, key = _cert()
    spec = check_audit_request(certificate=cert.to_json().encode(), seed=key.seed, nonce=key.nonce,
                               layer="fc.weight", layer_shape=(4, 8))
    assert spec.seed == key.seed and spec.bits == 64 and spec.threshold == cert.threshold


def test_audit_refusal_lists_every_problem() -> None:
    cert, _ = _cert(fpr=0.5)
    _, other_key = _cert()
    with pytest.raises(InvalidArgumentError) as info:
        check_audit_request(certificate=cert.to_json().encode(), seed=other_key.seed, nonce=other_key.nonce,
                            layer="other.weight", layer_shape=(8, 4))
    msg = str(info.value)
    for part in ("FPR", "owner", "layer", "shape"):
        assert part in msg, msg
    with pytest.raises(InvalidArgumentError, match="32 bytes"):
        check_audit_request(certificate=cert.to_json().encode(), seed=b"x", nonce=b"y", layer="fc.weight",
                            layer_shape=(4, 8))
    with pytest.raises(InvalidArgumentError, match="certificate rejected"):
        check_audit_request(certificate=b"{}", seed=other_key.seed, nonce=other_key.nonce, layer="fc.weight",
                            layer_shape=(4, 8))


def test_projection_of_shares_sums_to_the_plaintext_projection() -> None:
    _, key = _cert()
    q = torch.randint(-(2**20), 2**20, (4 * 777,), dtype=torch.int64)  # test data, not secret
    s0 = torch.randint(-(2**62), 2**62, q.shape, dtype=torch.int64)  # test data, not secret
    s1 = q - s0
    y = project_shares(key.seed, s0, bits=40, chunk_elems=5000) + project_shares(key.seed, s1, bits=40)
    assert torch.equal(y, project_fixed_point(key.seed, q, bits=40))


def test_rate_limiter_window() -> None:
    now = [0.0]
    lim = RateLimiter(limit=2, window_s=10.0, what="audits", clock=lambda: now[0])
    lim.admit("a", who="x")
    lim.admit("a", who="x")
    lim.admit("b", who="x")  # keys are independent
    with pytest.raises(ResourceExhaustedError, match="more than 2 audits"):
        lim.admit("a", who="x")
    now[0] = 10.0
    lim.admit("a", who="x")  # the oldest event left the window


def test_error_class_survives_the_wire() -> None:
    assert type(error_from_status("RESOURCE_EXHAUSTED", "m", class_name="BudgetExhaustedError")) is BudgetExhaustedError
    assert type(error_from_status("RESOURCE_EXHAUSTED", "m")) is ResourceExhaustedError
    # a class name that does not match the status code is ignored
    assert type(error_from_status("NOT_FOUND", "m", class_name="BudgetExhaustedError")).__name__ == "NotFoundError"
    assert issubclass(BudgetExhaustedError, ResourceExhaustedError)
