"""Load a model file into the IR, without ever unpickling untrusted data.

Formats, detected from the content (not the file name):

* **torch.export archive** (``.pt2``, ``torch.export.save(torch.export.export(m, (x,)),
  path)``) — preferred. ``torch.export.load`` can fall back to ``pickle`` (pickled
  weights or constants, opaque objects, a sample-input file that fails the
  ``weights_only`` loader, legacy layouts, AOTInductor shared libraries). Before calling
  it we therefore check the archive against an allowlist: only the graph JSON, raw weight
  and constant payloads whose configs say ``use_pickle: false``, the sample inputs
  (verified with ``torch.load(weights_only=True)``) and metadata files. Anything else is
  refused.
* **ONNX** (``onnx.save``) — parsed as protobuf; see :mod:`secureinfer.graph.onnx_import`.
* **TFLite** (a flatbuffer with the ``TFL3`` identifier) — parsed with the ``tflite``
  package, no TensorFlow; see :mod:`secureinfer.graph.tflite_import`.
* **TorchScript** (``torch.jit.save``) — ``torch.jit.load`` reads TorchScript code and
  tensors only; see :func:`secureinfer.graph.torch_import.from_script`.

Plain pickled ``nn.Module`` files (``torch.save(model)``) are refused.
"""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Sequence
from pathlib import Path

import torch

from secureinfer.errors import InvalidArgumentError
from secureinfer.graph.ir import Graph

__all__ = ["load_model_file", "safe_load_exported"]

_PT2_FIXED = {"archive_format", "archive_version", "byteorder", ".data/version", ".data/serialization_id"}


def _pt2_members(zf: zipfile.ZipFile) -> dict[str, str]:
    """Archive-relative name -> zip member name (the archive has one root folder)."""
    out = {}
    for info in zf.infolist():
        if info.is_dir():
            continue
        parts = info.filename.split("/", 1)
        if len(parts) != 2:
            raise InvalidArgumentError(f"unexpected member {info.filename!r} in the .pt2 archive")
        out[parts[1]] = info.filename
    return out


def _check_pt2(zf: zipfile.ZipFile, members: dict[str, str]) -> None:
    """Raise unless every member of the archive can be loaded without pickle."""
    bad: list[str] = []
    models = [n for n in members if n.startswith("models/") and n.endswith(".json")]
    if len(models) != 1:
        bad.append(f"expected one model in models/, found {len(models)}")
    for rel in members:
        if rel in _PT2_FIXED or rel.startswith("extra/"):
            continue
        if rel in models:
            continue
        if rel.startswith("data/weights/") and (rel.endswith("_weights_config.json") or
                                                 rel[len("data/weights/"):].startswith("weight_")):
            continue
        if rel.startswith("data/constants/") and (rel.endswith("_constants_config.json") or
                                                   rel[len("data/constants/"):].startswith("tensor_")):
            continue
        if rel.startswith("data/sample_inputs/") and rel.endswith(".pt"):
            try:
                torch.load(io.BytesIO(zf.read(members[rel])), weights_only=True)
            except Exception as exc:  # noqa: BLE001 - any failure means torch would fall back to pickle
                bad.append(f"{rel}: not loadable with weights_only=True ({type(exc).__name__})")
            continue
        bad.append(f"{rel}: not allowed (pickled, legacy or compiled content)")
    for rel in members:
        if rel.endswith("_weights_config.json") or rel.endswith("_constants_config.json"):
            try:
                cfg = json.loads(zf.read(members[rel]).decode())["config"]
            except (ValueError, KeyError, UnicodeDecodeError) as exc:
                bad.append(f"{rel}: malformed ({exc})")
                continue
            for fqn, meta in cfg.items():
                if meta.get("use_pickle") or not str(meta.get("path_name", "")).startswith(("weight_", "tensor_")):
                    bad.append(f"{rel}: entry {fqn!r} would be unpickled")
    if (zf.read(members["archive_format"]).decode().strip() if "archive_format" in members else "") != "pt2":
        bad.append("not a torch.export pt2 archive (archive_format missing)")
    if bad:
        raise InvalidArgumentError("refusing to load the .pt2 archive: " + "; ".join(bad))


def safe_load_exported(path: Path) -> torch.export.ExportedProgram:
    """``torch.export.load`` after checking that nothing in the archive needs pickle."""
    try:
        with zipfile.ZipFile(path) as zf:
            _check_pt2(zf, _pt2_members(zf))
    except zipfile.BadZipFile as exc:
        raise InvalidArgumentError(f"{path} is not a .pt2 archive: {exc}") from exc
    try:
        return torch.export.load(str(path))
    except Exception as exc:  # noqa: BLE001 - torch raises many types for corrupt archives
        raise InvalidArgumentError(f"cannot load the torch.export archive {path}: {exc}") from exc


def _kind(path: Path) -> str:
    with path.open("rb") as fh:
        head = fh.read(8)
    if head[4:8] == b"TFL3":  # the TFLite flatbuffer's file identifier
        return "tflite"
    if head.startswith(b"PK"):
        with zipfile.ZipFile(path) as zf:
            names = zf.namelist()
        if any(n.split("/", 1)[-1] == "archive_format" for n in names):
            return "pt2"
        if any(n.split("/", 1)[-1].startswith("code/") or n.endswith("constants.pkl") for n in names):
            return "torchscript"
        return "pickle"
    if head[:1] == b"\x80":
        return "pickle"
    return "onnx"


def load_model_file(path: Path, *, frac_bits: int = 16, input_shape: Sequence[int] | None = None,
                    strict: bool = True) -> Graph:
    """Import a ``.pt2`` (torch.export), ``.onnx``, ``.tflite`` or TorchScript file.

    ``input_shape`` (per sample, without the batch axis) is needed for TorchScript models
    that do not start with a Linear, and for ONNX models with symbolic feature dimensions.
    """
    path = Path(path)
    if not path.is_file():
        raise InvalidArgumentError(f"model file {path} does not exist")
    kind = _kind(path)
    if kind == "pt2":
        from secureinfer.graph.torch_import import from_torch

        ep = safe_load_exported(path)
        user = [s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"]
        if len(user) != 1:
            raise InvalidArgumentError(f"{path}: the exported program takes {len(user)} inputs; exactly one is supported")
        val = next(n for n in ep.graph.nodes if n.name == user[0]).meta["val"]
        if input_shape is None and all(isinstance(d, int) for d in val.shape):
            # captured with static shapes (e.g. batch 1): import the program as it is,
            # re-tracing would trip its own batch-size guard
            from secureinfer.graph.torch_import import from_exported

            return from_exported(ep, frac_bits=frac_bits, strict=strict)
        shape = tuple(input_shape) if input_shape is not None else tuple(int(d) for d in val.shape[1:])
        return from_torch(ep.module(), (1, *shape), frac_bits=frac_bits, strict=strict)
    if kind == "onnx":
        from secureinfer.graph.onnx_import import from_onnx

        return from_onnx(path, frac_bits=frac_bits, input_shape=input_shape, strict=strict)
    if kind == "tflite":
        from secureinfer.graph.tflite_import import from_tflite

        return from_tflite(path, frac_bits=frac_bits)
    if kind == "torchscript":
        from secureinfer.graph.torch_import import from_script

        try:
            module = torch.jit.load(str(path), map_location="cpu")
        except Exception as exc:  # torch raises RuntimeError for broken archives
            raise InvalidArgumentError(f"{path} is not a loadable TorchScript archive: {exc}") from exc
        return from_script(module, frac_bits=frac_bits, input_shape=input_shape, strict=strict)
    raise InvalidArgumentError(
        f"{path} looks like a pickled Python object, which is never loaded: save the model with "
        "torch.export.save(torch.export.export(model, (x,)), 'model.pt2'), torch.onnx.export, "
        "or torch.jit.script(model).save(path)")
