"""Calibrated ReLU comparison ranges (graph.ranges): fewer DCF bits, same outputs, and the
stated failure outside the range."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from secureinfer.dealer.material import BundleBuilder
from secureinfer.engine.plan import compile_plan, fixed_operand_shapes, generate_request_material
from secureinfer.errors import InvalidArgumentError, UnsupportedModelError
from secureinfer.graph.ir import Graph
from secureinfer.graph.passes import evaluate
from secureinfer.graph.ranges import calibrate_ranges, gate_ranges
from secureinfer.graph.torch_import import from_torch

from .test_ops_cnn import run_secure


def _mlp(scale: float = 1.0) -> Graph:
    torch.manual_seed(3)
    m = torch.nn.Sequential(torch.nn.Linear(20, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8), torch.nn.ReLU(),
                            torch.nn.Linear(8, 4))
    with torch.no_grad():
        m[0].weight.mul_(scale)
    return from_torch(m.eval(), torch.zeros(1, 20), frac_bits=16)


def _relu_bits(g: Graph) -> list[int | None]:
    return [n.attrs.get("int_bits") for n in g.nodes if n.op == "relu"]


def test_calibration_sets_bits_from_the_largest_value_plus_margin() -> None:
    g = _mlp()
    x = np.random.default_rng(0).normal(size=(64, 20))
    ranges = gate_ranges(g, x)
    cal = calibrate_ranges(g, x, margin_bits=3)
    expect = [max(1, int(np.floor(np.log2(m))) + 1) + 3 for m in ranges.values()]
    assert _relu_bits(cal) == expect
    assert _relu_bits(g) == [None, None]  # the input graph is not changed
    assert all(b < 15 for b in expect)
    # a layer with values above the default range gets more bits, not fewer
    big = calibrate_ranges(_mlp(scale=3000.0), x * 30, margin_bits=2)
    assert _relu_bits(big)[0] > 15
    assert _relu_bits(Graph.from_public_json(cal.public_json())) == expect  # the attribute survives the wire
    # powers of two: 2^int_bits must exceed the largest value itself
    tiny = calibrate_ranges(g, x, margin_bits=0)
    assert all(2 ** b > m for b, m in zip(_relu_bits(tiny), ranges.values()))


def test_calibrated_relus_are_cheaper_and_agree_with_plaintext() -> None:
    g = _mlp()
    rng = np.random.default_rng(1)
    x = rng.normal(size=(32, 20))
    cal = calibrate_ranges(g, x)
    sizes = []
    for graph in (g, cal):
        plan = compile_plan(graph, batch=8, n_parties=2)
        mb, rb = BundleBuilder(2), BundleBuilder(2)
        generate_request_material(plan, rb, {k: mb.random(f"{k}/B", s) for k, s in fixed_operand_shapes(graph).items()})
        sizes.append(sum(len(v) for v in rb.party_bundle(0).blobs.values()))
    assert sizes[1] < 0.75 * sizes[0]  # 27 -> at most 20 comparison bits per ReLU
    xt = torch.as_tensor(rng.normal(size=(8, 20)))
    out, _ = run_secure(cal, xt, 2)
    ref = evaluate(g, xt.numpy())
    assert np.abs(out["logits"].numpy() - ref).max() < 1e-3


def test_input_beyond_the_calibrated_range_breaks_the_relu_as_documented() -> None:
    g = _mlp()
    x = np.random.default_rng(2).normal(size=(32, 20))
    cal = calibrate_ranges(g, x, margin_bits=0)
    far = torch.as_tensor(x[:4] * 64)  # 64x the calibration inputs: beyond 2^int_bits
    out, _ = run_secure(cal, far, 2)
    assert np.abs(out["logits"].numpy() - evaluate(g, far.numpy())).max() > 1e-2
    wide, _ = run_secure(g, far, 2)  # the default range still holds it
    assert np.abs(wide["logits"].numpy() - evaluate(g, far.numpy())).max() < 1e-2


def test_bad_calibration_and_bad_int_bits_get_clear_errors() -> None:
    g = _mlp()
    with pytest.raises(InvalidArgumentError, match="empty"):
        calibrate_ranges(g, np.zeros((0, 20)))
    with pytest.raises(InvalidArgumentError, match="NaN"):
        calibrate_ranges(g, np.full((2, 20), np.nan))
    with pytest.raises(InvalidArgumentError, match="margin_bits"):
        calibrate_ranges(g, np.zeros((2, 20)), margin_bits=-1)
    bad = Graph.from_public_json(g.public_json())
    bad.nodes[1].attrs["int_bits"] = 0
    with pytest.raises(UnsupportedModelError, match="int_bits"):
        bad.validate()
    bad.nodes[1].attrs["int_bits"] = 31  # valid in the graph, too wide for a scale-32 input (ell 63)
    with pytest.raises(UnsupportedModelError, match="int_bits 31"):
        compile_plan(bad, batch=1, n_parties=2)  # refused at planning: deploy and the dealer's register
    with pytest.raises(InvalidArgumentError, match="integer bits"):
        calibrate_ranges(g, np.full((2, 20), 1e12))  # values beyond any ReLU gate at f = 16
    with pytest.raises(InvalidArgumentError, match="shape"):
        calibrate_ranges(g, np.zeros((2, 21)))
    with pytest.raises(InvalidArgumentError, match="margin_bits"):
        calibrate_ranges(g, np.zeros((2, 20)), margin_bits=True)


def test_three_parties_calibrated_bitwise_gate_has_fewer_rounds_and_bytes() -> None:
    from secureinfer.graph.validate import estimate_cost

    g = _mlp()
    rng = np.random.default_rng(4)
    cal = calibrate_ranges(g, rng.normal(size=(32, 20)))
    xt = torch.as_tensor(rng.normal(size=(4, 20)))
    out, rounds = run_secure(cal, xt, 3)  # asserts the measured rounds equal the plan's
    assert np.abs(out["logits"].numpy() - evaluate(g, xt.numpy())).max() < 1e-3
    assert rounds < compile_plan(g, batch=4, n_parties=3).rounds()
    est = {s.step: s.bytes_per_peer for s in estimate_cost(cal, batch=4, n_parties=3)}
    base = {s.step: s.bytes_per_peer for s in estimate_cost(g, batch=4, n_parties=3)}
    relus = [n.name for n in g.nodes if n.op == "relu"]
    assert all(est[r] < base[r] for r in relus)


def _cnn() -> torch.nn.Module:
    torch.manual_seed(5)
    return torch.nn.Sequential(torch.nn.Conv2d(1, 3, 3), torch.nn.ReLU(), torch.nn.MaxPool2d(2, padding=1),
                               torch.nn.Flatten(), torch.nn.Linear(3 * 3 * 3, 4)).eval()


def _offline_bytes(graph: Graph, batch: int) -> int:
    plan = compile_plan(graph, batch=batch, n_parties=2)
    mb, rb = BundleBuilder(2), BundleBuilder(2)
    generate_request_material(plan, rb, {k: mb.random(f"{k}/B", s) for k, s in fixed_operand_shapes(graph).items()})
    return sum(len(v) for v in rb.party_bundle(0).blobs.values())


def test_max_pools_are_calibrated_and_agree_with_plaintext() -> None:
    g = from_torch(_cnn(), torch.zeros(1, 1, 6, 6), frac_bits=16)
    rng = np.random.default_rng(4)
    x = rng.normal(size=(32, 1, 6, 6))
    cal = calibrate_ranges(g, x)
    # calibrated in the planner's order: the pool runs first and sees negative values
    assert [n.op for n in g.nodes][:3] == ["conv2d", "relu", "maxpool2d"]
    assert [n.op for n in cal.nodes][:3] == ["conv2d", "maxpool2d", "relu"]
    pool = next(n for n in cal.nodes if n.op == "maxpool2d")
    m = gate_ranges(cal, x)[pool.name]
    conv_out = evaluate(g, x, all_values=True)[g.nodes[0].name]
    assert m == np.abs(conv_out).max()  # the range of the conv output itself, not of its ReLU
    assert 2 ** (pool.attrs["int_bits"] - 3) > m >= 2 ** (pool.attrs["int_bits"] - 4)
    assert _offline_bytes(cal, 4) < 0.8 * _offline_bytes(g, 4)
    xt = torch.as_tensor(rng.normal(size=(4, 1, 6, 6)))  # padding: the pad value -2^int_bits is in range
    out, _ = run_secure(cal, xt, 2)
    assert np.abs(out["logits"].numpy() - evaluate(g, xt.numpy())).max() < 1e-3


def test_a_bad_max_pool_range_is_refused_at_planning() -> None:
    g = from_torch(_cnn(), torch.zeros(1, 1, 6, 6), frac_bits=16)
    nodes = [n if n.op != "maxpool2d" else type(n)(name=n.name, op=n.op, inputs=n.inputs,
                                                   attrs={**n.attrs, "int_bits": 60}) for n in g.nodes]
    bad = Graph(inputs=list(g.inputs), nodes=nodes, outputs=list(g.outputs), frac_bits=g.frac_bits,
                params=dict(g.params), param_shapes=dict(g.param_shapes))
    with pytest.raises(UnsupportedModelError, match="maxpool int_bits 60"):
        compile_plan(bad, batch=1, n_parties=2)
