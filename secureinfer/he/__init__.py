"""CKKS homomorphic inference (TenSEAL): the client keeps its secret key, the server
evaluates an HE-friendly network on ciphertexts.

* :class:`HEClient` (:mod:`secureinfer.he.client`) — SDK: ``HEClient(config).infer(name, x)``;
* :func:`secureinfer.he.server.serve` — the ``secureinfer he serve`` process (gRPC, mTLS,
  health); :mod:`secureinfer.he.service` — its sessions, limits and checks;
* :mod:`secureinfer.he.model` — the HE model description, validator, reference forward;
  :mod:`secureinfer.he.convert` — from PyTorch, ReLU/GELU -> polynomial, digits demo model;
* :mod:`secureinfer.he.lower` — layers -> linear / square / affine steps (folding);
* :mod:`secureinfer.he.params` — parameter selection and the 128-bit security table;
* :mod:`secureinfer.he.layout` / :mod:`secureinfer.he.engine` — slot layout (batching,
  baby-step giant-step diagonals) and evaluation; :mod:`secureinfer.he.packing` — client
  side of the layout; :mod:`secureinfer.he.ckks` — the client's keys;
* :mod:`secureinfer.he.flooding` — Li–Micciancio mitigation; :mod:`secureinfer.he.wire` —
  ciphertext chunking.

Names are imported lazily (TenSEAL is an optional dependency: ``pip install
secureinfer[he]``), so importing ``secureinfer`` never requires it.
"""

from __future__ import annotations

import importlib
from typing import Any

__all__ = [
    "CkksParams",
    "HEClient",
    "HEModel",
    "load_model",
    "relu_poly",
    "gelu_poly",
    "save_model",
    "select_params",
    "validate",
]

_LAZY = {
    "CkksParams": "secureinfer.he.params",
    "select_params": "secureinfer.he.params",
    "HEClient": "secureinfer.he.client",
    "HEModel": "secureinfer.he.model",
    "load_model": "secureinfer.he.model",
    "save_model": "secureinfer.he.model",
    "relu_poly": "secureinfer.he.model",
    "gelu_poly": "secureinfer.he.model",
    "validate": "secureinfer.he.model",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'secureinfer.he' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


def __dir__() -> list[str]:
    return sorted(__all__)
