"""The package's public surface: __all__ is importable and complete."""

from __future__ import annotations

import secureinfer


def test_all_names_resolve() -> None:
    for name in secureinfer.__all__:
        assert hasattr(secureinfer, name), name


def test_core_api_is_exported() -> None:
    for name in ("Client", "deploy", "SecureInferError", "InvalidArgumentError", "PeerUnavailableError"):
        assert name in secureinfer.__all__


def test_errors_map_to_grpc_codes() -> None:
    from secureinfer.errors import BudgetExhaustedError, ShapeError, error_from_status

    assert ShapeError.grpc_code == "INVALID_ARGUMENT"
    assert BudgetExhaustedError.grpc_code == "RESOURCE_EXHAUSTED"
    assert isinstance(error_from_status("UNAVAILABLE", "x"), secureinfer.PeerUnavailableError)


def test_module_all_lists_resolve() -> None:
    import importlib

    for mod in ("secureinfer.party.server", "secureinfer.party.services", "secureinfer.dealer.wire",
                "secureinfer.party.limits", "secureinfer.config", "secureinfer.localtopology",
                "secureinfer.graph.ranges", "secureinfer.sched"):
        m = importlib.import_module(mod)
        for name in m.__all__:
            assert hasattr(m, name), f"{mod}.{name}"
