"""Noise flooding against the Li–Micciancio attack, and client-side rounding.

Li and Micciancio (Eurocrypt 2021, "On the security of homomorphic encryption on
approximate numbers") recover a CKKS secret key from decryptions: a decrypted plaintext
m = Δ·y + e carries the evaluation error e, which is a known linear function of the key,
so whoever sees an exact decryption together with its ciphertext can solve for the key.

Mitigation used here (choice and cost):

* **Server-side flooding (option ``flood_sigma``).** Before returning a result the server
  adds a plaintext polynomial whose coefficients are *integers* drawn from a rounded
  Gaussian of width σ_c (from :class:`~secureinfer.prg.Prg`, AES-CTR; never numpy's
  generator). It is sampled in the slot domain: each slot gets independent real and
  imaginary parts N(0, σ²) with σ = ``flood_sigma`` in output units; the canonical
  embedding is √(N/2) times a unitary map, so the encoder turns this into iid coefficients
  N(0, σ_c²), σ_c = σ·Δ/√(N/2), rounded to integers. The evaluation error e is thereby
  hidden under noise 2^``flood_bits`` times larger, flood_bits = log2(σ / ε) for a
  result error ε (smudging; Li, Micciancio, Schultz & Sorrell, Crypto 2022 analyse how much
  is needed). It protects released decryptions against anyone but the server itself,
  which knows the noise it added.
* **Client-side rounding (always on when the server announces a grid).** The client
  rounds each decrypted value to the announced grid γ (a power of two ≥ 8σ), so what it
  releases is a function of y and the flooding noise only, not of the low-order bits of
  e; values far from a grid boundary round to the same number whatever e is.

Cost: one slot-vector encode + one plaintext addition per returned ciphertext (~2 ms at
N=8192), no extra level; the output precision drops from ε (~1e-5 here) to γ/2, e.g.
σ = 2^-12 gives γ = 2^-9 ≈ 0.002, well inside the 1e-2 logit tolerance.
"""

from __future__ import annotations

import math

import numpy as np

from secureinfer.errors import InvalidArgumentError
from secureinfer.prg import Prg

__all__ = ["flood_bits", "gaussian", "output_grid", "round_to_grid", "slot_noise"]


def gaussian(prg: Prg, n: int) -> np.ndarray:
    """n independent N(0, 1) samples by Box–Muller from the CSPRNG ``prg``."""
    m = (n + 1) // 2
    u = prg.uint64(2 * m)
    u1 = ((u[:m] >> np.uint64(11)).astype(np.float64) + 1.0) * 2.0 ** -53  # (0, 1]
    u2 = (u[m:] >> np.uint64(11)).astype(np.float64) * 2.0 ** -53  # [0, 1)
    r = np.sqrt(-2.0 * np.log(u1))
    z = np.concatenate([r * np.cos(2 * math.pi * u2), r * np.sin(2 * math.pi * u2)])
    return z[:n]


def slot_noise(prg: Prg, slots: int, sigma: float) -> list[complex]:
    """Complex slot noise whose encoding has iid integer Gaussian coefficients.

    Each slot: real and imaginary parts N(0, sigma^2) (output units).
    """
    if not sigma > 0 or not math.isfinite(sigma):
        raise InvalidArgumentError(f"flood sigma must be a positive finite number, got {sigma}")
    z = gaussian(prg, 2 * slots) * sigma
    return [complex(a, b) for a, b in zip(z[:slots], z[slots:])]


def output_grid(sigma: float) -> float:
    """The rounding grid a client uses for flooding noise ``sigma``: 2^ceil(log2(8 sigma))."""
    if sigma <= 0:
        return 0.0
    return float(2.0 ** math.ceil(math.log2(8.0 * sigma)))


def round_to_grid(y: np.ndarray, grid: float) -> np.ndarray:
    """Round to the nearest multiple of ``grid`` (no-op for grid <= 0)."""
    if grid <= 0:
        return np.asarray(y)
    return np.round(np.asarray(y) / grid) * grid


def flood_bits(sigma: float, error: float) -> float:
    """Bits by which flooding noise ``sigma`` exceeds a result error ``error``."""
    if sigma <= 0 or error <= 0:
        return 0.0
    return math.log2(sigma / error)
