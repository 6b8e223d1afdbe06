"""CKKS homomorphic inference (TenSEAL): the client keeps its secret key, the server
evaluates an HE-friendly network on ciphertexts.

* :class:`HEClient` (``secureinfer.he.client``) — SDK: ``HEClient(config).infer(name, x)``;
* :func:`secureinfer.he.server.serve` — the ``secureinfer he serve`` process;
* :mod:`secureinfer.he.model` — the HE model description, validator, reference forward;
* :mod:`secureinfer.he.params` — parameter selection and the 128-bit security table;
* :mod:`secureinfer.he.layout` / :mod:`secureinfer.he.engine` — slot layout and evaluation;
* :mod:`secureinfer.he.flooding` — Li–Micciancio mitigation.

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
