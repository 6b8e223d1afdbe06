"""secureinfer: privacy-preserving inference with MPC over Z_2^64 and CKKS.

The public API is re-exported here (``__all__``); everything else is reachable through
its module but may change between releases.
"""

from __future__ import annotations

from secureinfer.client.sdk import Client, InferenceCost, deploy, deploy_graph
from secureinfer.errors import *  # noqa: F401,F403
from secureinfer.errors import __all__ as _errors_all

__version__ = "0.1.0"

__all__ = ["Client", "InferenceCost", "__version__", "deploy", "deploy_graph", *_errors_all]
