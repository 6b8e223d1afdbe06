"""Differentially private outputs on a party: policy, noise share and budget debit.

A model deployed with DP parameters (``dp.epsilon``, ``dp.delta`` per released row,
``dp.clip`` the logit bound C, ``dp.budget_epsilon`` / ``dp.budget_delta`` per client,
optional ``dp.collusion_threshold`` t) releases only noisy logits:

1. before any MPC, each party debits the request's cost — B rows composed, each the
   Skellam mechanism's event plus the ring-overflow delta — from the client's budget in
   its own ledger (SQLite WAL, fsync'd). A request that would exceed it is refused with
   RESOURCE_EXHAUSTED on every party, before anything is computed or released. A debit
   is never refunded (a request that fails later has still cost its budget: the safe
   direction);
2. inside the MPC the logits are truncated to ``f`` bits and clipped to [-C, C]
   (comparison gates), so the L1/L2 sensitivity 2Cd / 4C^2 d holds;
3. each party adds its own share of Skellam noise drawn from its private CSPRNG; the sum
   over parties has the calibrated law even if t parties collude and remove theirs
   (Skellam is infinitely divisible: Skellam(mu/h) per party, h = n - t), so no single
   party knows the noise. Noise is on the fixed-point grid (units of 2^-f): integers only,
   no floating-point holes (Mironov 2012).

Budgets are per (client certificate name, model name).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from secureinfer.dp.accountant import PrivacyEvent, compose
from secureinfer.dp.mechanisms import SkellamMechanism, clip_sensitivity, draw_noise_share, release_event
from secureinfer.errors import InvalidArgumentError
from secureinfer.prg import Prg

__all__ = ["DpPolicy"]

_KEYS = ("dp.epsilon", "dp.delta", "dp.clip", "dp.budget_epsilon", "dp.budget_delta", "dp.collusion_threshold")


@dataclass(frozen=True)
class DpPolicy:
    epsilon: float
    delta: float
    clip: float
    budget_epsilon: float
    budget_delta: float
    frac_bits: int
    dim: int
    n_parties: int
    mechanism: SkellamMechanism

    @classmethod
    def from_parameters(cls, params: Mapping[str, str], *, frac_bits: int, dim: int, n_parties: int) -> "DpPolicy | None":
        if "dp.epsilon" not in params:
            return None
        unknown = [k for k in params if k.startswith("dp.") and k not in _KEYS]
        if unknown:
            raise InvalidArgumentError(f"unknown DP parameters {unknown}; known: {list(_KEYS)}")
        try:
            eps, delta, clip = float(params["dp.epsilon"]), float(params.get("dp.delta", "1e-6")), float(params["dp.clip"])
            beps = float(params.get("dp.budget_epsilon", "10"))
            bdelta = float(params.get("dp.budget_delta", "1e-4"))
            t = int(params["dp.collusion_threshold"]) if "dp.collusion_threshold" in params else None
        except (KeyError, ValueError) as exc:
            raise InvalidArgumentError(f"bad DP parameters: {exc}") from exc
        problems = []
        if not (math.isfinite(eps) and eps > 0):
            problems.append("dp.epsilon must be > 0")
        if not 0 < delta < 1:
            problems.append("dp.delta must be in (0, 1)")
        if not 0 < clip <= 2.0 ** 14:
            problems.append("dp.clip must be in (0, 16384]")
        if t is not None and not 0 <= t < n_parties:
            problems.append(f"dp.collusion_threshold must be in [0, {n_parties - 1}]")
        if problems:
            raise InvalidArgumentError("bad DP parameters: " + "; ".join(problems))
        l1, l2 = clip_sensitivity(clip_bound=cls._grid(clip, frac_bits), dim=dim)
        mech = SkellamMechanism.for_epsilon_delta(eps, delta, l1_sensitivity=l1, l2_sensitivity_sq=l2,
                                                  collusion_threshold=t)
        return cls(eps, delta, clip, beps, bdelta, frac_bits, dim, n_parties, mech)

    @staticmethod
    def _grid(clip: float, frac_bits: int) -> int:
        return int(math.ceil(clip * (1 << frac_bits)))

    def cost(self, rows: int) -> PrivacyEvent:
        """The privacy cost of releasing ``rows`` noisy output rows."""
        ev = release_event(self.mechanism, size=self.dim, value_bound=self._grid(self.clip, self.frac_bits),
                           n_parties=self.n_parties)
        return compose([ev] * rows)

    def noise_share(self, shape: tuple[int, ...]) -> torch.Tensor:
        """This party's noise share (int64 on the 2^-f grid) from a fresh private stream."""
        return torch.from_numpy(draw_noise_share(Prg.from_os(), self.mechanism, self.n_parties, shape))

    def describe(self) -> dict[str, str]:
        return {
            "dp.mechanism": "skellam (shares summed inside the MPC)", "dp.epsilon": f"{self.epsilon:g}",
            "dp.delta": f"{self.delta:g}", "dp.clip": f"{self.clip:g}", "dp.budget_epsilon": f"{self.budget_epsilon:g}",
            "dp.budget_delta": f"{self.budget_delta:g}", "dp.noise_mu": str(self.mechanism.mu),
            "dp.collusion_threshold": str(self.mechanism.collusion_threshold if self.mechanism.collusion_threshold is not None else self.n_parties - 1),
        }
