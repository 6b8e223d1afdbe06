"""Certificates, owner keys, key files and model files: every tampering fails with a clear reason."""

from __future__ import annotations

import json
import os
import stat
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from torch import nn

from secureinfer.errors import AlreadyExistsError, IntegrityError, InvalidArgumentError, NotFoundError
from secureinfer.watermark.certificate import (
    Certificate,
    canonical_json,
    check_key,
    check_signature,
    issue_certificate,
    load_certificate,
    save_certificate,
)
from secureinfer.watermark.keys import (
    WatermarkKey,
    generate_owner_key,
    load_owner_private_key,
    load_owner_public_key,
    load_watermark_key,
    public_key_bytes,
    save_watermark_key,
)
from secureinfer.watermark.modelio import load_state_dict, save_state_dict, weights_digest
from secureinfer.watermark.scheme import seed_from
from secureinfer.watermark.verify import check_certificate, make_verdict, verify_files

T0 = datetime(2026, 1, 2, 3, 4, 5, tzinfo=timezone.utc)


def _owner(i: int) -> Ed25519PrivateKey:
    return Ed25519PrivateKey.from_private_bytes(bytes([i]) * 32)  # fixed test keys, not secret


def _key(owner: Ed25519PrivateKey, n: int = 0) -> WatermarkKey:
    nonce = bytes([n]) * 32
    return WatermarkKey(seed=seed_from(public_key_bytes(owner), nonce), nonce=nonce)


def _cert(owner: Ed25519PrivateKey, key: WatermarkKey, **kw: object) -> Certificate:
    args: dict[str, object] = dict(
        owner_key=owner,
        key=key,
        layer="fc1.weight",
        layer_shape=(64, 128),
        bits=256,
        frac_bits=16,
        target_fpr=1e-9,
        weights_sha256="ab" * 32,
        created=T0,
    )
    args.update(kw)
    return issue_certificate(**args)  # type: ignore[arg-type]


def _resign(cert: Certificate, owner: Ed25519PrivateKey, **changes: object) -> Certificate:
    body = {**cert.body(), **changes}
    body["layer_shape"] = tuple(body["layer_shape"])  # type: ignore[arg-type]
    unsigned = Certificate(**body, signature="")  # type: ignore[arg-type]
    return Certificate(**body, signature=owner.sign(unsigned.signed_bytes()).hex())  # type: ignore[arg-type]


def test_valid_certificate_round_trips_and_checks(tmp_path: Path) -> None:
    owner, key = _owner(1), _key(_owner(1))
    cert = _cert(owner, key)
    assert cert.threshold == 80 and cert.false_positive_rate <= 1e-9
    save_certificate(cert, tmp_path / "c.json")
    back = load_certificate(tmp_path / "c.json")
    assert back == cert and back.signed_bytes() == cert.signed_bytes()
    check_signature(back)
    check_key(back, key)
    assert check_certificate(back, key, registered_at=T0 + timedelta(seconds=1)) == []
    assert "seed" not in back.to_json() and key.nonce.hex() not in back.to_json()


def test_canonical_json_is_order_independent() -> None:
    assert canonical_json({"b": 1, "a": [1, 2]}) == canonical_json({"a": [1, 2], "b": 1}) == b'{"a":[1,2],"b":1}'
    with pytest.raises(ValueError):
        canonical_json({"x": float("nan")})


@pytest.mark.parametrize(
    "field,value",
    [
        ("threshold", 120),
        ("layer", "conv2.weight"),
        ("weights_sha256", "cd" * 32),
        ("created", "2020-01-01T00:00:00Z"),
        ("bits", 128),
        ("commitment", "00" * 32),
        ("layer_shape", [128, 64]),
    ],
)
def test_altered_field_fails_signature(field: str, value: object) -> None:
    owner, key = _owner(1), _key(_owner(1))
    obj = json.loads(_cert(owner, key).to_json())
    obj[field] = value
    cert = Certificate.from_json(json.dumps(obj))
    reasons = check_certificate(cert, key)
    assert any("signature is invalid" in r and "altered" in r for r in reasons), reasons


def test_forged_certificate_naming_another_owner_fails() -> None:
    victim, forger = _owner(1), _owner(2)
    key = _key(victim)
    genuine = _cert(victim, key)
    forged = _resign(genuine, forger)  # signed by the forger, but still names the victim's key
    reasons = check_certificate(forged, key)
    assert any("signature is invalid" in r for r in reasons)
    # A forger who names itself is a different owner: the key no longer belongs to it.
    own = _resign(genuine, forger, owner_public_key=public_key_bytes(forger).hex())
    reasons = check_certificate(own, key)
    assert not any("signature" in r for r in reasons)
    assert any("does not belong to the certificate's owner" in r for r in reasons)
    reasons = check_certificate(own, key, expected_owner=public_key_bytes(victim))
    assert any("not the expected owner" in r for r in reasons)


def test_non_matching_keys_fail() -> None:
    owner = _owner(1)
    cert = _cert(owner, _key(owner, 0))
    other_nonce = check_certificate(cert, _key(owner, 1))
    assert any("does not match the certificate's commitment" in r for r in other_nonce), other_nonce
    other_owner = check_certificate(cert, _key(_owner(3), 0))
    assert any("does not belong to the certificate's owner" in r for r in other_owner), other_owner
    with pytest.raises(IntegrityError, match="commitment"):
        check_key(cert, _key(owner, 1))
    with pytest.raises(InvalidArgumentError):
        _cert(owner, _key(_owner(3)))  # the owner cannot certify someone else's key


def test_commitment_binds_parameters() -> None:
    owner, key = _owner(1), _key(_owner(1))
    cert = _resign(_cert(owner, key), owner, layer="conv2.weight")  # validly signed, wrong params
    reasons = check_certificate(cert, key)
    assert reasons == ["watermark key does not match the certificate's commitment"]


def test_late_certificate_and_dishonest_threshold() -> None:
    owner, key = _owner(1), _key(_owner(1))
    cert = _cert(owner, key)
    late = check_certificate(cert, key, registered_at=T0 - timedelta(days=1))
    assert len(late) == 1 and late[0].startswith("late certificate")
    assert check_certificate(cert, key, registered_at=T0) != []  # must be strictly earlier
    generous = _resign(cert, owner, threshold=120, false_positive_rate=0.25)
    reasons = check_certificate(generous, key)
    assert any("above the auditor's limit" in r for r in reasons)
    assert any("states FPR" in r for r in reasons)


def test_malformed_certificates_are_integrity_errors(tmp_path: Path) -> None:
    good = json.loads(_cert(_owner(1), _key(_owner(1))).to_json())
    for text in ("not json", "[]", json.dumps({**good, "extra": 1}), json.dumps({**good, "bits": "256"})):
        with pytest.raises(IntegrityError):
            Certificate.from_json(text)
    missing = {k: v for k, v in good.items() if k != "commitment"}
    with pytest.raises(IntegrityError, match="missing"):
        Certificate.from_json(json.dumps(missing))
    (tmp_path / "bad.json").write_text("{")
    v = verify_files(tmp_path / "m.pt", tmp_path / "bad.json", tmp_path / "k.json")
    assert not v.passed and v.reasons[0].startswith("certificate rejected")


def test_verdict_without_measurement_or_with_mpc_comparison() -> None:
    owner, key = _owner(1), _key(_owner(1))
    cert = _cert(owner, key)
    assert not make_verdict(cert, reasons=[]).passed
    assert make_verdict(cert, reasons=[], below_threshold=True).passed
    v = make_verdict(cert, reasons=[], below_threshold=False)
    assert not v.passed and "too many bit errors" in v.reasons[0]


def test_owner_key_files(tmp_path: Path) -> None:
    path = tmp_path / "owner.pem"
    key = generate_owner_key(path)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert public_key_bytes(load_owner_private_key(path)) == public_key_bytes(key)
    assert public_key_bytes(load_owner_public_key(Path(f"{path}.pub"))) == public_key_bytes(key)
    with pytest.raises(AlreadyExistsError):
        generate_owner_key(path)
    with pytest.raises(NotFoundError):
        load_owner_private_key(tmp_path / "none.pem")
    (tmp_path / "junk.pem").write_text("junk")
    with pytest.raises(InvalidArgumentError):
        load_owner_private_key(tmp_path / "junk.pem")


def test_watermark_key_file(tmp_path: Path) -> None:
    key = _key(_owner(1))
    save_watermark_key(key, tmp_path / "k.json")
    assert stat.S_IMODE(os.stat(tmp_path / "k.json").st_mode) == 0o600
    assert load_watermark_key(tmp_path / "k.json") == key
    assert key.seed.hex() not in repr(key)
    (tmp_path / "bad.json").write_text('{"seed": "00", "nonce": "11"}')
    with pytest.raises(InvalidArgumentError):
        load_watermark_key(tmp_path / "bad.json")


def test_model_files_round_trip_and_refuse_pickled_modules(tmp_path: Path) -> None:
    state = {"a.weight": torch.randn(3, 4), "a.bias": torch.zeros(3), "n": torch.tensor(5)}  # not secret
    for name in ("m.pt", "m.npz"):
        save_state_dict(state, tmp_path / name)
        back = load_state_dict(tmp_path / name)
        assert back.keys() == state.keys() and all(torch.equal(back[k], state[k]) for k in state)
        assert weights_digest(back) == weights_digest(state)
    torch.save(nn.Linear(2, 2), tmp_path / "module.pt")  # a pickled module, not a state_dict
    with pytest.raises(InvalidArgumentError, match="weights-only"):
        load_state_dict(tmp_path / "module.pt")
    np.save(tmp_path / "obj.npy", np.array([{"x": 1}], dtype=object), allow_pickle=True)
    os.replace(tmp_path / "obj.npy", tmp_path / "obj.npz")
    with pytest.raises(InvalidArgumentError):
        load_state_dict(tmp_path / "obj.npz")
    with pytest.raises(NotFoundError):
        load_state_dict(tmp_path / "missing.pt")
    changed = dict(state, **{"a.weight": state["a.weight"] + 2.0**-10})
    assert weights_digest(changed) != weights_digest(state)
    on_grid = dict(state, **{"a.weight": torch.arange(12.0).reshape(3, 4) * 2.0**-16})
    nudged = dict(on_grid, **{"a.weight": on_grid["a.weight"] + 2.0**-20})  # below the fixed-point step
    assert weights_digest(nudged) == weights_digest(on_grid)
