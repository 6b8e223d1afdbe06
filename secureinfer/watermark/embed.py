"""Embedding a projection watermark by fine-tuning with a margin regularizer.

Algorithm (Uchida et al., ICMR 2017, with a hinge instead of their binary cross-entropy so
that the result has a guaranteed margin): with ``X`` (``T×d``, rows of unit norm) and
``b ∈ {0,1}^T`` expanded from the key (:mod:`secureinfer.watermark.scheme`), signs
``s = 2b − 1`` and the chosen layer's flattened weights ``w``, minimise

    L = CE(task) + λ · mean_i max(0, 1.1·γ − s_i · X_i·w) / γ

with Adam over the whole model, a mini-batch at a time, until every projected value has
the target margin, ``min_i s_i · X_i·w ≥ γ``, and then ``polish_epochs`` more (the hinge
is then mostly inactive, so these epochs let the task loss recover any accuracy). The default target is
``γ = max(relative_margin · rms(w), 4 · margin_safety · B)`` (``relative_margin = 2``:
on the digits CNN this survives 65% pruning and costs no measurable accuracy) where
``B = sqrt(d)·2^−f`` is the worst-case change of any projection under conversion to
fixed point with ``f`` fractional bits (:func:`~secureinfer.watermark.scheme.quantization_bound`);
the watermark is only accepted once ``min_i s_i · X_i·w > margin_safety · B``, so the
fixed-point model provably carries every bit. The result is checked once more on the
actual fixed-point weights with the exact integer extraction the verifier uses.

Cost: per step, one ``T×d`` matrix-vector product and its gradient on top of the task's
forward/backward pass; typically 5–20 epochs on the digits CNN.

Randomness: the key material comes from the key (AES-CTR PRG); the batch order uses a
seeded ``torch.Generator``, which is not secret.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from secureinfer.errors import InvalidArgumentError, SecureInferError
from secureinfer.watermark.scheme import (
    DEFAULT_BITS,
    DEFAULT_FRAC_BITS,
    bit_errors,
    extract_bits,
    fixed_point_projection,
    projection_signs,
    quantization_bound,
    quantize_weights,
    watermark_bits,
)

__all__ = ["EmbedResult", "embed_watermark", "projected_margins"]


@dataclass(frozen=True)
class EmbedResult:
    """What an embedding achieved (no secret in it)."""

    layer: str
    layer_shape: tuple[int, ...]
    bits: int
    frac_bits: int
    epochs: int
    target_margin: float
    min_margin: float
    quantization_bound: float
    fixed_point_bit_errors: int


def _find_parameter(model: nn.Module, layer: str) -> nn.Parameter:
    params = dict(model.named_parameters())
    if layer not in params:
        weights = ", ".join(n for n, p in params.items() if p.dim() >= 2)
        raise InvalidArgumentError(f"model has no parameter {layer!r}; weight tensors: {weights}")
    return params[layer]


def projected_margins(weights: torch.Tensor, matrix: torch.Tensor, signs_of_bits: torch.Tensor) -> torch.Tensor:
    """``s_i · X_i·w`` for every bit: positive iff the bit is carried, its size the margin."""
    return signs_of_bits * (matrix @ weights.reshape(-1).to(matrix.dtype))


def embed_watermark(
    model: nn.Module,
    seed: bytes,
    *,
    x: torch.Tensor,
    y: torch.Tensor,
    layer: str,
    bits: int = DEFAULT_BITS,
    frac_bits: int = DEFAULT_FRAC_BITS,
    margin: float | None = None,
    relative_margin: float = 2.0,
    margin_safety: float = 2.0,
    strength: float = 1.0,
    lr: float = 1e-3,
    batch_size: int = 64,
    min_epochs: int = 2,
    polish_epochs: int = 3,
    max_epochs: int = 100,
    shuffle_seed: int = 0,
) -> EmbedResult:
    """Embed the watermark of ``seed`` into parameter ``layer`` of ``model`` (in place).

    ``x, y`` are the task's training data (classification with cross-entropy). Raises
    :class:`SecureInferError` if ``max_epochs`` pass without reaching the required margin
    ``margin_safety · quantization_bound``, and :class:`InvalidArgumentError` for a layer
    that does not exist or is too small to carry ``bits`` bits (``d < bits``).
    """
    param = _find_parameter(model, layer)
    dim = param.numel()
    if dim < bits:
        raise InvalidArgumentError(f"layer {layer!r} has {dim} weights, fewer than the {bits} watermark bits")
    if len(x) != len(y) or len(y) == 0:
        raise InvalidArgumentError("training data must be non-empty with one label per example")
    sign_matrix = projection_signs(seed, bits=bits, dim=dim)
    matrix = (sign_matrix.to(torch.float32) / dim**0.5).to(param.device)
    wm_bits = watermark_bits(seed, bits=bits)
    s = (wm_bits.to(torch.float32) * 2 - 1).to(param.device)
    bound = quantization_bound(dim, frac_bits=frac_bits)
    required = margin_safety * bound
    if margin is None:
        rms = float(param.detach().pow(2).mean().sqrt())
        margin = max(relative_margin * rms, 4.0 * required)
    if margin <= required:
        raise InvalidArgumentError(f"margin {margin:g} must exceed the fixed-point bound {required:g}")

    opt = torch.optim.Adam(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(shuffle_seed)  # not secret: batch order
    epoch, reached_at = 0, None
    min_margin = float(projected_margins(param.detach(), matrix, s).min())
    while epoch < min_epochs or min_margin < margin or epoch < (reached_at or 0) + polish_epochs:
        if epoch >= max_epochs:
            if min_margin > required:
                break  # below the robustness target, but every bit survives fixed point
            raise SecureInferError(
                f"watermark not embedded after {max_epochs} epochs: smallest projected margin "
                f"{min_margin:.3g} is below the fixed-point bound {required:.3g}"
            )
        model.train()
        for idx in torch.randperm(len(y), generator=g).split(batch_size):  # data order (not secret)
            opt.zero_grad()
            task = F.cross_entropy(model(x[idx]), y[idx])
            hinge = F.relu(1.1 * margin - projected_margins(param, matrix, s)).mean() / margin
            (task + strength * hinge).backward()
            opt.step()
        epoch += 1
        min_margin = float(projected_margins(param.detach(), matrix, s).min())
        if reached_at is None and min_margin >= margin:
            reached_at = epoch
    model.eval()

    # The guarantee, checked in float64: every margin exceeds the worst-case fixed-point change.
    w64 = param.detach().cpu().to(torch.float64)
    min_margin = float(projected_margins(w64, sign_matrix.to(torch.float64) / dim**0.5, s.cpu().double()).min())
    if min_margin <= required:
        raise SecureInferError(f"smallest projected margin {min_margin:.3g} is below the fixed-point bound {required:.3g}")
    q = quantize_weights(w64, frac_bits=frac_bits)
    errors = bit_errors(extract_bits(fixed_point_projection(sign_matrix, q)), wm_bits)
    if errors:  # impossible when min_margin > bound; kept as a guard on the arithmetic
        raise SecureInferError(f"{errors} watermark bits flipped by fixed-point conversion")
    return EmbedResult(
        layer=layer,
        layer_shape=tuple(param.shape),
        bits=bits,
        frac_bits=frac_bits,
        epochs=epoch,
        target_margin=float(margin),
        min_margin=min_margin,
        quantization_bound=bound,
        fixed_point_bit_errors=errors,
    )
