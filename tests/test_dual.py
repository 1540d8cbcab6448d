"""Saddle's multiplier updates (fastunlearn.dual; docs/methods.md, "Saddle's multiplier")."""
from __future__ import annotations

import random

import pytest
import torch

from fastunlearn.dual import GADual, PIDual


def test_pi_rule_against_a_hand_computed_sequence():
    # G0 = 2, τ = 0.4 (tau 0.2): ξ_{-1} = 0.8; κ_p 0.5, κ_i 0.1, ν 0.5, λ_init 0, λ_max 1
    d = PIDual(g0=2.0, tau=0.4, kappa_p=0.5, kappa_i=0.1, nu=0.5, lambda_init=0.0, lambda_max=1.0)
    assert d.lam == pytest.approx(0.4)                         # clip(0 + 0.5·0.8)
    # G = 1.4: e = 0.5, ξ = 0.65, I = 0.05, λ = 0.05 + 0.325
    assert d.update(1.4) == pytest.approx(0.375)
    # G = 4.4: e = 2.0, ξ = 1.325, I = 0.25, λ = clip(0.25 + 0.6625) = 0.9125
    assert d.update(4.4) == pytest.approx(0.9125)
    # G = 10.4: e = 5, ξ = 3.1625, I = clip(0.75) = 0.75, λ = clip(0.75 + 1.58125, ≤ 1) = 1
    assert d.update(10.4) == 1.0 and d.integral == pytest.approx(0.75)
    # G = 0: e = -0.2, ξ = 1.48125, I = 0.73, λ = clip(0.73 + 0.740625) = 1
    assert d.update(0.0) == 1.0 and d.integral == pytest.approx(0.73)
    # G = 0 four more times: ξ halves towards -0.2, I falls by 0.02 per step
    for _ in range(4):
        d.update(0.0)
    xi = 1.48125
    for _ in range(4):
        xi = 0.5 * xi + 0.5 * -0.2
    assert d.xi == pytest.approx(xi) and d.integral == pytest.approx(0.65)
    assert d.lam == pytest.approx(0.65 + 0.5 * xi)
    # far below τ for long: the integral stops at 0 (anti-windup), so does λ
    for _ in range(200):
        d.update(0.0)
    assert d.integral == 0.0 and d.lam == 0.0
    assert d.update(2.0) == pytest.approx(0.1 * 0.8 + 0.5 * (0.5 * -0.2 + 0.5 * 0.8))  # and it recovers at once


def old_rule(gs, g0, tau, eta, lam, lam_max, rho):
    """fastunlearn 0.1's Saddle.after_step, as it was written."""
    g_hat, out = g0, []
    for g in gs:
        g_hat = rho * g_hat + (1 - rho) * float(g)
        lam = min(max(lam + (eta / g0) * (g_hat - tau), 0.0), lam_max)
        out.append(lam)
    return out


def test_ga_reproduces_the_previous_rule_exactly():
    rng = random.Random(0)
    gs = [rng.uniform(0, 3) for _ in range(300)] + [0.0] * 100
    d = GADual(g0=1.7, tau=0.34, eta=0.1, lambda_init=1.0, lambda_max=10.0, gap_ema=0.9)
    assert [d.update(g) for g in gs] == old_rule(gs, 1.7, 0.34, 0.1, 1.0, 10.0, 0.9)


def test_pi_equals_cooper_nupi_when_no_clip_is_active():
    """With the same gains, νPI (cooper.optim.nuPI, lr 1, maximize) started at λ_0 with its smoothed
    error set to ξ_{-1} gives the same λ sequence as PIDual while neither clip is active."""
    cooper = pytest.importorskip("cooper")  # in the dev extra
    g0, tau, kp, ki, nu = 1.5, 0.3, 0.5, 0.01, 0.9
    d = PIDual(g0, tau, kp, ki, nu, lambda_init=0.2, lambda_max=10.0)
    lam = torch.nn.Parameter(torch.tensor([d.lam], dtype=torch.float64))
    f64 = dict(dtype=torch.float64)
    opt = cooper.optim.nuPI([lam], lr=1.0, Kp=torch.tensor(kp, **f64), Ki=torch.tensor(ki, **f64), ema_nu=nu, init_type=cooper.optim.nuPIInitType.ZEROS,
                            maximize=True)
    opt.state[lam]["xi"] = torch.tensor([(g0 - tau) / g0], dtype=torch.float64)
    rng = random.Random(1)
    ours, theirs = [], []
    for _ in range(300):
        g = rng.uniform(0.0, 2.5)
        ours.append(d.update(g))
        lam.grad = torch.tensor([(g - tau) / g0], dtype=torch.float64)  # ∂L/∂λ = (G − τ), in units of G0
        opt.step()
        theirs.append(float(lam.detach()))
        assert 0 < d.integral < 10 and 0 < d.lam < 10  # the comparison holds only without clipping
    assert ours == pytest.approx(theirs, rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("cls,kw", [(PIDual, dict(kappa_p=0.5, kappa_i=0.01, nu=0.9)),
                                    (GADual, dict(eta=0.1, gap_ema=0.9))])
def test_state_dict_restores_the_controller_exactly(cls, kw):
    rng = random.Random(2)
    gs = [rng.uniform(0, 2) for _ in range(60)]
    a = cls(g0=1.1, tau=0.22, lambda_init=0.0, lambda_max=10.0, **kw)
    for g in gs[:30]:
        a.update(g)
    b = cls(g0=1.1, tau=0.22, lambda_init=0.0, lambda_max=10.0, **kw)
    b.load_state_dict(a.state_dict())
    assert [a.update(g) for g in gs[30:]] == [b.update(g) for g in gs[30:]]
