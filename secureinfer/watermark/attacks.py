"""Model modifications a watermark should survive: pruning and coarse weight quantization.

These are the removal attacks of the robustness report (Uchida et al. 2017, Sec. 5):
magnitude pruning and uniform ``n``-bit quantization, applied to every conv/linear weight
(tensors of two or more dimensions) of a state_dict; biases are left alone. Fine-tuning
and overwriting are done with :func:`secureinfer.watermark.digits.train` and
:func:`secureinfer.watermark.embed.embed_watermark`.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from secureinfer.errors import InvalidArgumentError

__all__ = ["prune_by_magnitude", "quantize_uniform"]


def prune_by_magnitude(state: Mapping[str, torch.Tensor], rate: float) -> dict[str, torch.Tensor]:
    """Zero the fraction ``rate`` of smallest-magnitude entries of each weight tensor."""
    if not 0.0 <= rate < 1.0:
        raise InvalidArgumentError("pruning rate must be in [0, 1)")
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if t.dim() >= 2 and t.is_floating_point():
            k = int(rate * t.numel())
            flat = t.detach().reshape(-1).clone()
            if k:
                flat[flat.abs().argsort()[:k]] = 0.0
            out[name] = flat.reshape(t.shape)
        else:
            out[name] = t.detach().clone()
    return out


def quantize_uniform(state: Mapping[str, torch.Tensor], bits: int) -> dict[str, torch.Tensor]:
    """Symmetric uniform quantization of each weight tensor to ``bits`` bits.

    Levels ``{−(2^(bits−1) − 1), …, 2^(bits−1) − 1} · max|w| / (2^(bits−1) − 1)``
    (e.g. 31 levels for 5 bits), round to nearest.
    """
    if bits < 2:
        raise InvalidArgumentError("quantization needs at least 2 bits")
    levels = 2 ** (bits - 1) - 1
    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        if t.dim() >= 2 and t.is_floating_point():
            scale = float(t.detach().abs().max()) / levels
            out[name] = t.detach().clone() if scale == 0 else torch.round(t.detach() / scale) * scale
        else:
            out[name] = t.detach().clone()
    return out
