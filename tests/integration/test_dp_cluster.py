"""DP outputs through real parties: noise inside the MPC, budget enforced on every party,
spending persisted across kill -9."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch import nn

from secureinfer.client.sdk import Client, deploy
from secureinfer.errors import BudgetExhaustedError, InvalidArgumentError
from secureinfer.localcluster import LocalCluster

pytestmark = pytest.mark.timeout(600)


def _budget(cluster: LocalCluster, party: int) -> dict:
    out = subprocess.run(
        [sys.executable, "-m", "secureinfer", "dp", "budget", "--client", "client", "--model", "dpm",
         "--id", str(party), "--config", str(cluster.config_path)],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_dp_noise_budget_and_persistence(tmp_path) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.rand(1, 8)
    with LocalCluster(tmp_path) as c:
        params = {"dp.epsilon": "2", "dp.delta": "1e-6", "dp.clip": "4", "dp.budget_epsilon": "6",
                  "dp.budget_delta": "1e-4"}
        deploy(model, x, name="dpm", config=c.config_path, parameters=params)
        with pytest.raises(InvalidArgumentError):  # bad policies are refused at deploy
            deploy(model, x, name="bad", config=c.config_path, parameters={"dp.epsilon": "-1", "dp.clip": "4"})
        with Client(c.config_path) as cl:
            meta = cl.metadata("dpm")
            assert meta.parameters["dp.epsilon"] == "2" and "skellam" in meta.parameters["dp.mechanism"]
            with torch.no_grad():
                ref = model(x).clamp(-4, 4).double().numpy()
            y = cl.infer("dpm", x.numpy())
            spent1 = float(cl.last_info["dp.epsilon_spent"])
            assert spent1 > 0
            assert not np.allclose(y, ref, atol=1e-3)  # noise was added
            assert np.abs(y - ref).max() < 200  # ...of the calibrated size, not garbage
            with pytest.raises(InvalidArgumentError):  # exact argmax would bypass the noise
                cl.infer("dpm", x.numpy(), outputs=("logits", "argmax"))
            # kill -9 party 1 right after it answered: the spend survives the restart
            c.kill("party1")
            c.start_party(1)
            b0, b1 = _budget(c, 0), _budget(c, 1)
            assert b1["epsilon_spent"] == pytest.approx(spent1, rel=1e-4) and b0["epsilon_spent"] == pytest.approx(spent1, rel=1e-4)
            answered = 1
            with pytest.raises(BudgetExhaustedError):
                for _ in range(40):
                    cl.infer("dpm", x.numpy())
                    answered += 1
            assert answered >= 2
        b0, b1 = _budget(c, 0), _budget(c, 1)
        assert b0["epsilon_spent"] == pytest.approx(b1["epsilon_spent"])  # all parties agree on the debit
        assert b0["epsilon_spent"] <= 6 + 1e-9
        for p in (0, 1):  # refused on every party, before any computation
            assert "RESOURCE_EXHAUSTED" in c.log_text(f"party{p}")
