"""secureinfer: privacy-preserving inference with MPC over Z_2^64 and CKKS.

The public API is re-exported here; everything in a module whose name starts with an
underscore is private.
"""

from __future__ import annotations

from secureinfer.errors import *  # noqa: F401,F403
from secureinfer.errors import __all__ as _errors_all

__version__ = "0.1.0"

__all__ = ["__version__", *_errors_all]
