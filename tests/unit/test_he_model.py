"""HE model description, validator, lowering/folding, parameter selection and the slot
layout planner — all checked in plaintext (no TenSEAL), so they are fast."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch import nn

from secureinfer.errors import InvalidArgumentError, ShapeError, UnsupportedModelError
from secureinfer.he.convert import Poly, Square, conversion_report, from_torch
from secureinfer.he.engine import _Groups
from secureinfer.he.flooding import gaussian, output_grid, round_to_grid
from secureinfer.he.layout import plan_layout
from secureinfer.he.lower import AffineStep, LinearStep, SquareStep, lower
from secureinfer.he.model import HEModel, forward, load_model, relu_poly, save_model, validate
from secureinfer.he.packing import pack_inputs, unpack_outputs
from secureinfer.he.params import MAX_COEFF_BITS_128, CkksParams, check_params, select_params
from secureinfer.prg import Prg

RNG = np.random.default_rng(1)  # test data only (not secret)


def small_cnn(*, poly: bool = True) -> HEModel:
    torch.manual_seed(0)  # test weights only
    net = nn.Sequential(nn.Conv2d(2, 3, 3, stride=2, padding=1), Square(), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(12, 7), Poly([0.1, 0.5, 0.2]) if poly else Square(), nn.Linear(7, 4))
    return from_torch(net.double(), (2, 8, 8), name="small")


def run_program(program, x: np.ndarray, *, expanded: bool = False) -> np.ndarray:
    """Plaintext execution of the lowered steps (the specification the engine implements)."""
    h = x.T.copy()
    for k, s in enumerate(program.steps):
        if isinstance(s, LinearStep):
            if k == 0 and expanded:
                g = program.gather
                feats = np.where(g[:, None] >= 0, h[np.maximum(g, 0)], 0.0)
                h = s.expanded @ feats + s.bias[:, None]
            else:
                h = s.matrix @ h + s.bias[:, None]
        elif isinstance(s, SquareStep):
            h = h * h
        elif isinstance(s, AffineStep):
            h = s.scale[:, None] * h + s.shift[:, None]
    return h.T


def simulate(program, plan, x: np.ndarray) -> np.ndarray:
    """Run the layout plan with np.roll as rotation: checks placement, shifts and BSGS."""
    slots, bp, f = plan.slots, plan.bp, plan.features_per_ct
    cts = pack_inputs(program, plan, x)
    place = plan.input

    def rot(v: np.ndarray, k: int) -> np.ndarray:
        return np.roll(v, -(k * bp) % slots)

    def spread(place_ct, place_pos, values, j):
        vec = np.zeros(f)
        sel = place_ct == j
        vec[place_pos[sel]] = values[sel]
        return np.repeat(vec, bp)

    for k, step in enumerate(program.steps):
        lp = plan.steps[k]
        if isinstance(step, LinearStep):
            groups = _Groups(lp, step.expanded if lp.use_expanded else step.matrix, f)
            babies = []
            for i, ct in enumerate(cts):
                row = [ct]
                for _ in range(int(lp.baby_max[i])):
                    row.append(rot(row[-1], lp.unit))
                babies.append(row)
            out = []
            for j in range(lp.output.n_ct):
                acc = None
                for g in range(int(lp.giant_max[j]), -1, -1):
                    s = np.zeros(slots)
                    for gi, (jj, gg, i, hh) in enumerate(groups.keys):
                        if jj == j and gg == g:
                            s = s + np.repeat(groups.vectors[gi], bp) * babies[i][hh]
                    acc = s if acc is None else rot(acc, lp.n1 * lp.unit) + s
                out.append(acc + spread(lp.output.ct, lp.output.pos, step.bias, j))
            cts, place = out, lp.output
        elif isinstance(step, SquareStep):
            cts = [c * c for c in cts]
        else:
            cts = [spread(place.ct, place.pos, step.scale, j) * c + spread(place.ct, place.pos, step.shift, j)
                   for j, c in enumerate(cts)]
    return unpack_outputs(plan, cts, x.shape[0])


# ----------------------------------------------------------------------------- validator


def test_validator_lists_every_unsupported_layer() -> None:
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(), nn.Linear(8, 4), nn.GELU(),
                        nn.Linear(4, 2), nn.Sigmoid())
    m = from_torch(net, (1, 6, 6), name="bad")
    m.layers.append({"type": "poly", "coeffs": [0, 0, 0, 1.0]})
    with pytest.raises(UnsupportedModelError) as ei:
        validate(m)
    probs = ei.value.problems
    assert len(probs) == 5, probs
    assert any("relu" in p and "relu_poly" in p for p in probs)
    assert any("maxpool2d" in p and "avgpool2d" in p for p in probs)
    assert any("gelu" in p for p in probs) and any("sigmoid" in p for p in probs)
    assert any("degree 3" in p for p in probs)


def test_validator_reports_shape_and_weight_problems() -> None:
    m = small_cnn()
    m.weights["4.weight"] = np.zeros((7, 13))
    m.layers.insert(0, {"type": "linear", "out_features": 3})  # linear on an image without flatten
    with pytest.raises(UnsupportedModelError, match="flatten"):
        validate(m)
    with pytest.raises(ShapeError):
        forward(small_cnn(), np.zeros((2, 1, 8, 8)))


def test_relu_conversion_states_its_accuracy_cost() -> None:
    torch.manual_seed(0)  # test weights only
    net = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    m = from_torch(net, (16,), name="relu", relu_bound=4.0)
    validate(m)
    assert m.layers[2]["type"] == "poly" and "relu" in m.layers[2]["replaces"]
    x = RNG.uniform(-1, 1, (200, 16))
    y = net(torch.from_numpy(x)).detach().numpy().argmax(1)
    rep = conversion_report(net, m, x, y)
    assert rep["accuracy_original"] == 1.0 and 0.0 <= rep["accuracy_converted"] <= 1.0
    assert rep["max_abs_logit_diff"] > 0
    b = 3.0
    np.testing.assert_allclose(relu_poly(b), [3 * b / 32, 0.5, 15 / (32 * b)], rtol=1e-3, atol=1e-4)


def test_save_load_roundtrip_without_pickle(tmp_path) -> None:
    m = small_cnn()
    m.output_bound = 12.5
    p = save_model(m, tmp_path / "m.npz")
    with np.load(p, allow_pickle=False) as data:
        arch = json.loads(bytes(data["__model__"]).decode())
    assert arch["format"] == "secureinfer.he/1" and "weight" not in json.dumps(arch)
    m2 = load_model(p)
    x = RNG.uniform(0, 1, (3, 2, 8, 8))
    np.testing.assert_array_equal(forward(m, x), forward(m2, x))
    assert m2.output_bound == 12.5
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    with pytest.raises(InvalidArgumentError):
        load_model(tmp_path / "bad.npz")


# ----------------------------------------------------------------------------- lowering


def test_lowering_matches_reference_and_folds_polynomials() -> None:
    m = small_cnn()
    x = RNG.uniform(-1, 1, (5, 2, 8, 8))
    ref = forward(m, x)
    prog = lower(m)
    kinds = [type(s).__name__ for s in prog.steps]
    # conv+square, avgpool+linear merged, poly = one square, its scale folded into the last linear
    assert kinds == ["LinearStep", "SquareStep", "LinearStep", "SquareStep", "LinearStep"], kinds
    assert prog.depth == 5
    flat = x.reshape(5, -1)
    np.testing.assert_allclose(run_program(prog, flat), ref, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(run_program(prog, flat, expanded=True), ref, rtol=1e-10, atol=1e-10)
    assert lower(m, structural=True).depth == prog.depth


def test_affine_without_linear_neighbour_costs_a_level() -> None:
    m = HEModel("p", (4,), [{"type": "poly", "coeffs": [1.0, 2.0, 0.0]}, {"type": "square"},
                            {"type": "poly", "coeffs": [0.0, 3.0]}])
    prog = lower(m)
    x = RNG.uniform(-1, 1, (3, 4))
    np.testing.assert_allclose(run_program(prog, x), forward(m, x), rtol=1e-12)
    # (2x + 1)^2 * 3 = 12 (x + 0.5)^2: a free shift, the square, one scaling
    assert prog.depth == 2 and [type(s).__name__ for s in prog.steps] == ["AffineStep", "SquareStep", "AffineStep"]


# ----------------------------------------------------------------------------- parameters


def test_parameter_selection_is_secure_and_deep_enough() -> None:
    p = select_params(5, output_bound=256)
    assert p.poly_modulus_degree == 8192 and p.depth == 5 and p.security_ok()
    assert p.total_bits <= MAX_COEFF_BITS_128[8192] and p.headroom_bits >= 8
    deep = select_params(12, output_bound=100)
    assert deep.poly_modulus_degree == 16384 and deep.depth == 12 and deep.security_ok()
    check_params(p, depth=5, output_bound=256)
    with pytest.raises(InvalidArgumentError, match="needs 6 rescaling levels but the parameters allow 5"):
        check_params(p, depth=6)
    with pytest.raises(InvalidArgumentError, match="128-bit"):
        check_params(CkksParams(8192, (60, 40, 40, 40, 60), 40), depth=3)
    with pytest.raises(InvalidArgumentError):
        select_params(40)


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("bp", [1, 2, 8, 64, 512])
def test_layout_plan_computes_the_model_in_slots(bp: int) -> None:
    m = small_cnn()
    prog, structure = lower(m), lower(m, structural=True)
    plan = plan_layout(structure, slots=512, bp=bp)
    x = RNG.uniform(-1, 1, (min(bp, 3), 2, 8, 8))
    np.testing.assert_allclose(simulate(prog, plan, x.reshape(x.shape[0], -1)), forward(m, x), rtol=1e-9, atol=1e-9)
    steps = plan.galois_steps()
    assert len(steps) <= 2 * sum(s is not None for s in plan.steps)
    assert all(0 < s < 512 for s in steps)


def test_im2col_layout_for_single_image_conv() -> None:
    layers = [{"type": "conv2d", "out_channels": 4, "kernel_size": [7, 7], "stride": [3, 3], "padding": [0, 0]},
              {"type": "square"}, {"type": "flatten"}, {"type": "linear", "out_features": 64}, {"type": "square"},
              {"type": "linear", "out_features": 10}]
    w = {"0.weight": RNG.normal(0, 0.2, (4, 1, 7, 7)), "0.bias": RNG.normal(0, 0.1, 4),
         "3.weight": RNG.normal(0, 0.1, (64, 256)), "3.bias": RNG.normal(0, 0.1, 64),
         "5.weight": RNG.normal(0, 0.1, (10, 64)), "5.bias": RNG.normal(0, 0.1, 10)}
    m = HEModel("cnn28", (1, 28, 28), layers, w)
    plan = plan_layout(lower(m, structural=True), slots=4096, bp=1)
    assert plan.im2col and plan.input.n_ct == 1
    assert plan.steps[0].unit == 64  # conv diagonals are multiples of the window count
    x = RNG.uniform(0, 1, (1, 1, 28, 28))
    np.testing.assert_allclose(simulate(lower(m), plan, x.reshape(1, -1)), forward(m, x), rtol=1e-9, atol=1e-9)
    big = plan_layout(lower(m, structural=True), slots=4096, bp=4096)
    assert big.rotations == 0 and big.galois_steps() == [] and big.input.n_ct == 784


def test_pack_rejects_bad_inputs() -> None:
    m = small_cnn()
    prog = lower(m)
    plan = plan_layout(lower(m, structural=True), slots=512, bp=4)
    with pytest.raises(InvalidArgumentError, match="batch pack"):
        pack_inputs(prog, plan, np.zeros((5, 128)))
    with pytest.raises(ShapeError):
        pack_inputs(prog, plan, np.zeros((2, 127)))
    with pytest.raises(InvalidArgumentError):
        pack_inputs(prog, plan, np.full((1, 128), np.nan))


# ----------------------------------------------------------------------------- flooding


def test_flooding_noise_and_rounding() -> None:
    z = gaussian(Prg(bytes(32)), 20000)
    assert abs(z.mean()) < 0.05 and abs(z.std() - 1.0) < 0.05
    assert not np.array_equal(gaussian(Prg(bytes(32)), 10), gaussian(Prg(b"\x01" * 32), 10))
    assert output_grid(2.0 ** -12) == 2.0 ** -9 and output_grid(0.0) == 0.0
    np.testing.assert_array_equal(round_to_grid(np.array([0.26, -0.74]), 0.5), [0.5, -0.5])


def test_auto_relu_bounds_come_from_calibration_data() -> None:
    torch.manual_seed(1)  # test weights only
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3), nn.ReLU(), nn.Linear(3, 2)).double()
    x = RNG.uniform(-2, 2, (50, 6))
    m = from_torch(net, (6,), name="auto", relu_bound="auto", calibration=x)
    with torch.no_grad():
        h1 = net[0](torch.from_numpy(x))
        h2 = net[2](torch.relu(h1))
    expected = [float(h1.abs().max()), float(h2.abs().max())]
    got = [float(ly["replaces"].split("[-")[1].split(",")[0]) for ly in m.layers if ly["type"] == "poly"]
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    with pytest.raises(ValueError, match="calibration"):
        from_torch(net, (6,), name="auto", relu_bound="auto")


def test_ciphertext_chunking_roundtrip_and_malformed_streams() -> None:
    from secureinfer.errors import ProtocolError
    from secureinfer.he.wire import chunk_blobs, collect_blobs

    blobs = [bytes(range(256)) * 3, b"x" * 10, bytes(1000)]
    chunks = list(chunk_blobs(blobs, 97))
    assert max(len(c.data.data) for c in chunks) == 97
    assert collect_blobs(iter(chunks), count=3, max_bytes=10_000) == blobs
    with pytest.raises(ProtocolError, match="ended early"):
        collect_blobs(iter(chunks[:-1]), count=3, max_bytes=10_000)
    with pytest.raises(ProtocolError, match="out of order"):
        collect_blobs(iter([chunks[0], chunks[-1]]), count=3, max_bytes=10_000)
    with pytest.raises(InvalidArgumentError, match="limit"):
        collect_blobs(iter(chunks), count=3, max_bytes=500)
    with pytest.raises(InvalidArgumentError, match="more than"):
        collect_blobs(iter(chunks), count=2, max_bytes=10_000)
