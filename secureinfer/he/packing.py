"""Client-side packing of a batch of inputs into CKKS slot vectors, and unpacking outputs.

Layout (see :mod:`secureinfer.he.layout`): ``slot = position * Bp + image``. For the
im2col input encoding the client first expands each image into kernel-window features
(``program.gather``: input index per feature, -1 for zero padding); the expansion is a
public function of the first layer's geometry, so it reveals nothing about the input.

Cost: O(B * n_features) numpy work; no cryptography here.
"""

from __future__ import annotations

import numpy as np

from secureinfer.errors import InvalidArgumentError, RangeError, ShapeError
from secureinfer.he.layout import LayoutPlan, Placement
from secureinfer.he.lower import Program

__all__ = ["pack_inputs", "unpack_outputs"]


def pack_inputs(program: Program, plan: LayoutPlan, x: np.ndarray) -> list[np.ndarray]:
    """(B, input_size) float batch, B <= Bp -> one slot vector per input ciphertext."""
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or x.shape[1] != program.input_size:
        raise ShapeError(f"expected a (batch, {program.input_size}) input, got shape {x.shape}")
    b = x.shape[0]
    if not 1 <= b <= plan.bp:
        raise InvalidArgumentError(f"batch {b} does not fit batch pack {plan.bp}")
    if not np.all(np.isfinite(x)):
        raise RangeError("input contains NaN or infinity")
    if plan.im2col:
        if program.gather is None:
            raise InvalidArgumentError("the plan uses im2col but the program has no gather")
        g = program.gather
        feats = np.where(g[None, :] >= 0, x[:, np.maximum(g, 0)], 0.0)
    else:
        feats = x
    return _scatter(plan, plan.input, feats)


def _scatter(plan: LayoutPlan, place: Placement, feats: np.ndarray) -> list[np.ndarray]:
    f, bp = plan.features_per_ct, plan.bp
    b = feats.shape[0]
    out = np.zeros((place.n_ct, f, bp))
    out[place.ct[:, None], place.pos[:, None], np.arange(b)[None, :]] = feats.T
    return [v.reshape(-1) for v in out]


def unpack_outputs(plan: LayoutPlan, slot_vectors: list[np.ndarray], batch: int) -> np.ndarray:
    """Decrypted output slot vectors -> (batch, n_outputs)."""
    place = plan.output
    if len(slot_vectors) != place.n_ct:
        raise InvalidArgumentError(f"expected {place.n_ct} output ciphertexts, got {len(slot_vectors)}")
    f, bp = plan.features_per_ct, plan.bp
    arr = np.stack([np.asarray(v, dtype=np.float64)[: f * bp].reshape(f, bp) for v in slot_vectors])
    return arr[place.ct[:, None], place.pos[:, None], np.arange(batch)[None, :]].T.copy()
