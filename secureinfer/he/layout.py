"""Ciphertext layout: how features and images sit in CKKS slots, and which rotations run.

Slot layout (S = N/2 slots, batch pack Bp a power of two, F = S / Bp feature positions)::

    slot = position * Bp + image        (image < Bp, position < F)

A feature vector of length n lives in ceil(n / F) ciphertexts; feature e of ciphertext c
sits at ``position``. With Bp = 1 one ciphertext holds one image's features (the
single-image layout of the TenSEAL tutorial); with Bp = S every slot is one image and each
ciphertext holds one feature of S images (the CryptoNets layout, Gilad-Bachrach et al.
2016); in between, groups of Bp slots hold one feature of Bp images. A rotation by k * Bp
slots moves every image's features by k positions at once (cyclically in F), so a linear
layer is a block matrix M (x) I_Bp and every image is computed in the same operations.

Linear layers use the diagonal method (Halevi & Shoup, Crypto 2014) per block of F x F
with baby-step giant-step: write the diagonal offset d = u * (g * n1 + h) with unit u,
then for each output ciphertext J::

    y_J = sum_g rot_{g n1 u}( sum_{I, h} rot_{-g n1 u}(diag_{d}(M_JI)) * rot_{h u}(x_I) )

The inner plaintexts are pre-rotated on the server. Baby rotations rot_{h u}(x_I) are
computed by repeated rotation by u, and the outer sum by Horner's rule with rotation by
n1 u, so every linear layer needs only the two Galois keys {u Bp, n1 u Bp}. Output
positions are shifted (``shift``) so that the used offsets form one short arc [0, T u);
u is the gcd of the offsets (e.g. the window count for the im2col convolution, whose
diagonals are multiples of it). n1 minimises the rotation count
sum_I min(n1 - 1, max_h) + sum_J floor(max_t / n1).

Cost of one linear layer: sum_I (baby rotations) + sum_J (giant rotations) key switches,
one plaintext multiplication per distinct (J, I, offset), one rescale per output
ciphertext. Square and affine layers cost one operation per ciphertext.

The plan is a pure function of the public architecture, N and Bp (it is computed from
:func:`~secureinfer.he.lower.lower` with ``structural=True``), so the client derives the
same Galois steps and the same input/output placement as the server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from secureinfer.errors import InvalidArgumentError
from secureinfer.he.lower import AffineStep, LinearStep, Program, SquareStep

__all__ = ["LayoutPlan", "LinearPlan", "Placement", "plan_layout"]

# Rough per-operation costs (ms at N=8192, one core) to choose between layouts.
_COST_ROTATION = 10.0
_COST_INPUT_CT = 20.0
_COST_PT_MULT = 1.5
_COST_SQUARE = 15.0


@dataclass(frozen=True)
class Placement:
    """Where each feature of a vector sits: ciphertext index and slot position."""

    ct: np.ndarray  # int64 per feature
    pos: np.ndarray  # int64 per feature, in [0, F)
    n_ct: int

    @classmethod
    def sequential(cls, n: int, f: int) -> Placement:
        e = np.arange(n, dtype=np.int64)
        return cls(e // f, e % f, int(math.ceil(n / f)) if n else 0)


@dataclass
class LinearPlan:
    """Schedule of one linear step (see the module docstring)."""

    use_expanded: bool
    rows: np.ndarray  # structural non-zeros: output feature
    cols: np.ndarray  # input feature (im2col feature if use_expanded)
    out_ct: np.ndarray  # per entry
    in_ct: np.ndarray
    g: np.ndarray
    h: np.ndarray
    out_pos: np.ndarray  # per entry: output position of rows
    unit: int
    n1: int
    baby_max: np.ndarray  # per input ciphertext
    giant_max: np.ndarray  # per output ciphertext
    output: Placement

    @property
    def rotations(self) -> int:
        return int(self.baby_max.sum() + self.giant_max.sum())

    def galois_positions(self) -> set[int]:
        """Rotation amounts in feature positions (multiply by Bp for slots)."""
        steps = set()
        if np.any(self.baby_max > 0):
            steps.add(self.unit)
        if np.any(self.giant_max > 0):
            steps.add(self.n1 * self.unit)
        return steps

    @property
    def n_groups(self) -> int:
        t = self.g.astype(np.int64) * self.n1 + self.h
        key = (self.out_ct.astype(np.int64) * (int(self.in_ct.max(initial=0)) + 1) + self.in_ct) * (int(t.max(initial=0)) + 1) + t
        return int(np.unique(key).size)


@dataclass
class LayoutPlan:
    """Layout of a whole program for slot count ``slots`` and batch pack ``bp``."""

    slots: int
    bp: int
    im2col: bool
    input: Placement  # of the (possibly im2col-expanded) input features
    steps: list[LinearPlan | None]  # one per program step; None for square / affine
    output: Placement
    cost_ms: float = 0.0
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def features_per_ct(self) -> int:
        return self.slots // self.bp

    def galois_steps(self) -> list[int]:
        """Slot rotation steps the evaluation keys must cover (sorted)."""
        pos: set[int] = set()
        for s in self.steps:
            if s is not None:
                pos |= s.galois_positions()
        return sorted({(p * self.bp) % self.slots for p in pos} - {0})

    @property
    def rotations(self) -> int:
        return sum(s.rotations for s in self.steps if s is not None)


def _arc(d0: np.ndarray, f: int) -> tuple[int, int, np.ndarray]:
    """(unit, shift, t) with (d0 - shift) mod f == t * unit and t in one short range [0, T)."""
    uniq = np.unique(d0)
    if uniq.size == 1:
        return f, int(uniq[0]), np.zeros(d0.shape, dtype=np.int64)
    diffs = (uniq - uniq[0]) % f
    unit = int(np.gcd.reduce(np.append(diffs, f)))
    k = f // unit
    tr = np.sort(diffs // unit)
    gaps = np.diff(np.append(tr, tr[0] + k))
    start = int(tr[(int(np.argmax(gaps)) + 1) % tr.size])
    shift = int((uniq[0] + start * unit) % f)
    return unit, shift, ((d0 - shift) % f) // unit


def _plan_linear(step: LinearStep, inp: Placement, f: int, *, use_expanded: bool) -> LinearPlan:
    mat = (step.expanded if use_expanded else step.matrix).tocoo()
    rows, cols = mat.row.astype(np.int64), mat.col.astype(np.int64)
    m = step.out_size
    base = np.arange(m, dtype=np.int64) % f
    out_ct_all = np.arange(m, dtype=np.int64) // f
    d0 = (inp.pos[cols] - base[rows]) % f
    unit, shift, t = _arc(d0, f)
    out_ct, in_ct = out_ct_all[rows], inp.ct[cols]
    n_in, n_out = inp.n_ct, int(math.ceil(m / f))
    tmax_in = np.zeros(n_in, dtype=np.int64)
    np.maximum.at(tmax_in, in_ct, t)
    tmax_out = np.zeros(n_out, dtype=np.int64)
    np.maximum.at(tmax_out, out_ct, t)
    big_t = int(t.max(initial=0)) + 1
    best, best_cost = 1, None
    for n1 in range(1, big_t + 1):
        cost = int(np.minimum(n1 - 1, tmax_in).sum() + (tmax_out // n1).sum())
        if best_cost is None or cost < best_cost:
            best, best_cost = n1, cost
    g, h = np.divmod(t, best)
    baby = np.zeros(n_in, dtype=np.int64)
    np.maximum.at(baby, in_ct, h)
    giant = np.zeros(n_out, dtype=np.int64)
    np.maximum.at(giant, out_ct, g)
    out_pos_feat = (base + shift) % f
    return LinearPlan(use_expanded, rows, cols, out_ct, in_ct, g, h, out_pos_feat[rows], unit, best, baby, giant,
                      Placement(out_ct_all, out_pos_feat, n_out))


def _plan(program: Program, slots: int, bp: int, im2col: bool) -> LayoutPlan:
    f = slots // bp
    n_feat = program.gather.size if im2col and program.gather is not None else program.input_size
    place = Placement.sequential(n_feat, f)
    inp = place
    plans: list[LinearPlan | None] = []
    cost = inp.n_ct * _COST_INPUT_CT
    for k, step in enumerate(program.steps):
        if isinstance(step, LinearStep):
            lp = _plan_linear(step, place, f, use_expanded=(k == 0 and im2col))
            plans.append(lp)
            cost += lp.rotations * _COST_ROTATION + lp.n_groups * _COST_PT_MULT
            place = lp.output
        else:
            plans.append(None)
            if isinstance(step, SquareStep) or (isinstance(step, AffineStep) and not step.unit_scale):
                cost += place.n_ct * (_COST_SQUARE if isinstance(step, SquareStep) else _COST_PT_MULT)
    return LayoutPlan(slots=slots, bp=bp, im2col=im2col, input=inp, steps=plans, output=place, cost_ms=cost)


def plan_layout(program: Program, *, slots: int, bp: int) -> LayoutPlan:
    """The cheaper of the raw and (if the model starts with a conv) im2col input layouts."""
    if bp < 1 or bp > slots or bp & (bp - 1) or slots & (slots - 1):
        raise InvalidArgumentError(f"batch pack must be a power of two in [1, {slots}], got {bp}")
    candidates = [_plan(program, slots, bp, im2col=False)]
    if program.gather is not None:
        candidates.append(_plan(program, slots, bp, im2col=True))
    return min(candidates, key=lambda p: (p.cost_ms, p.im2col))
