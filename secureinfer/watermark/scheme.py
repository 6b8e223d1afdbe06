"""The projection watermark itself: key expansion, projection, bit extraction, statistics.

Scheme (white-box projection watermark, Uchida, Nagai, Sakazawa and Satoh, "Embedding
Watermarks into Deep Neural Networks", ICMR 2017), with the changes that make it
auditable and MPC-friendly:

* **Key.** A 32-byte ``seed = SHA-256(tag ‖ owner_public_key ‖ nonce)`` (``tag`` is a
  fixed domain-separation string, the public key is the raw 32-byte Ed25519 key, the nonce
  32 bytes from ``os.urandom``). Everything else is expanded from the seed with the
  AES-256-CTR :class:`~secureinfer.prg.Prg` under HKDF labels:

  - ``S ∈ {−1,+1}^{T×d}``: ``S[i, j] = 2·bit − 1`` for the bits of the
    ``.../projection`` stream, row-major; ``X = S / sqrt(d)`` is the real projection, so
    every row has unit Euclidean norm and ``|X[i, j]| = 1/sqrt(d)``.
  - ``b ∈ {0,1}^T``: the bits of the ``.../bits`` stream.

  ``d`` is the number of elements of the watermarked parameter, flattened in PyTorch's
  row-major (C) order; ``T`` is the number of watermark bits.

* **Extraction (canonical, exact).** ``q = round(w · 2^f)`` (``torch.round``: half to
  even), ``y = S · q`` in exact int64 arithmetic, extracted bit ``i`` = ``[y_i ≥ 0]``.
  The scale ``2^f/sqrt(d) > 0`` does not change signs, so this equals
  ``[X · w_fixed ≥ 0]`` on the fixed-point weights. It is *exactly* what an MPC verifier
  computes on additive shares of ``q`` over Z_2^64: ``S`` is a ±1 matrix, so
  ``S · [q]`` is a local linear map on each share (no truncation, no rounding), followed
  by one secure sign test (DReLU) per row, the Hamming distance to ``b`` and one
  comparison with the public threshold. Plaintext and MPC verification therefore agree
  bit for bit on *any* model, not only on watermarked ones.

* **Quantization margin.** ``|X_i · (q/2^f − w)| ≤ ‖X_i‖_1 · 2^−f = sqrt(d) · 2^−f``
  for any encoder that errs by at most ``2^−f`` per weight (rounding or truncation), so a
  float projection with ``|X_i · w| > sqrt(d)·2^−f`` keeps its sign after conversion to
  fixed point. :func:`quantization_bound` returns that bound; the embedder trains until
  every projected margin exceeds it (times a safety factor).

* **False positives.** For a model that was not derived from this key, ``b`` is uniform
  and independent of the extracted bits (it is expanded from an independent PRG stream),
  so the Hamming distance ``H`` is exactly ``Binomial(T, 1/2)`` over the choice of the key,
  whatever the model's weights are. The decision rule "pass iff ``H ≤ k``" therefore has
  false-positive rate ``P[Bin(T, 1/2) ≤ k]``, computed here with exact integer arithmetic.

Cost: key expansion is ``T·d/8`` PRG bytes (one AES block per 128 signs); extraction is one
``T×d`` integer matrix-vector product. In MPC: 0 rounds for the projection, one DReLU per
bit, and one comparison for the threshold.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from fractions import Fraction

import torch

from secureinfer.errors import InvalidArgumentError, RangeError
from secureinfer.prg import SEED_BYTES, Prg, derive_seed

__all__ = [
    "DEFAULT_BITS",
    "DEFAULT_FPR",
    "DEFAULT_FRAC_BITS",
    "SCHEME",
    "binomial_cdf",
    "bit_errors",
    "extract_bits",
    "fixed_point_projection",
    "float_projection",
    "p_value",
    "projection_matrix",
    "project_fixed_point",
    "projection_signs",
    "quantization_bound",
    "quantize_weights",
    "seed_from",
    "sign_blocks",
    "threshold_for_fpr",
    "watermark_bits",
]

SCHEME = "secureinfer/projection-watermark/v1"
DEFAULT_BITS = 256
DEFAULT_FRAC_BITS = 16
DEFAULT_FPR = 1e-9

_SEED_TAG = b"secureinfer/watermark/v1/seed\x00"
_PROJECTION_LABEL = "secureinfer/watermark/v1/projection"
_BITS_LABEL = "secureinfer/watermark/v1/bits"
_OWNER_KEY_BYTES = 32  # raw Ed25519 public key


def seed_from(owner_public_key: bytes, nonce: bytes) -> bytes:
    """``SHA-256(tag ‖ owner_public_key ‖ nonce)``: the watermark seed of an owner.

    Binding the seed to the owner's public key means a key file cannot be re-used under
    another owner's certificate; the 32-byte secret nonce makes it unpredictable.
    """
    if len(owner_public_key) != _OWNER_KEY_BYTES:
        raise InvalidArgumentError(f"owner public key must be {_OWNER_KEY_BYTES} raw bytes")
    if len(nonce) != SEED_BYTES:
        raise InvalidArgumentError(f"watermark nonce must be {SEED_BYTES} bytes")
    return hashlib.sha256(_SEED_TAG + owner_public_key + nonce).digest()


def _check_sizes(bits: int, dim: int) -> None:
    if bits < 1:
        raise InvalidArgumentError("the watermark needs at least one bit")
    if dim < 1:
        raise InvalidArgumentError("the watermarked layer is empty")


def projection_signs(seed: bytes, *, bits: int, dim: int) -> torch.Tensor:
    """The secret ±1 matrix ``S`` (``T×d``, ``torch.int8``) expanded from ``seed``.

    Row ``i`` is the projection of watermark bit ``i``; column ``j`` multiplies element
    ``j`` of the layer flattened in row-major order. This is the matrix an MPC verifier
    applies to the shares of the fixed-point weights.
    """
    return torch.cat(list(sign_blocks(seed, bits=bits, dim=dim, chunk_elems=bits * dim)))


def sign_blocks(seed: bytes, *, bits: int, dim: int, chunk_elems: int = 1 << 22) -> Iterator[torch.Tensor]:
    """The rows of ``S`` in consecutive blocks of about ``chunk_elems`` signs (``torch.int8``).

    Concatenated, the blocks equal :func:`projection_signs`; use this for large layers so
    that memory stays ``O(chunk_elems)`` (every block but the last is byte-aligned in the
    PRG stream, so block boundaries do not change the stream).
    """
    _check_sizes(bits, dim)
    prg = Prg(derive_seed(seed, _PROJECTION_LABEL))
    rows = max(1, chunk_elems // dim)
    if (rows * dim) % 8:
        rows = rows - rows % 8 if rows >= 8 else 8
    done = 0
    while done < bits:
        n = min(rows, bits - done)
        yield torch.from_numpy(prg.bits((n, dim)).astype("int8") * 2 - 1)
        done += n


def projection_matrix(seed: bytes, *, bits: int, dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``X = S / sqrt(d)``: the real projection with unit-norm rows (used for training)."""
    return projection_signs(seed, bits=bits, dim=dim).to(dtype) / math.sqrt(dim)


def watermark_bits(seed: bytes, *, bits: int) -> torch.Tensor:
    """The secret watermark ``b ∈ {0,1}^T`` (``torch.uint8``) expanded from ``seed``."""
    _check_sizes(bits, 1)
    return torch.from_numpy(Prg(derive_seed(seed, _BITS_LABEL)).bits(bits).copy())


def quantize_weights(weights: torch.Tensor, *, frac_bits: int = DEFAULT_FRAC_BITS) -> torch.Tensor:
    """Fixed-point encoding ``round(w · 2^f)`` as int64 (round half to even).

    The MPC encoder must produce the same integers for verification to agree bit for bit
    (it does if it rounds to nearest; a weight exactly halfway is the only difference).
    """
    if not 0 <= frac_bits <= 40:
        raise InvalidArgumentError("frac_bits must be in [0, 40]")
    w = weights.detach().to(torch.float64)
    if not bool(torch.isfinite(w).all()):
        raise RangeError("weights contain NaN or infinity")
    scaled = torch.round(w * float(2**frac_bits))
    if scaled.numel() and float(scaled.abs().max()) >= 2.0**62:
        raise RangeError("weights too large for 64-bit fixed point at this precision")
    return scaled.to(torch.int64)


def fixed_point_projection(signs: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``y = S · q`` in exact int64 (``q`` the flattened fixed-point weights).

    Raises :class:`RangeError` when ``d · max|q|`` could overflow int64.
    """
    q = q.reshape(-1).to(torch.int64)
    if signs.shape[1] != q.numel():
        raise InvalidArgumentError(f"projection has {signs.shape[1]} columns, layer has {q.numel()} elements")
    peak = int(q.abs().max()) if q.numel() else 0
    if peak * q.numel() >= 2**63:
        raise RangeError("fixed-point projection would overflow int64")
    # Exact: int64 products of ±1 and q, accumulated without overflow (checked above).
    return (signs.to(torch.int64) * q.unsqueeze(0)).sum(dim=1)


def project_fixed_point(seed: bytes, q: torch.Tensor, *, bits: int) -> torch.Tensor:
    """``S · q`` for the key ``seed``, expanding ``S`` block by block (bounded memory)."""
    q = q.reshape(-1).to(torch.int64)
    return torch.cat([fixed_point_projection(block, q) for block in sign_blocks(seed, bits=bits, dim=q.numel())])


def float_projection(matrix: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``y = X · w_flat`` (differentiable; the embedder's regularizer acts on it)."""
    return matrix.to(weights.dtype) @ weights.reshape(-1)


def extract_bits(projection: torch.Tensor) -> torch.Tensor:
    """Extracted bits ``[y ≥ 0]`` as ``torch.uint8`` (the sign test the MPC does by DReLU)."""
    return (projection >= 0).to(torch.uint8)


def bit_errors(extracted: torch.Tensor, expected: torch.Tensor) -> int:
    """Hamming distance between two bit vectors of equal length."""
    if extracted.shape != expected.shape:
        raise InvalidArgumentError("bit vectors differ in length")
    return int((extracted.to(torch.uint8) != expected.to(torch.uint8)).sum())


def quantization_bound(dim: int, *, frac_bits: int = DEFAULT_FRAC_BITS) -> float:
    """Worst-case change of any ``X_i · w`` when every weight moves by at most ``2^−f``.

    ``‖X_i‖_1 · 2^−f = sqrt(d) · 2^−f``; covers round-to-nearest and truncating encoders.
    """
    return math.sqrt(dim) * 2.0 ** (-frac_bits)


def binomial_cdf(k: int, n: int) -> Fraction:
    """``P[Bin(n, 1/2) ≤ k]`` exactly, as a fraction (``math.comb``, no floating point)."""
    if k < 0:
        return Fraction(0)
    if k >= n:
        return Fraction(1)
    return Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2**n)


def threshold_for_fpr(bits: int, fpr: float = DEFAULT_FPR) -> int:
    """The largest ``k`` with ``P[Bin(T, 1/2) ≤ k] ≤ fpr`` (exact comparison).

    Raises :class:`InvalidArgumentError` when even ``k = 0`` is too permissive, i.e.
    ``2^−T > fpr``: the watermark then has too few bits for the requested rate.
    """
    if not 0.0 < fpr < 1.0 or math.isnan(fpr):
        raise InvalidArgumentError("false-positive rate must be in (0, 1)")
    if bits < 1:
        raise InvalidArgumentError("the watermark needs at least one bit")
    limit = Fraction(fpr) * 2**bits  # compare integer counts: sum C(T, i) ≤ fpr · 2^T
    total, k = 0, -1
    for i in range(bits + 1):
        total += math.comb(bits, i)
        if total > limit:
            break
        k = i
    if k < 0:
        raise InvalidArgumentError(f"{bits} bits cannot reach a false-positive rate of {fpr:g}")
    return k


def p_value(errors: int, bits: int) -> float:
    """``P[Bin(T, 1/2) ≤ errors]``: the chance that an unrelated model matches this well."""
    return float(binomial_cdf(errors, bits))
