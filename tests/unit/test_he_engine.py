"""CKKS evaluation in-process (TenSEAL): engine vs plaintext, flooding, and every check the
HE service makes before it evaluates (secret key, depth, keys, foreign ciphertexts,
session limits) — without gRPC."""

from __future__ import annotations

import numpy as np
import pytest
import tenseal as ts
import torch
from torch import nn

from secureinfer.errors import InvalidArgumentError, NotFoundError, PermissionDeniedError
from secureinfer.he.ckks import ClientContext, context_has_secret_key
from secureinfer.he.convert import Poly, Square, from_torch
from secureinfer.he.lower import lower
from secureinfer.he.model import HEModel, calibrate, forward
from secureinfer.he.packing import pack_inputs, unpack_outputs
from secureinfer.he.params import CkksParams, select_params
from secureinfer.he.service import HEService, ServiceLimits, SessionLimitError

RNG = np.random.default_rng(7)  # test data only (not secret)


class _svc:
    """HEService as a context manager (closes its scratch directory)."""

    def __init__(self, models, **kw) -> None:
        self.svc = HEService(models, **kw)

    def __enter__(self) -> HEService:
        return self.svc

    def __exit__(self, *exc) -> None:
        self.svc.close()


@pytest.fixture(scope="module")
def model() -> HEModel:
    torch.manual_seed(3)  # test weights only
    net = nn.Sequential(nn.Conv2d(1, 3, 3, stride=2, padding=1), Square(), nn.AvgPool2d(2), nn.Flatten(),
                        nn.Linear(12, 6), Poly([0.1, 0.5, 0.2]), nn.Linear(6, 4)).double()
    m = from_torch(net, (1, 8, 8), name="tiny")
    calibrate(m, RNG.uniform(0, 1, (64, 1, 8, 8)))
    return m


@pytest.fixture(scope="module")
def params(model: HEModel) -> CkksParams:
    return select_params(lower(model).depth, output_bound=model.output_bound)


@pytest.fixture(scope="module")
def client(params: CkksParams):
    with ClientContext(params) as c:
        yield c


def open_session(svc: HEService, client: ClientContext, model: HEModel, bp: int, *, owner: str = "client"):
    plan = svc.model(model.name).plan(client.params.slots, bp)
    steps = plan.galois_steps()
    return svc.open_session(owner=owner, model_name=model.name, bp=bp, scale_bits=client.params.scale_bits,
                            context=client.public_context_bytes(), galois_keys=client.galois_key_bytes(steps),
                            galois_steps=steps)


def encrypted(svc: HEService, s, client: ClientContext, model: HEModel, x: np.ndarray) -> tuple[np.ndarray, dict]:
    prog = svc.model(model.name).program
    blobs = client.encrypt(pack_inputs(prog, s.plan, x.reshape(x.shape[0], -1)))
    out, stats = svc.infer(s, batch_size=x.shape[0], fingerprint=client.fingerprint(), blobs=blobs)
    return unpack_outputs(s.plan, client.decrypt(out), x.shape[0]), stats


@pytest.mark.parametrize("bp", [1, 16, 4096])
def test_encrypted_matches_plaintext(model: HEModel, client: ClientContext, bp: int) -> None:
    with _svc([model]) as svc:
        s = open_session(svc, client, model, bp)
        x = RNG.uniform(0, 1, (min(bp, 5), 1, 8, 8))
        y, stats = encrypted(svc, s, client, model, x)
        ref = forward(model, x)
        assert np.abs(y - ref).max() < 1e-3
        assert (y.argmax(1) == ref.argmax(1)).all()
        assert stats["evaluate_ms"] > 0 and (stats["rotations"] == 0) == (bp == 4096)
        # the server holds only public material
        ctx = s.keep[0]
        assert not ctx.is_private() and not ctx.has_secret_key()


def test_flooding_stays_within_the_grid(model: HEModel, client: ClientContext) -> None:
    sigma = 2.0 ** -12
    with _svc([model], limits=ServiceLimits(flood_sigma=sigma)) as svc:
        s = open_session(svc, client, model, 8)
        x = RNG.uniform(0, 1, (8, 1, 8, 8))
        y, _ = encrypted(svc, s, client, model, x)
        y2, _ = encrypted(svc, s, client, model, x)
    ref = forward(model, x)
    err = np.abs(y - ref).max()
    assert 1e-5 < err < 8 * sigma  # noise is there, and within the tolerance it was sized for
    assert not np.array_equal(y, y2)  # fresh noise per request


def test_server_refuses_a_context_with_a_secret_key(model: HEModel, params: CkksParams) -> None:
    ctx = ts.context(ts.SCHEME_TYPE.CKKS, params.poly_modulus_degree, coeff_mod_bit_sizes=list(params.coeff_mod_bit_sizes))
    ctx.generate_relin_keys()
    private = ctx.serialize(save_secret_key=True)
    assert context_has_secret_key(private)
    assert not context_has_secret_key(ctx.serialize(save_secret_key=False))
    with _svc([model]) as svc:
        with pytest.raises(InvalidArgumentError, match="secret key"):
            svc.open_session(owner="c", model_name=model.name, bp=4096, scale_bits=params.scale_bits,
                             context=private, galois_keys=b"", galois_steps=[])


def test_too_shallow_parameters_and_missing_keys_are_refused(model: HEModel, client: ClientContext) -> None:
    shallow = CkksParams(8192, (40, 30, 30, 46), 30)
    with ClientContext(shallow) as c2, _svc([model]) as svc:
        with pytest.raises(InvalidArgumentError, match="needs 5 rescaling levels but the parameters allow 2"):
            svc.open_session(owner="c", model_name=model.name, bp=4096, scale_bits=30,
                             context=c2.public_context_bytes(), galois_keys=b"", galois_steps=[])
        with pytest.raises(InvalidArgumentError, match="Galois keys do not cover"):
            svc.open_session(owner="c", model_name=model.name, bp=1, scale_bits=client.params.scale_bits,
                             context=client.public_context_bytes(), galois_keys=b"", galois_steps=[])
        with pytest.raises(InvalidArgumentError, match="power of two"):
            svc.open_session(owner="c", model_name=model.name, bp=3, scale_bits=client.params.scale_bits,
                             context=client.public_context_bytes(), galois_keys=b"", galois_steps=[])


def test_foreign_or_corrupt_ciphertexts_get_clear_errors(model: HEModel, client: ClientContext,
                                                          params: CkksParams) -> None:
    x = RNG.uniform(0, 1, (2, 1, 8, 8))
    with _svc([model]) as svc, ClientContext(params) as other, \
            ClientContext(CkksParams(8192, (40, 30, 30, 46), 30)) as big:
        s = open_session(svc, client, model, 4096)
        prog = svc.model(model.name).program
        packed = pack_inputs(prog, s.plan, x.reshape(2, -1))
        # same parameters, another key: caught by the context fingerprint
        with pytest.raises(InvalidArgumentError, match="different CKKS context"):
            svc.infer(s, batch_size=2, fingerprint=other.fingerprint(), blobs=other.encrypt(packed))
        # other parameters (a shorter chain) under the right fingerprint: SEAL's validity check
        with pytest.raises(InvalidArgumentError, match="not valid for this session"):
            svc.infer(s, batch_size=2, fingerprint=client.fingerprint(), blobs=big.encrypt(packed))
        good = client.encrypt(packed)
        with pytest.raises(InvalidArgumentError, match="not valid for this session"):
            svc.infer(s, batch_size=2, fingerprint=client.fingerprint(),
                      blobs=[good[0][:-100] + bytes(100)] + good[1:])
        with pytest.raises(InvalidArgumentError, match="input ciphertexts"):
            svc.infer(s, batch_size=2, fingerprint=client.fingerprint(), blobs=good[:-1])
        y, _ = encrypted(svc, s, client, model, x)  # the session still works afterwards
        assert np.abs(y - forward(model, x)).max() < 1e-3


def test_session_limits_expiry_and_ownership(model: HEModel, client: ClientContext) -> None:
    now = [0.0]
    with _svc([model], limits=ServiceLimits(max_sessions=1, idle_timeout_s=10.0), clock=lambda: now[0]) as svc:
        s = open_session(svc, client, model, 4096)
        with pytest.raises(SessionLimitError):
            open_session(svc, client, model, 4096)
        with pytest.raises(PermissionDeniedError):
            svc.session(s.id, owner="someone-else")
        now[0] = 11.0
        with pytest.raises(NotFoundError, match="expired"):
            svc.session(s.id, owner="client")
        s2 = open_session(svc, client, model, 4096)  # the expired one was swept
        assert svc.close_session(s2.id, owner="client") and svc.n_sessions == 0
    with _svc([model], limits=ServiceLimits(max_session_bytes=1000)) as svc:
        with pytest.raises(SessionLimitError, match="exceed"):
            open_session(svc, client, model, 4096)


def test_galois_keys_must_really_cover_the_claimed_steps(model: HEModel, client: ClientContext) -> None:
    with _svc([model]) as svc:
        plan = svc.model(model.name).plan(client.params.slots, 1)
        steps = plan.galois_steps()
        with pytest.raises(InvalidArgumentError, match="do not contain rotation steps"):
            svc.open_session(owner="c", model_name=model.name, bp=1, scale_bits=client.params.scale_bits,
                             context=client.public_context_bytes(), galois_keys=client.galois_key_bytes(steps[:1]),
                             galois_steps=steps)


def test_admission_control_bounds_concurrent_requests(model: HEModel) -> None:
    from secureinfer.errors import DeadlineExceededError

    with _svc([model], limits=ServiceLimits(max_concurrent=1)) as svc:
        with svc.request_slot(timeout_s=1.0):
            with pytest.raises(DeadlineExceededError, match="busy"):
                with svc.request_slot(timeout_s=0.05):
                    pass
        with svc.request_slot(timeout_s=0.05):  # released again
            pass
