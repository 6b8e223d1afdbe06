"""Server-side CKKS evaluation of a lowered model on ciphertexts in a planned layout.

:class:`Evaluator` runs a :class:`~secureinfer.he.lower.Program` (with the real weights)
in a :class:`~secureinfer.he.layout.LayoutPlan` on SEAL ciphertexts, using only the
client's public evaluation keys (relinearisation, and Galois keys for the plan's steps):

* linear step — baby-step giant-step diagonal method (see :mod:`secureinfer.he.layout`):
  plaintext diagonals are encoded at the input's level with scale q_l (the prime the
  following rescale drops), so the ciphertext scale is unchanged after the rescale; a
  diagonal that is constant over all slots (always the case when Bp = S) is encoded as a
  scalar, which is ~100x cheaper to encode; the bias is added after the rescale;
* square — ciphertext product, relinearisation, rescale;
* affine — plaintext product + rescale (skipped when the scale is 1), then add the shift.

Encoded weight plaintexts are cached per (layout, level) in a byte-bounded LRU
(:class:`PlaintextCache`), because encoding a full slot vector (an inverse FFT and N*L
NTT coefficients) costs more than the multiplication that uses it.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from secureinfer.errors import InvalidArgumentError, ProtocolError
from secureinfer.he.layout import LayoutPlan, LinearPlan
from secureinfer.he.lower import AffineStep, LinearStep, Program, SquareStep

__all__ = ["Evaluator", "PlaintextCache"]


class PlaintextCache:
    """LRU of encoded plaintext lists, bounded by total bytes (N * primes * 8 each)."""

    def __init__(self, max_bytes: int = 512 * 1024 * 1024) -> None:
        self.max_bytes = int(max_bytes)
        self._items: OrderedDict[Any, tuple[list[Any], int]] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Any) -> list[Any] | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                return None
            self._items.move_to_end(key)
            return item[0]

    def put(self, key: Any, value: list[Any], nbytes: int) -> None:
        if nbytes > self.max_bytes:
            return
        with self._lock:
            if key in self._items:
                return
            self._items[key] = (value, nbytes)
            self._bytes += nbytes
            while self._bytes > self.max_bytes and self._items:
                _, (_, n) = self._items.popitem(last=False)
                self._bytes -= n

    @property
    def nbytes(self) -> int:
        return self._bytes


class _Groups:
    """A linear plan's entries grouped by (out ct, giant step) -> [(in ct, baby, values)]."""

    def __init__(self, lp: LinearPlan, matrix: Any, f: int) -> None:
        vals = np.asarray(matrix.tocsr()[lp.rows, lp.cols]).ravel() if lp.rows.size else np.zeros(0)
        n1u = lp.n1 * lp.unit
        pos = (lp.out_pos + lp.g * n1u) % f  # pre-rotation by -g*n1*u (see layout docstring)
        key = np.stack([lp.out_ct, lp.g, lp.in_ct, lp.h], axis=1)
        uniq, inv = np.unique(key, axis=0, return_inverse=True)
        inv = inv.reshape(-1)
        vec = np.zeros((uniq.shape[0], f))
        vec[inv, pos] = vals
        self.keys = [tuple(int(v) for v in row) for row in uniq]
        self.vectors = vec


class Evaluator:
    """Evaluate one program in one layout with one session's keys."""

    def __init__(self, *, program: Program, plan: LayoutPlan, seal_context: Any, relin_keys: Any,
                 galois_keys: Any, cache: PlaintextCache | None = None, cache_key: Any = None) -> None:
        import tenseal.sealapi as sa

        if len(plan.steps) != len(program.steps):
            raise ProtocolError("layout plan does not match the program")
        self.program, self.plan = program, plan
        self._sa = sa
        self._seal = seal_context
        self._ev = sa.Evaluator(seal_context)
        self._enc = sa.CKKSEncoder(seal_context)
        self._relin, self._galois = relin_keys, galois_keys
        self._cache = cache
        self._cache_key = cache_key
        self._groups: dict[int, _Groups] = {}
        self.ops = {"rotations": 0, "pt_mults": 0, "ct_mults": 0, "rescales": 0}

    # ------------------------------------------------------------------ helpers

    def _last_prime(self, parms_id: Any) -> float:
        data = self._seal.get_context_data(parms_id)
        return float(data.parms().coeff_modulus()[-1].value())

    def _encode(self, values: np.ndarray | float, parms_id: Any, scale: float) -> Any:
        pt = self._sa.Plaintext()
        if np.isscalar(values):
            self._enc.encode(float(values), parms_id, scale, pt)
        else:
            self._enc.encode(np.asarray(values, dtype=np.float64).tolist(), parms_id, scale, pt)
        return pt

    def _slot_vector(self, feature_vec: np.ndarray) -> np.ndarray | float:
        if feature_vec.size and np.all(feature_vec == feature_vec[0]):
            return float(feature_vec[0])
        return np.repeat(feature_vec, self.plan.bp)

    def _rotate(self, ct: Any, positions: int) -> Any:
        out = self._sa.Ciphertext()
        steps = (positions * self.plan.bp) % self.plan.slots
        self._ev.rotate_vector(ct, steps, self._galois, out)
        self.ops["rotations"] += 1
        return out

    def _rescale(self, ct: Any) -> Any:
        self._ev.rescale_to_next_inplace(ct)
        self.ops["rescales"] += 1
        return ct

    def _add_vector(self, ct: Any, features: np.ndarray) -> Any:
        if np.any(features):
            self._ev.add_plain_inplace(ct, self._encode(self._slot_vector(features), ct.parms_id(), ct.scale))
        return ct

    def _features(self, placement_ct: np.ndarray, placement_pos: np.ndarray, values: np.ndarray, ct: int) -> np.ndarray:
        f = self.plan.features_per_ct
        vec = np.zeros(f)
        sel = placement_ct == ct
        vec[placement_pos[sel]] = values[sel]
        return vec

    # ------------------------------------------------------------------ steps

    def _linear(self, k: int, step: LinearStep, lp: LinearPlan, cts: list[Any],
                check: Callable[[], None]) -> list[Any]:
        f = self.plan.features_per_ct
        groups = self._groups.get(k)
        if groups is None:
            groups = _Groups(lp, step.expanded if lp.use_expanded else step.matrix, f)
            self._groups[k] = groups
        parms_id = cts[0].parms_id()
        q = self._last_prime(parms_id)
        pts = self._plaintexts(k, groups, parms_id, q)
        babies: list[list[Any]] = []
        for i, ct in enumerate(cts):
            row = [ct]
            for _ in range(int(lp.baby_max[i]) if i < lp.baby_max.size else 0):
                row.append(self._rotate(row[-1], lp.unit))
            babies.append(row)
        by_out: dict[int, dict[int, list[int]]] = {}
        for gi, (j, g, _i, _h) in enumerate(groups.keys):
            by_out.setdefault(j, {}).setdefault(g, []).append(gi)
        out = []
        for j in range(lp.output.n_ct):
            check()
            acc = None
            for g in range(int(lp.giant_max[j]), -1, -1):
                s = None
                for gi in by_out.get(j, {}).get(g, []):
                    pt = pts[gi]
                    if pt is None:
                        continue
                    if isinstance(pt, float):
                        pt = self._encode(pt, parms_id, q)
                    _j, _g, i, h = groups.keys[gi]
                    prod = self._sa.Ciphertext()
                    self._ev.multiply_plain(babies[i][h], pt, prod)
                    self.ops["pt_mults"] += 1
                    if s is None:
                        s = prod
                    else:
                        self._ev.add_inplace(s, prod)
                if acc is not None:
                    acc = self._rotate(acc, lp.n1 * lp.unit)
                    if s is not None:
                        self._ev.add_inplace(acc, s)
                else:
                    acc = s
            if acc is None:  # every weight of this block is zero: multiply by one unit
                acc = self._sa.Ciphertext()
                self._ev.multiply_plain(cts[0], self._encode(1.0 / q, parms_id, q), acc)
            self._rescale(acc)
            bias = self._features(lp.output.ct, lp.output.pos, step.bias, j)
            out.append(self._add_vector(acc, bias))
        return out

    def _plaintexts(self, k: int, groups: _Groups, parms_id: Any, q: float) -> list[Any]:
        """Encoded diagonals: a Plaintext, a float (constant diagonal, encoded when used,
        never stored: a scalar plaintext is as large as any other) or None (all zero)."""
        key = (self._cache_key, self.plan.bp, self.plan.im2col, k, tuple(parms_id))
        cached = self._cache.get(key) if self._cache is not None else None
        if cached is not None:
            return cached
        pts: list[Any] = []
        nbytes = 0
        n_primes = len(self._seal.get_context_data(parms_id).parms().coeff_modulus())
        for vec in groups.vectors:
            if not np.any(vec):
                pts.append(None)
                continue
            sv = self._slot_vector(vec)
            if isinstance(sv, float):
                pts.append(sv)
            else:
                pts.append(self._encode(sv, parms_id, q))
                nbytes += self.plan.slots * 2 * n_primes * 8
        if self._cache is not None:
            self._cache.put(key, pts, nbytes)
        return pts

    def _square(self, cts: list[Any]) -> list[Any]:
        out = []
        for ct in cts:
            sq = self._sa.Ciphertext()
            self._ev.square(ct, sq)
            self._ev.relinearize_inplace(sq, self._relin)
            self.ops["ct_mults"] += 1
            out.append(self._rescale(sq))
        return out

    def _affine(self, step: AffineStep, place_ct: np.ndarray, place_pos: np.ndarray, cts: list[Any]) -> list[Any]:
        out = []
        for j, ct in enumerate(cts):
            if not step.unit_scale:
                q = self._last_prime(ct.parms_id())
                a = self._features(place_ct, place_pos, step.scale, j)
                res = self._sa.Ciphertext()
                self._ev.multiply_plain(ct, self._encode(self._slot_vector(a), ct.parms_id(), q), res)
                self.ops["pt_mults"] += 1
                ct = self._rescale(res)
            out.append(self._add_vector(ct, self._features(place_ct, place_pos, step.shift, j)))
        return out

    def flood(self, cts: Sequence[Any], *, sigma: float, prg: Any) -> list[Any]:
        """Add integer-coefficient Gaussian noise (slot std ``sigma``) to each ciphertext.

        See :mod:`secureinfer.he.flooding`; ``prg`` is a :class:`~secureinfer.prg.Prg`.
        """
        from secureinfer.he.flooding import slot_noise

        out = []
        for ct in cts:
            pt = self._sa.Plaintext()
            self._enc.encode(slot_noise(prg, self.plan.slots, sigma), ct.parms_id(), ct.scale, pt)
            self._ev.add_plain_inplace(ct, pt)
            out.append(ct)
        return out

    # ------------------------------------------------------------------ run

    def run(self, cts: Sequence[Any], *, check: Callable[[], None] = lambda: None) -> list[Any]:
        """Evaluate on input ciphertexts (the plan's input placement); return outputs.

        ``check`` is called between steps and output blocks; it may raise to abort (e.g.
        when the RPC was cancelled or its deadline passed).
        """
        cur = list(cts)
        if len(cur) != self.plan.input.n_ct:
            raise InvalidArgumentError(f"expected {self.plan.input.n_ct} input ciphertexts, got {len(cur)}")
        place_ct, place_pos = self.plan.input.ct, self.plan.input.pos
        for k, step in enumerate(self.program.steps):
            check()
            lp = self.plan.steps[k]
            if isinstance(step, LinearStep):
                if lp is None:
                    raise ProtocolError(f"step {k} is linear but the plan has no schedule for it")
                cur = self._linear(k, step, lp, cur, check)
                place_ct, place_pos = lp.output.ct, lp.output.pos
            elif isinstance(step, SquareStep):
                cur = self._square(cur)
            elif isinstance(step, AffineStep):
                cur = self._affine(step, place_ct, place_pos, cur)
        return cur
