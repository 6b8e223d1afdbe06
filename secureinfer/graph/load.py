"""Load a model file into the IR: TorchScript (``torch.jit.save``) of an ``nn.Sequential``.

TorchScript archives are loaded with ``torch.jit.load``, which does not unpickle
arbitrary Python objects; plain pickled ``nn.Module`` files are refused.
"""

from __future__ import annotations

from pathlib import Path

import torch

from secureinfer.errors import InvalidArgumentError
from secureinfer.graph.ir import Graph

__all__ = ["load_model_file"]


def load_model_file(path: Path, *, frac_bits: int = 16) -> Graph:
    from secureinfer.graph.torch_import import from_script

    if not path.exists():
        raise InvalidArgumentError(f"model file {path} does not exist")
    try:
        module = torch.jit.load(str(path), map_location="cpu")
    except Exception as exc:  # torch raises RuntimeError for non-TorchScript files
        raise InvalidArgumentError(
            f"{path} is not a TorchScript archive (save the model with torch.jit.script(m).save(path)): {exc}"
        ) from exc
    return from_script(module, frac_bits=frac_bits)
