"""Security regression (issue 14, finding 6) through real parties: batch sizes a client
cycles through are bucketed, a batch too large for the dealer's cap is refused with a
clear error before any material is built, and one client's requests in flight are capped
— and after every refusal the next request works."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from torch import nn

from secureinfer.client.sdk import Client, deploy
from secureinfer.errors import ResourceExhaustedError, ShapeError
from secureinfer.localcluster import LocalCluster

pytestmark = pytest.mark.timeout(600)


def test_batch_limits_through_real_parties(tmp_path) -> None:
    torch.manual_seed(0)  # test weights, not secret
    model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))
    env = {"SECUREINFER_DEALER_MAX_SET_BYTES": str(4 << 20), "SECUREINFER_MAX_CLIENT_REQUESTS": "2"}
    with LocalCluster(tmp_path, env=env) as c:
        deploy(model, torch.rand(1, 16), name="m", config=c.config_path)
        with Client(c.config_path) as cl:
            for batch in (3, 9, 13, 27):  # padded to buckets 3, 10, 14, 28: results still row for row
                x = torch.rand(batch, 16)
                with torch.no_grad():
                    ref = model(x).double().numpy()
                y = cl.infer("m", x.numpy())
                assert y.shape == ref.shape and np.abs(y - ref).max() < 1e-2
            with pytest.raises(ResourceExhaustedError, match="cap of 4 MiB per request; send batches of at most"):
                cl.infer("m", np.zeros((4096, 16)))
            with pytest.raises(ShapeError, match="at most 4096 rows"):
                cl.infer("m", np.zeros((4097, 16)))
            # many requests at once from one client: beyond 2 in flight they are refused
            errors: list[BaseException] = []
            start = threading.Barrier(8)

            def one() -> None:
                start.wait()
                for _ in range(3):
                    try:
                        cl.infer("m", np.random.rand(24, 16))  # test input, not secret
                    except ResourceExhaustedError as exc:
                        errors.append(exc)

            threads = [threading.Thread(target=one) for _ in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(timeout=300)
            assert errors and all("in flight" in str(e) for e in errors)
            x = torch.rand(2, 16)
            with torch.no_grad():
                ref = model(x).double().numpy()
            assert np.abs(cl.infer("m", x.numpy()) - ref).max() < 1e-2  # nothing was left stuck
        assert '"padded": 28' in c.log_text("party0")
