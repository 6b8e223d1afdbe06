"""Model files for watermarking: PyTorch state_dicts and ``.npz`` archives, and their hash.

Accepted files (never unpickled):

* ``.pt`` / ``.pth`` / ``.bin``: a ``state_dict`` saved with ``torch.save``, read with
  ``torch.load(..., weights_only=True)``; a checkpoint dict with a ``"state_dict"`` entry
  is accepted too.
* ``.npz``: one array per parameter name, read with ``numpy.load(allow_pickle=False)``.

:func:`weights_digest` is the SHA-256 of the model's fixed-point weights, as recorded in a
certificate: names sorted, and for each tensor its name, dtype, shape and the bytes of
``round(w · 2^f)`` as little-endian int64 (integer tensors are hashed as they are).
"""

from __future__ import annotations

import hashlib
import os
import pickle  # only for the exception type raised by torch.load(weights_only=True)
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from secureinfer.errors import InvalidArgumentError, NotFoundError
from secureinfer.watermark.scheme import DEFAULT_FRAC_BITS, quantize_weights

__all__ = ["StateDict", "load_state_dict", "save_state_dict", "weights_digest"]

StateDict = dict[str, torch.Tensor]
_TORCH_SUFFIXES = {".pt", ".pth", ".bin"}


def _as_state_dict(obj: object, path: str | os.PathLike[str]) -> StateDict:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping) or not obj:
        raise InvalidArgumentError(f"{path} does not hold a state_dict (a mapping of names to tensors)")
    out: StateDict = {}
    for name, value in obj.items():
        if not isinstance(name, str) or not isinstance(value, torch.Tensor):
            raise InvalidArgumentError(f"{path}: entry {name!r} is not a named tensor")
        out[name] = value.detach().cpu()
    return out


def load_state_dict(path: str | os.PathLike[str]) -> StateDict:
    """Read a model file (see module docstring) into ``{name: tensor}``."""
    p = Path(path)
    if not p.is_file():
        raise NotFoundError(f"model file {p} not found")
    suffix = p.suffix.lower()
    if suffix == ".npz":
        try:
            with np.load(p, allow_pickle=False) as arc:
                return _as_state_dict({k: torch.from_numpy(np.array(arc[k])) for k in arc.files}, p)
        except (ValueError, OSError, zipfile.BadZipFile) as exc:
            raise InvalidArgumentError(f"{p} is not a readable .npz archive: {exc}") from None
    if suffix in _TORCH_SUFFIXES:
        try:
            obj = torch.load(p, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError, ValueError, EOFError, OSError) as exc:
            raise InvalidArgumentError(
                f"{p} is not a weights-only PyTorch file (save a state_dict, not a module): {exc}"
            ) from None
        return _as_state_dict(obj, p)
    raise InvalidArgumentError(f"{p}: unknown model file type {suffix!r} (use .pt, .pth or .npz)")


def save_state_dict(state: Mapping[str, torch.Tensor], path: str | os.PathLike[str]) -> None:
    """Write ``state`` as ``.npz`` or a ``torch.save`` state_dict, chosen by suffix."""
    p = Path(path)
    clean = {k: v.detach().cpu().contiguous() for k, v in state.items()}
    suffix = p.suffix.lower()
    if suffix == ".npz":
        np.savez(p, **{k: v.numpy() for k, v in clean.items()})
    elif suffix in _TORCH_SUFFIXES:
        torch.save(clean, p)
    else:
        raise InvalidArgumentError(f"{p}: unknown model file type {suffix!r} (use .pt, .pth or .npz)")


def weights_digest(state: Mapping[str, torch.Tensor], *, frac_bits: int = DEFAULT_FRAC_BITS) -> str:
    """Hex SHA-256 of the fixed-point weights (``round(w·2^f)``; integer tensors as-is)."""
    h = hashlib.sha256(b"secureinfer/watermark/v1/weights\x00")
    h.update(struct.pack("<I", frac_bits))
    for name in sorted(state):
        t = state[name].detach().cpu()
        if t.is_floating_point():
            data = quantize_weights(t, frac_bits=frac_bits)
            kind = b"fixed"
        else:
            data = t.to(torch.int64)
            kind = b"int"
        raw_name = name.encode()
        h.update(struct.pack("<I", len(raw_name)) + raw_name + kind)
        h.update(struct.pack("<I", t.dim()) + struct.pack(f"<{t.dim()}q", *t.shape))
        h.update(data.contiguous().numpy().astype("<i8").tobytes())
    return h.hexdigest()
