"""The case file ``scripts/bench.py`` writes for ``--compare-crypten`` round-trips through
``scripts/crypten_ref.py``: same architecture, same weights, same plaintext outputs.

CrypTen itself is not needed here (it lives in a separate venv); this checks the contract
between the two scripts so the side-by-side run compares the same model on the same inputs.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load(name: str, path: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # before exec: dataclasses look their module up by name
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load("_si_bench_script", ROOT / "scripts" / "bench.py")


@pytest.fixture(scope="module")
def ref() -> ModuleType:
    return _load("_si_crypten_ref_script", ROOT / "scripts" / "crypten_ref.py")


def test_formats_agree(bench: ModuleType, ref: ModuleType) -> None:
    assert bench.CRYPTEN_FORMAT == ref.FORMAT


@pytest.mark.parametrize("case", ["mlp1", "lenet1"])
def test_case_file_round_trip(bench: ModuleType, ref: ModuleType, case: str, tmp_path: Path) -> None:
    c = bench.CASES[case]
    model, make = c.build(c.batch)
    inputs = [make(i) for i in range(2)]
    path = tmp_path / f"{case}.pt"
    bench.save_case(path, case, c.batch, model, inputs, repeats=2, warmup=1, threads=1)

    data = ref.load_case(path)
    assert data["case"] == case and data["batch"] == c.batch and data["repeats"] == 2
    rebuilt = ref.torch_model(data["layers"])
    rebuilt.load_state_dict(data["state_dict"], strict=True)
    with torch.no_grad():
        for x, want in zip(data["inputs"], data["plain_logits"]):
            assert torch.equal(rebuilt(x), want)
            assert torch.equal(model(x), want)
    # a different model gives different outputs: the check can fail
    other = ref.torch_model(data["layers"])
    with torch.no_grad():
        assert not torch.equal(other(data["inputs"][0]), data["plain_logits"][0])


def test_load_case_refuses_other_files(ref: ModuleType, tmp_path: Path) -> None:
    p = tmp_path / "x.pt"
    torch.save({"format": "something-else"}, p)
    with pytest.raises(ValueError, match="not a"):
        ref.load_case(p)


def test_non_sequential_is_skipped(bench: ModuleType) -> None:
    model = bench.build_resnet(1)[0]
    with pytest.raises(bench.UnsupportedForCrypten):
        bench.layer_spec(model)
    with pytest.raises(bench.UnsupportedForCrypten, match="layer 1"):
        bench.layer_spec(torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Sigmoid()))


def test_ratios(bench: ModuleType) -> None:
    ours = {"latency_ms_median": 10.0, "latency_ms_p90": 12.0, "latency_ms_back_to_back_median": 11.0,
            "bytes_online": 100, "bytes_offline": 300, "rounds": 5}
    ref = {"latency_ms_median": 40.0, "latency_ms_p90": 48.0, "bytes": 1000, "rounds": 50}
    r = bench.crypten_ratios(ours, ref)
    assert r == {"latency_over_crypten": 0.25, "latency_p90_over_crypten": 0.25,
                 "latency_back_to_back_over_crypten": 0.275, "bytes_online_over_crypten": 0.1,
                 "bytes_total_over_crypten": 0.4, "rounds_over_crypten": 0.1}
    assert bench.crypten_ratios(ours, {})["latency_over_crypten"] is None
