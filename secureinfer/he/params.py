"""CKKS parameter selection from a model's multiplicative depth, at 128-bit security.

A CKKS context is (N, q_0 ... q_D, P, Δ): ring degree N (N/2 complex slots), a chain of
coefficient primes and the scale Δ = 2^scale_bits. Every rescale (after a plaintext or
ciphertext multiplication) drops one prime q_i ≈ Δ, so a model of depth D needs D such
primes; q_0 keeps the result, so it must hold |output| * Δ < q_0 / 2, i.e.
``q0_bits >= scale_bits + log2(output_bound) + 1``. P is the special prime used only in
key switching (relinearisation and rotations); its noise term is ≈ q_max / P, so
``P`` is chosen a few bits above every other prime.

Security: the total log2(q_0 ... q_D · P) must not exceed the bound of the Homomorphic
Encryption Standard (Albrecht et al., 2018, table for ternary secrets, classical 128-bit
security), which SEAL also enforces (``sec_level_type::tc128``)::

    N      1024  2048  4096  8192  16384  32768
    bits     27    54   109   218    438    881

Selection (:func:`select_params`): for N = 4096, 8192, 16384, 32768 (in that order) take
the largest ``scale_bits`` in [min_scale_bits, max_scale_bits] whose chain
``[q0, scale_bits x D, P]`` fits the bound; the first N that admits one wins (a smaller
N is ~2-4x faster per operation and has N/2 slots). :func:`check_params` is the check both
the client (before sending anything) and the server (when a session opens) apply.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from secureinfer.errors import InvalidArgumentError

__all__ = [
    "MAX_COEFF_BITS_128",
    "CkksParams",
    "check_params",
    "select_params",
]

#: Homomorphic Encryption Standard, ternary secret, 128-bit classical security.
MAX_COEFF_BITS_128: dict[int, int] = {1024: 27, 2048: 54, 4096: 109, 8192: 218, 16384: 438, 32768: 881}
_MAX_PRIME_BITS = 60  # SEAL's limit on one coefficient prime
_SPECIAL_MARGIN_BITS = 6  # P above the largest data prime: key-switch noise ≈ 2^-6 of a unit


@dataclass(frozen=True)
class CkksParams:
    """One CKKS parameter set: ``coeff_mod_bit_sizes`` = [q0, q1..qD, P]."""

    poly_modulus_degree: int
    coeff_mod_bit_sizes: tuple[int, ...]
    scale_bits: int

    @property
    def depth(self) -> int:
        """Rescales available (= multiplications the chain supports)."""
        return len(self.coeff_mod_bit_sizes) - 2

    @property
    def slots(self) -> int:
        return self.poly_modulus_degree // 2

    @property
    def total_bits(self) -> int:
        return sum(self.coeff_mod_bit_sizes)

    @property
    def headroom_bits(self) -> int:
        """log2 of the largest |output| the last prime can hold (minus one sign bit)."""
        return self.coeff_mod_bit_sizes[0] - self.scale_bits - 1

    def security_ok(self) -> bool:
        bound = MAX_COEFF_BITS_128.get(self.poly_modulus_degree)
        return bound is not None and self.total_bits <= bound

    def describe(self) -> str:
        return (f"N={self.poly_modulus_degree}, coeff_mod_bit_sizes={list(self.coeff_mod_bit_sizes)} "
                f"({self.total_bits} bits), scale 2^{self.scale_bits}, depth {self.depth}")

    def to_dict(self) -> dict[str, object]:
        return {"poly_modulus_degree": self.poly_modulus_degree,
                "coeff_mod_bit_sizes": list(self.coeff_mod_bit_sizes), "scale_bits": self.scale_bits}


def _output_bits(output_bound: float) -> int:
    if not output_bound > 0 or not math.isfinite(output_bound):
        raise InvalidArgumentError(f"output_bound must be a positive finite number, got {output_bound}")
    return max(1, math.ceil(math.log2(output_bound)))


def _chain(depth: int, scale_bits: int, out_bits: int) -> tuple[int, ...]:
    q0 = scale_bits + out_bits + 2  # sign bit + one bit of margin
    special = max(q0, scale_bits) + _SPECIAL_MARGIN_BITS
    return (q0, *([scale_bits] * depth), special)


def select_params(
    depth: int,
    *,
    output_bound: float = 256.0,
    min_scale_bits: int = 25,
    max_scale_bits: int = 40,
    min_poly_modulus_degree: int = 4096,
) -> CkksParams:
    """Smallest 128-bit-secure parameters for ``depth`` rescales and |output| <= bound.

    Raises InvalidArgumentError if even N=32768 cannot hold ``depth`` levels at
    ``min_scale_bits`` (about depth 24).
    """
    if depth < 0:
        raise InvalidArgumentError(f"depth must be >= 0, got {depth}")
    out_bits = _output_bits(output_bound)
    for n in sorted(MAX_COEFF_BITS_128):
        if n < min_poly_modulus_degree:
            continue
        for s in range(max_scale_bits, min_scale_bits - 1, -1):
            chain = _chain(depth, s, out_bits)
            if max(chain) > _MAX_PRIME_BITS or s < math.log2(2 * n) + 2:
                continue
            if sum(chain) <= MAX_COEFF_BITS_128[n]:
                return CkksParams(n, chain, s)
    raise InvalidArgumentError(
        f"no 128-bit-secure CKKS parameters hold depth {depth} with scale >= 2^{min_scale_bits} "
        f"and |output| <= {output_bound:g} (N up to 32768 allows {MAX_COEFF_BITS_128[32768]} bits)"
    )


def check_params(params: CkksParams, *, depth: int, output_bound: float | None = None) -> None:
    """Refuse parameters that cannot run a model of ``depth`` (or are not 128-bit secure).

    The message names what the model needs and what the parameters allow, so a user can
    pick bigger parameters (or let :func:`select_params` do it).
    """
    problems: list[str] = []
    if not params.security_ok():
        bound = MAX_COEFF_BITS_128.get(params.poly_modulus_degree)
        problems.append(
            f"{params.total_bits} coefficient-modulus bits at N={params.poly_modulus_degree} exceed the "
            f"128-bit security bound ({bound if bound is not None else 'N not in the standard table'})"
        )
    if params.depth < depth:
        problems.append(f"the model needs {depth} rescaling levels but the parameters allow {params.depth}")
    if output_bound is not None and params.headroom_bits < _output_bits(output_bound):
        problems.append(
            f"outputs up to {output_bound:g} need q0 >= scale + {_output_bits(output_bound) + 1} bits; "
            f"q0 is {params.coeff_mod_bit_sizes[0]} bits at scale 2^{params.scale_bits}"
        )
    if problems:
        raise InvalidArgumentError(
            f"CKKS parameters ({params.describe()}) cannot run this model: " + "; ".join(problems)
        )
