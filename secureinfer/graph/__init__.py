"""Model IR, importers and validator."""

from __future__ import annotations

from secureinfer.graph.ir import Graph, Node, TensorSpec

__all__ = ["Graph", "Node", "TensorSpec"]
