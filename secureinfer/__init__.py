"""secureinfer: privacy-preserving inference with MPC over Z_2^64 and CKKS.

The public API is re-exported here (``__all__``); the SDK classes are imported lazily
so that ``import secureinfer`` (and the CLI's ``--help``) stays fast.
"""

from __future__ import annotations

from typing import Any

from secureinfer.errors import *  # noqa: F401,F403
from secureinfer.errors import __all__ as _errors_all

__version__ = "0.1.0"

_LAZY = {
    "Client": "secureinfer.client.sdk",
    "InferenceCost": "secureinfer.client.sdk",
    "deploy": "secureinfer.client.sdk",
    "deploy_graph": "secureinfer.client.sdk",
    "HEClient": "secureinfer.he",
}

__all__ = ["__version__", *_LAZY, *_errors_all]


def __getattr__(name: str) -> Any:
    mod = _LAZY.get(name)
    if mod is None:
        raise AttributeError(f"module 'secureinfer' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(mod), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))
