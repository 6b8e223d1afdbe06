"""Additive secret sharing over Z_2^64 for n >= 2 parties.

A secret ``x`` (an ``int64`` ring tensor) is split as ``x = x_0 + x_1 + ... + x_{n-1}``
(mod 2^64) with ``x_1..x_{n-1}`` uniform from the CSPRNG; any ``n - 1`` shares are
independent of ``x``. Addition of shares, and addition or multiplication by public
values, is local; everything else is a protocol in :mod:`secureinfer.protocols`.

Public constants are added by party 0 alone (:func:`add_public`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from secureinfer.prg import Prg

__all__ = ["add_public", "reconstruct", "share"]


def share(x: torch.Tensor, n_parties: int, *, prg: Prg) -> list[torch.Tensor]:
    """Split ring tensor ``x`` into ``n_parties`` additive shares (cost: n-1 PRG tensors)."""
    if n_parties < 2:
        raise ValueError("secret sharing needs at least two parties")
    if x.dtype != torch.int64:
        raise TypeError("shares live in Z_2^64: encode the tensor to int64 first")
    rand = [prg.ring(x.shape, device=x.device) for _ in range(n_parties - 1)]
    first = x.clone()
    for r in rand:
        first -= r
    return [first, *rand]


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
