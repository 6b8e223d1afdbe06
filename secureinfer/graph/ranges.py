"""Calibrated comparison ranges: fewer DCF levels where a model's values are small.

Calibrated ops (:data:`CALIBRATED_OPS`): ReLU, and max pooling, whose tournament gates
compare differences of two values in the range (``int_bits + 1`` bits; the pool pads
with ``-2^int_bits``). Everything below says "ReLU"; it holds for both.

A ReLU gate (:func:`secureinfer.protocols.compare.gate`) compares on ``n = ell - cut``
bits, ``ell = scale + int_bits``, ``cut = scale - 12``. Its default ``int_bits = 15``
admits real magnitudes below 2^15 = 32768, which few layers approach: the ReLU inputs of
the benchmark MLP and LeNet stay below 2. Every comparison bit costs one DCF tree level:
one AES expansion per element for each party online, two for the dealer, and ``16 + 8k``
bytes of key per element (``k`` payload words). With ``int_bits = 4`` a ReLU on a
scale-32 input compares 16 bits instead of 27: 41% fewer levels, keys and AES calls.

Algorithm (:func:`calibrate_ranges`): run the plaintext float64 graph
(:func:`secureinfer.graph.passes.evaluate`) on the owner's calibration inputs, take the
largest magnitude ``M`` at each ReLU's input and set that node's ``int_bits`` to
``max(1, floor(log2 M) + 1) + margin_bits`` (so ``2^int_bits > 2^margin_bits M``), at
least ``min_int_bits``; more than ``max_int_bits`` (default ``62 - 2 f``, the widest gate
at the scale a linear layer hands a ReLU) is refused with an error naming the node.
Layers whose values exceed the default get *more* bits, so calibration also removes a
silent failure of the default.

Failure bound (stated, not probabilistic): the gate is exact for real inputs in
``[-2^int_bits, 2^int_bits - 2^-12)``, which holds every value up to ``2^margin_bits``
times the largest seen in calibration. An input outside it is compared on wrapped bits:
that ReLU output element is then 0 or the input itself, whichever the wrapped sign says. Choose ``margin_bits`` for the
inputs the model will meet (3 bits: 8x the calibration maximum).

Disclosure: ``int_bits`` is a public attribute of the graph (the dealer sizes the keys
with it), so the parties and the dealer learn ``floor(log2 M)`` of each ReLU input over
the calibration set — a coarse magnitude, nothing about any client's input. Clients can
infer the same from a request's costs (offline bytes, and rounds with the bitwise gate).
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from secureinfer.errors import InvalidArgumentError
from secureinfer.graph.ir import Graph
from secureinfer.graph.passes import evaluate, pool_before_relu

__all__ = ["CALIBRATED_OPS", "DEFAULT_MARGIN_BITS", "calibrate_ranges", "gate_ranges"]

#: headroom above the calibration maximum: inputs up to 8x larger stay in range
DEFAULT_MARGIN_BITS = 3
_MIN_INT_BITS = 1
#: ops whose comparison gates take a calibrated ``int_bits`` (the range of their input)
CALIBRATED_OPS = ("relu", "maxpool2d")


def gate_ranges(graph: Graph, calibration: np.ndarray) -> dict[str, float]:
    """Largest real magnitude at the input of every node in :data:`CALIBRATED_OPS`
    (ReLU, max pool) over ``calibration``."""
    try:
        x = np.asarray(calibration, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise InvalidArgumentError(f"calibration data is not a numeric array: {e}") from None
    if x.size == 0:
        raise InvalidArgumentError("calibration data is empty")
    if not np.isfinite(x).all():
        raise InvalidArgumentError("calibration data contains NaN or infinity")
    want = graph.input_spec().shape[1:]
    if x.ndim != len(want) + 1 or tuple(x.shape[1:]) != tuple(want):
        raise InvalidArgumentError(f"calibration data must have shape (N, {', '.join(map(str, want))}), "
                                   f"got {x.shape}")
    values = evaluate(graph, x, all_values=True)
    if not isinstance(values, dict):  # evaluate(all_values=True) returns every value
        raise TypeError("graph.passes.evaluate did not return every value")
    out = {}
    for n in graph.nodes:
        if n.op in CALIBRATED_OPS:
            v = values[n.inputs[0]]
            if not np.isfinite(v).all():
                raise InvalidArgumentError(f"node {n.name!r}: the model's values overflow on the calibration data")
            out[n.name] = float(np.abs(v).max(initial=0.0))
    return out


def calibrate_ranges(
    graph: Graph, calibration: np.ndarray, *, margin_bits: int = DEFAULT_MARGIN_BITS,
    min_int_bits: int = _MIN_INT_BITS, max_int_bits: int | None = None,
) -> Graph:
    """A copy of ``graph`` with ``int_bits`` set on every ReLU and max pool from ``calibration``.

    The copy has every ReLU that feeds only a max pool moved after it
    (:func:`~secureinfer.graph.passes.pool_before_relu`), as the planner would run it:
    the pool's range is then that of the ReLU's input, negative values included.

    ``max_int_bits`` defaults to ``62 - 2 * graph.frac_bits``. Cost: one plaintext
    float64 pass over ``calibration`` (N, *input shape).
    """
    if not isinstance(margin_bits, int) or isinstance(margin_bits, bool) or not 0 <= margin_bits <= 16:
        raise InvalidArgumentError(f"margin_bits must be an int in 0..16, got {margin_bits!r}")
    top = 62 - 2 * graph.frac_bits if max_int_bits is None else max_int_bits
    if not 1 <= min_int_bits <= top:
        raise InvalidArgumentError(f"int_bits bounds {min_int_bits}..{top} are empty")
    graph = pool_before_relu(graph)  # the order the planner runs: a pool before its ReLU sees x
    ranges = gate_ranges(graph, calibration)
    nodes = []
    for node in graph.nodes:
        if node.name in ranges:
            m = ranges[node.name]
            need = max(1, math.floor(math.log2(m)) + 1) if m > 0 else 1  # 2^need > m, strictly
            bits = max(min_int_bits, need + margin_bits)
            if bits > top:
                raise InvalidArgumentError(
                    f"node {node.name!r}: values up to {m:.3g} need {need} + {margin_bits} integer bits, "
                    f"more than the {top} a {node.op} gate has at {graph.frac_bits} fractional bits")
            node = replace(node, attrs={**node.attrs, "int_bits": int(bits)})
        nodes.append(node)
    return Graph(inputs=list(graph.inputs), nodes=nodes, outputs=list(graph.outputs), frac_bits=graph.frac_bits,
                 params=dict(graph.params), param_shapes=dict(graph.param_shapes), labels=graph.labels,
                 output_names=dict(graph.output_names))
