"""Client and model-owner SDK."""

from __future__ import annotations

from secureinfer.client.sdk import Client, InferenceCost, deploy, deploy_graph

__all__ = ["Client", "InferenceCost", "deploy", "deploy_graph"]
