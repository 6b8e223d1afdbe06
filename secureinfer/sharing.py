"""Additive secret sharing over Z_2^64 for n >= 2 parties.

A secret ``x`` (an ``int64`` ring tensor) is split as ``x = x_0 + x_1 + ... + x_{n-1}``
(mod 2^64) with ``x_1..x_{n-1}`` uniform from the CSPRNG; any ``n - 1`` shares are
independent of ``x``. Addition of shares, and addition or multiplication by public
values, is local; everything else is a protocol in :mod:`secureinfer.protocols`.

Public constants are added by party 0 alone (:func:`add_public`).

:func:`share_seeded` gives parties ``1..n-1`` their uniform shares as 32-byte seeds of the
CSPRNG instead of tensors (``x_i = Prg(seed_i).ring(shape)``): each is as random as a
drawn tensor, and the sender uploads one tensor instead of ``n``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from secureinfer.prg import SEED_BYTES, Prg

__all__ = ["add_public", "expand_share", "reconstruct", "share", "share_seeded"]


def expand_share(seed: bytes, shape: tuple[int, ...] | torch.Size, *, device: str | torch.device = "cpu") -> torch.Tensor:
    """The share a seed stands for: ``Prg(seed).ring(shape)`` (AES-256-CTR, zero nonce)."""
    return Prg(seed).ring(tuple(shape), device=device)


def share_seeded(x: torch.Tensor, n_parties: int, *, prg: Prg) -> tuple[torch.Tensor, list[bytes]]:
    """Split ring tensor ``x`` into party 0's share and ``n_parties - 1`` fresh seeds.

    Party ``i >= 1`` holds ``expand_share(seeds[i-1], x.shape)``; party 0 holds ``x`` minus
    their sum. Cost: ``n - 1`` PRG tensors, as :func:`share`.
    """
    first, seeds, _ = _split(x, n_parties, prg)
    return first, seeds


def share(x: torch.Tensor, n_parties: int, *, prg: Prg) -> list[torch.Tensor]:
    """Split ring tensor ``x`` into ``n_parties`` additive shares (cost: n-1 PRG tensors)."""
    first, _, rand = _split(x, n_parties, prg)
    return [first, *rand]


def _split(x: torch.Tensor, n_parties: int, prg: Prg) -> tuple[torch.Tensor, list[bytes], list[torch.Tensor]]:
    if n_parties < 2:
        raise ValueError("secret sharing needs at least two parties")
    if x.dtype != torch.int64:
        raise TypeError("shares live in Z_2^64: encode the tensor to int64 first")
    seeds = [prg.bytes(SEED_BYTES) for _ in range(n_parties - 1)]
    rand = [expand_share(seed, x.shape, device=x.device) for seed in seeds]
    first = x.clone()
    for r in rand:
        first -= r
    return first, seeds, rand


def reconstruct(shares: Sequence[torch.Tensor]) -> torch.Tensor:
    """Sum of the shares mod 2^64."""
    if not shares:
        raise ValueError("no shares to reconstruct")
    out = shares[0].clone()
    for s in shares[1:]:
        if s.shape != out.shape:
            raise ValueError(f"share shapes differ: {tuple(s.shape)} vs {tuple(out.shape)}")
        out += s
    return out


def add_public(x_share: torch.Tensor, value: torch.Tensor | int, *, party_id: int) -> torch.Tensor:
    """Share of ``x + value`` for public ``value``: only party 0 adds it."""
    return x_share + value if party_id == 0 else x_share.clone()
