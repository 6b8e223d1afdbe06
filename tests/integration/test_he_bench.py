"""The issue's 28x28 CNN through scripts/bench_he.py (real server over mTLS): slow."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


def test_bench_cnn28_single_and_batched() -> None:
    path = Path(__file__).resolve().parents[2] / "scripts" / "bench_he.py"
    spec = importlib.util.spec_from_file_location("bench_he", path)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    results = bench.run_he_bench([1, 64], epochs=1)
    assert [r["batch_pack"] for r in results] == [1, 64]
    for r in results:
        assert r["max_abs_error"] <= 1e-2 and r["argmax_agreement"] == 1.0
        assert r["bytes_up"] > 0 and r["bytes_down"] > 0
    assert results[0]["rotations"] > 0
