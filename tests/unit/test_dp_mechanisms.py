"""Reference mechanisms: clipping, calibration, events, noisy argmax, per-party shares."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest

from secureinfer.dp import accountant as A
from secureinfer.dp import mechanisms as M
from secureinfer.errors import InvalidArgumentError
from secureinfer.prg import Prg


def prg(tag: int = 0) -> Prg:
    return Prg(bytes([tag]) * 32)


def test_clip_and_sensitivity() -> None:
    v = np.array([-10, -3, 0, 3, 10], dtype=np.int64)
    assert M.clip(v, bound=3).tolist() == [-3, -3, 0, 3, 3]
    assert M.clip_sensitivity(clip_bound=3, dim=5) == (30, 180)
    with pytest.raises(InvalidArgumentError):
        M.clip(np.array([0.5]), bound=1)
    with pytest.raises(InvalidArgumentError):
        M.clip(v, bound=0)


def test_calibration_meets_the_target() -> None:
    lap = M.LaplaceMechanism.for_epsilon(0.3, l1_sensitivity=2 << 16)
    assert lap.event().epsilon <= 0.3 and lap.event().epsilon == pytest.approx(0.3, rel=1e-6)
    gau = M.GaussianMechanism.for_epsilon_delta(1.0, 1e-6, l2_sensitivity_sq=(1 << 16) ** 2)
    eps = A.epsilon_for_delta(gau.event(), 1e-6)
    assert eps <= 1.0 and eps == pytest.approx(1.0, rel=1e-3)
    ske = M.SkellamMechanism.for_epsilon_delta(2.0, 1e-5, l1_sensitivity=100, l2_sensitivity_sq=100 * 100)
    eps = A.epsilon_for_delta(ske.event(), 1e-5)
    assert eps <= 2.0 and eps == pytest.approx(2.0, rel=1e-3)
    rho = M.GaussianMechanism.for_rho(0.5, l2_sensitivity_sq=4)
    assert rho.sigma2 == 4 and rho.event().rho == pytest.approx(0.5)


def test_perturb_logits() -> None:
    logits = np.array([[5 << 16, -(9 << 16), 1 << 15]], dtype=np.int64)
    c = 2 << 16
    l1, _ = M.clip_sensitivity(clip_bound=c, dim=3)
    mech = M.LaplaceMechanism.for_epsilon(1.0, l1_sensitivity=l1)
    noisy, ev = M.perturb(prg(1), logits, mechanism=mech, clip_bound=c)
    assert noisy.shape == logits.shape and noisy.dtype == np.int64
    assert ev.epsilon == pytest.approx(1.0, rel=1e-6)
    assert 0.0 <= ev.delta < 1e-300
    with pytest.raises(InvalidArgumentError):  # calibrated for fewer coordinates than released
        M.perturb(prg(1), np.zeros((1, 4), dtype=np.int64), mechanism=mech, clip_bound=c)


def test_noisy_argmax_votes() -> None:
    votes = np.array([[0, 250, 3, 1], [90, 2, 1, 0]], dtype=np.int64)
    mech = M.LaplaceMechanism.for_epsilon(0.5, l1_sensitivity=2)  # scale 4: margins of ~90 survive
    winners, ev = M.noisy_argmax(prg(2), votes, mechanism=mech)
    assert winners.tolist() == [1, 0]
    assert ev.count == 2 and ev.epsilon == pytest.approx(1.0)
    gmech = M.GaussianMechanism.for_rho(0.1, l2_sensitivity_sq=2)
    winners, ev = M.noisy_argmax(prg(3), votes, mechanism=gmech)
    assert winners.tolist() == [1, 0] and ev.rho == pytest.approx(0.2)
    with pytest.raises(InvalidArgumentError):
        M.noisy_argmax(prg(2), votes, mechanism=M.LaplaceMechanism(Fraction(4), 1))


def test_noise_shares_per_party() -> None:
    lap = M.LaplaceMechanism(Fraction(3), 1, collusion_threshold=1)
    shares = [M.draw_noise_share(Prg.derived(bytes(32), f"party-{i}"), lap, 3, 1000) for i in range(3)]
    assert all(s.shape == (1000,) and s.dtype == np.int64 for s in shares)
    assert not np.array_equal(shares[0], shares[1])
    # t = 1 of 3: each share is NB(1/2) - NB(1/2), so the total has 3/2 of the declared variance
    q = math.exp(-1 / 3)
    assert lap.total_variance(3) == pytest.approx(1.5 * 2 * q / (1 - q) ** 2)
    sk = M.SkellamMechanism(Fraction(40), 1, 1)
    assert sk.total_variance(3) == pytest.approx(3 * 80)  # default t = n - 1: a full copy each
    assert M.draw_noise_share(prg(4), sk, 3, (2, 3)).shape == (2, 3)
    gau = M.GaussianMechanism(Fraction(9), 1)
    assert M.draw_noise_share(prg(5), gau, 2, 4).shape == (4,)
    with pytest.raises(InvalidArgumentError):
        M.draw_noise_share(prg(5), M.GaussianMechanism(Fraction(9), 1, collusion_threshold=0), 2, 4)
    with pytest.raises(InvalidArgumentError):
        M.draw_noise_share(prg(5), M.LaplaceMechanism(Fraction(3), 1, collusion_threshold=3), 3, 4)


def test_release_event_charges_overflow() -> None:
    huge = M.LaplaceMechanism(Fraction(1 << 58), 1)
    ev = M.release_event(huge, size=10, value_bound=1 << 62, n_parties=3)
    assert ev.delta > 1e-3
    small = M.SkellamMechanism(Fraction(10**6), 1, 1)
    assert M.release_event(small, size=10, value_bound=1 << 20, n_parties=3).delta == 0.0
    with pytest.raises(InvalidArgumentError):
        M.release_event(small, size=1, value_bound=1 << 63)


def test_mechanism_validation() -> None:
    for fn in (
        lambda: M.LaplaceMechanism(Fraction(0), 1),
        lambda: M.LaplaceMechanism(Fraction(1), -1),
        lambda: M.GaussianMechanism(Fraction(-1), 1),
        lambda: M.SkellamMechanism(Fraction(1), 1.5, 1),  # type: ignore[arg-type]
        lambda: M.LaplaceMechanism.for_epsilon(0.0, l1_sensitivity=1),
        lambda: M.round_up(-1),
    ):
        with pytest.raises(InvalidArgumentError):
            fn()
    assert M.round_up(Fraction(1, 3)) == Fraction(21846, 65536)
    assert M.round_up(2**21 + 0.5) == 2**21 + 1
