"""Embedding on the digits CNN: accuracy cost, fixed point, robustness, false positives."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from secureinfer.errors import InvalidArgumentError, SecureInferError
from secureinfer.watermark.attacks import prune_by_magnitude, quantize_uniform
from secureinfer.watermark.certificate import save_certificate
from secureinfer.watermark.digits import DigitsCNN, DigitsData, accuracy, fit_digits, load_digits_data, train
from secureinfer.watermark.embed import embed_watermark
from secureinfer.watermark.keys import WatermarkKey, public_key_bytes, save_watermark_key
from secureinfer.watermark.modelio import save_state_dict
from secureinfer.watermark.owner import Watermarked, watermark_model
from secureinfer.watermark.scheme import (
    bit_errors,
    extract_bits,
    float_projection,
    projection_matrix,
    quantize_weights,
    seed_from,
    watermark_bits,
)
from secureinfer.watermark.verify import count_bit_errors, verify_files, verify_state_dict

OWNER = Ed25519PrivateKey.from_private_bytes(bytes([5]) * 32)  # fixed test key, not secret
KEY = WatermarkKey(seed=seed_from(public_key_bytes(OWNER), bytes([1]) * 32), nonce=bytes([1]) * 32)
CREATED = datetime(2026, 1, 1, tzinfo=timezone.utc)


@pytest.fixture(scope="module", autouse=True)
def _one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: extra threads only add contention
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data() -> DigitsData:
    return load_digits_data()


@pytest.fixture(scope="module")
def base(data: DigitsData) -> DigitsCNN:
    return fit_digits(data, seed=0)


@pytest.fixture(scope="module")
def marked(base: DigitsCNN, data: DigitsData) -> tuple[DigitsCNN, Watermarked]:
    model = copy.deepcopy(base)
    wm = watermark_model(
        model, owner_key=OWNER, x=data.x_train, y=data.y_train, layer="fc1.weight", key=KEY, created=CREATED
    )
    return model, wm


def test_embedding_costs_at_most_half_a_point(base: DigitsCNN, marked: tuple[DigitsCNN, Watermarked], data: DigitsData) -> None:
    model, _ = marked
    before = accuracy(base, data.x_test, data.y_test)
    after = accuracy(model, data.x_test, data.y_test)
    assert before > 0.95
    assert before - after <= 0.005, (before, after)


def test_fixed_point_conversion_keeps_every_bit(marked: tuple[DigitsCNN, Watermarked]) -> None:
    model, wm = marked
    e = wm.embedding
    assert e.fixed_point_bit_errors == 0
    assert e.min_margin > 2 * e.quantization_bound
    w = model.state_dict()["fc1.weight"]
    fixed = quantize_weights(w).double() * 2.0**-16
    x = projection_matrix(KEY.seed, bits=256, dim=w.numel(), dtype=torch.float64)
    assert bit_errors(extract_bits(float_projection(x, fixed)), watermark_bits(KEY.seed, bits=256)) == 0
    assert bit_errors(extract_bits(float_projection(x, w.double())), watermark_bits(KEY.seed, bits=256)) == 0
    for f in (16, 20, 32):  # any deployment precision at least the certified one keeps every bit
        assert count_bit_errors(model.state_dict(), wm.certificate, KEY, frac_bits=f) == 0


def test_unmodified_model_verifies(marked: tuple[DigitsCNN, Watermarked]) -> None:
    model, wm = marked
    v = verify_state_dict(model.state_dict(), wm.certificate, KEY, registered_at=datetime(2027, 1, 1, tzinfo=timezone.utc))
    assert v.passed and v.bit_errors == 0 and v.weights_identical and v.reasons == ()
    assert v.p_value is not None and v.p_value < 1e-70


def test_passes_after_50_percent_pruning(marked: tuple[DigitsCNN, Watermarked]) -> None:
    model, wm = marked
    pruned = prune_by_magnitude(model.state_dict(), 0.5)
    assert float((pruned["fc1.weight"] == 0).float().mean()) >= 0.5
    v = verify_state_dict(pruned, wm.certificate, KEY)
    assert v.passed, v.reasons
    assert v.weights_identical is False


def test_passes_after_fine_tuning(marked: tuple[DigitsCNN, Watermarked], data: DigitsData) -> None:
    model, wm = marked
    tuned = copy.deepcopy(model)
    half = len(data.y_train) // 2
    before = tuned.fc1.weight.detach().clone()
    # lr 0.01 with Adam: SGD at lr 0.01 barely moves a converged model (< 1% of the layer).
    train(tuned, data.x_train[:half], data.y_train[:half], epochs=5, lr=0.01, optimizer="adam", seed=3)
    assert float((tuned.fc1.weight.detach() - before).norm() / before.norm()) > 0.1
    assert accuracy(tuned, data.x_test, data.y_test) > 0.9
    v = verify_state_dict(tuned.state_dict(), wm.certificate, KEY)
    assert v.passed, v.reasons


def test_passes_after_5_bit_quantization(marked: tuple[DigitsCNN, Watermarked]) -> None:
    model, wm = marked
    assert verify_state_dict(quantize_uniform(model.state_dict(), 5), wm.certificate, KEY).passed


def test_original_model_and_independent_models_fail(base: DigitsCNN, marked: tuple[DigitsCNN, Watermarked], data: DigitsData) -> None:
    _, wm = marked
    models = [base] + [fit_digits(data, seed=100 + i, epochs=8) for i in range(3)]
    for m in models:
        v = verify_state_dict(m.state_dict(), wm.certificate, KEY)
        assert not v.passed
        assert v.bit_errors is not None and v.bit_errors > wm.certificate.threshold
        assert "too many bit errors" in v.reasons[-1]


@pytest.mark.slow
def test_twenty_independently_trained_models_all_fail(marked: tuple[DigitsCNN, Watermarked], data: DigitsData) -> None:
    _, wm = marked
    errors = []
    for i in range(20):
        m = fit_digits(data, seed=1000 + i)
        errors.append(count_bit_errors(m.state_dict(), wm.certificate, KEY))
    assert all(e > wm.certificate.threshold for e in errors), errors
    assert 100 < sum(errors) / len(errors) < 156  # Bin(256, 1/2): mean 128, sd of the mean 1.8


def test_verification_from_pt_and_npz_files(marked: tuple[DigitsCNN, Watermarked], tmp_path: Path) -> None:
    model, wm = marked
    save_certificate(wm.certificate, tmp_path / "cert.json")
    save_watermark_key(wm.key, tmp_path / "key.json")
    for name in ("m.pt", "m.npz"):
        save_state_dict(model.state_dict(), tmp_path / name)
        v = verify_files(tmp_path / name, tmp_path / "cert.json", tmp_path / "key.json")
        assert v.passed and v.weights_identical, v.reasons


def test_wrong_layer_shape_and_missing_layer_fail(marked: tuple[DigitsCNN, Watermarked]) -> None:
    model, wm = marked
    state = model.state_dict()
    v = verify_state_dict({k: v for k, v in state.items() if k != "fc1.weight"}, wm.certificate, KEY)
    assert not v.passed and any("no parameter 'fc1.weight'" in r for r in v.reasons)
    v = verify_state_dict(dict(state, **{"fc1.weight": state["fc1.weight"].t()}), wm.certificate, KEY)
    assert not v.passed and any("shape" in r for r in v.reasons)


def test_embed_rejects_bad_layers(base: DigitsCNN, data: DigitsData) -> None:
    m = copy.deepcopy(base)
    with pytest.raises(InvalidArgumentError, match="no parameter"):
        embed_watermark(m, KEY.seed, x=data.x_train, y=data.y_train, layer="nope")
    with pytest.raises(InvalidArgumentError, match="fewer than"):
        embed_watermark(m, KEY.seed, x=data.x_train, y=data.y_train, layer="conv1.weight")  # 144 < 256
    with pytest.raises(InvalidArgumentError, match="fixed-point bound"):
        embed_watermark(m, KEY.seed, x=data.x_train, y=data.y_train, layer="fc1.weight", margin=1e-4)


def test_embed_refuses_to_stop_below_the_fixed_point_bound(base: DigitsCNN, data: DigitsData) -> None:
    m = copy.deepcopy(base)
    with pytest.raises(SecureInferError, match="not embedded after 0 epochs"):
        embed_watermark(m, KEY.seed, x=data.x_train, y=data.y_train, layer="fc1.weight", max_epochs=0)
