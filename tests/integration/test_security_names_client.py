"""Security review findings 5 and 8 through real `secureinfer party` / `dealer` processes.

5. A Deploy whose public graph names two linear nodes alike (they would draw one dealer
   mask A, and the parties would open X - A and Y - A), or names a node with the
   internal separator "/", is refused with INVALID_ARGUMENT naming every bad name, and
   nothing is stored.
8. One SDK ``Client`` shared by 8 threads gives every thread its own correct results.
"""

from __future__ import annotations

import json
import threading

import numpy as np
import pytest
import torch
from torch import nn

from secureinfer.client.admin import list_models
from secureinfer.client.sdk import Client, deploy, deploy_graph
from secureinfer.errors import InvalidArgumentError
from secureinfer.graph.torch_import import from_torch
from secureinfer.localcluster import LocalCluster

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory):
    with LocalCluster(tmp_path_factory.mktemp("names"), request_timeout_s=20.0, rpc_timeout_s=5.0) as c:
        yield c


def _model() -> nn.Module:
    torch.manual_seed(5)  # non-secret: test weights
    return nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 10)).eval()


def _deploy_tampered(cluster: LocalCluster, name: str, tamper) -> None:  # noqa: ANN001
    """Deploy through the SDK's own path, with the public graph JSON it sends edited by ``tamper``.

    The graph's weights and their shares are those of an honest import; only the
    DeployHeader's ``graph`` bytes differ (``deploy_graph`` puts ``graph.public_json()``
    there), as a malicious or buggy owner tool could send them.
    """
    graph = from_torch(_model(), (1, 64))
    doc = json.loads(graph.public_json())
    tamper(doc)
    tampered = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    graph.public_json = lambda: tampered  # type: ignore[method-assign]
    deploy_graph(graph, name=name, config=cluster.config_path)


def _rename(doc: dict, old: str, new: str) -> None:
    for n in doc["nodes"]:
        if n["name"] == old:
            n["name"] = new
        n["inputs"] = [new if i == old else i for i in n["inputs"]]
    doc["outputs"] = [new if o == old else o for o in doc["outputs"]]


def _linear_names(doc: dict) -> list[str]:
    return [n["name"] for n in doc["nodes"] if n["op"] == "linear"]


def test_deploy_with_repeated_or_slashed_node_names_is_refused_and_not_stored(cluster: LocalCluster) -> None:
    honest = json.loads(from_torch(_model(), (1, 64)).public_json())
    first, second, third = _linear_names(honest)

    def duplicate(doc: dict) -> None:  # the second and third linear layers both named like the first
        _rename(doc, second, first)
        _rename(doc, third, first)

    with pytest.raises(InvalidArgumentError) as err:
        _deploy_tampered(cluster, "evil-dup", duplicate)
    assert f"name {first!r} is used 3 times" in str(err.value), str(err.value)

    def slashed(doc: dict) -> None:  # names inside the planner's own namespace
        _rename(doc, second, f"{first}/pre0")
        _rename(doc, third, "dp/clip")

    with pytest.raises(InvalidArgumentError) as err:
        _deploy_tampered(cluster, "evil-slash", slashed)
    text = str(err.value)
    assert f"'{first}/pre0'" in text and "'dp/clip'" in text and "2 invalid name(s)" in text, text

    with pytest.raises(InvalidArgumentError, match="'argmax' is reserved"):
        _deploy_tampered(cluster, "evil-reserved", lambda doc: _rename(doc, third, "argmax"))

    deployed = {m["name"] for m in list_models(cluster.config_path, identity="owner")}
    assert not deployed & {"evil-dup", "evil-slash", "evil-reserved"}, deployed
    # the same graph, untampered, deploys (the refusals were about the names only)
    deploy(_model(), torch.zeros(1, 64), name="honest", config=cluster.config_path)
    assert "honest" in {m["name"] for m in list_models(cluster.config_path, identity="owner")}


def test_one_client_shared_by_eight_threads(cluster: LocalCluster) -> None:
    model = _model()
    deploy(model, torch.zeros(1, 64), name="shared", config=cluster.config_path)
    gen = torch.Generator().manual_seed(8)  # non-secret: test inputs
    n_threads, rounds = 8, 3
    # distinct batch sizes per thread, large enough that share() draws long PRG streams
    xs = {k: torch.rand(192 + 8 * k, 64, generator=gen) for k in range(n_threads)}
    with torch.no_grad():
        refs = {k: model(x).double().numpy() for k, x in xs.items()}
    results: dict[int, list[np.ndarray]] = {k: [] for k in range(n_threads)}
    up_bytes: dict[int, set[int]] = {k: set() for k in range(n_threads)}
    errors: list[BaseException] = []
    start = threading.Barrier(n_threads)

    with Client(cluster.config_path, timeout=60.0) as client:

        def work(k: int) -> None:
            try:
                start.wait(30)
                for _ in range(rounds):
                    results[k].append(client.infer("shared", xs[k].numpy()))
                    cost = client.last_cost
                    assert cost is not None
                    up_bytes[k].add(cost.bytes_client_up)
            except BaseException as exc:  # noqa: BLE001 - re-raised below
                errors.append(exc)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(n_threads)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        assert not any(t.is_alive() for t in threads), "a thread hung"
    assert not errors, [repr(e) for e in errors]
    for k in range(n_threads):
        assert len(results[k]) == rounds
        for y in results[k]:
            assert y.shape == refs[k].shape
            assert np.abs(y - refs[k]).max() <= 1e-2, k
    # last_cost is per thread: each thread saw the cost of its own requests (batch-dependent size)
    assert all(len(v) == 1 for v in up_bytes.values()), up_bytes
    sizes = [next(iter(up_bytes[k])) for k in range(n_threads)]
    assert sizes == sorted(sizes) and len(set(sizes)) == n_threads, sizes
