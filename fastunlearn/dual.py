"""Update rules for Saddle's Lagrange multiplier λ (docs/methods.md, "Saddle's multiplier").

Both see, after every optimiser step, the forget gap G_t of that step (all-reduced over ranks), the
original model's gap G0 and the constraint level τ (absolute, τ = saddle.tau · G0), and return the
λ of the next step. They hold plain floats, so a checkpoint restores them exactly.

    ga  (gradient ascent on the dual, the rule of fastunlearn ≤ 0.1; pure integral control):
            Ĝ_t = γ Ĝ_{t−1} + (1 − γ) G_t,  Ĝ_{−1} = G0
            λ_{t+1} = clip(λ_t + (η_λ / G0)(Ĝ_t − τ), 0, λ_max),  λ_0 = λ_init

    pi  (proportional-integral, positional form, anti-windup on the integral):
            e_t = (G_t − τ) / G0
            ξ_t = ν ξ_{t−1} + (1 − ν) e_t,               ξ_{−1} = (G0 − τ) / G0
            I_t = clip(I_{t−1} + κ_i e_t, 0, λ_max),     I_{−1} = λ_init
            λ_{t+1} = clip(I_t + κ_p ξ_t, 0, λ_max),     λ_0 = clip(I_{−1} + κ_p ξ_{−1}, 0, λ_max)

`PIDualVec` is `pi` on a vector of errors, one controller per element (Saddle's neighbour-group multipliers μ_g,
fastunlearn.saddle_groups); on one element it is `PIDual` exactly.

With no clipping active, `pi` is the νPI optimizer (Sohrabi et al. 2024; `cooper.optim.nuPI`, lr 1,
Kp = κ_p, Ki = κ_i, ema_nu = ν, maximize) started at λ_0 with its smoothed error set to ξ_{−1}
(tests/test_dual.py checks this). It is written out here rather than taken from cooper because of
the clipping: cooper projects λ itself, so an integral that hits 0 keeps its history in the
proportional term, while here the integral alone is clipped (anti-windup) and λ is clipped again.
"""
from __future__ import annotations


def _clip(x: float, hi: float) -> float:
    return min(max(x, 0.0), hi)


class GADual:
    """Today's rule: λ integrates the smoothed error Ĝ − τ (scaled by η_λ / G0)."""

    def __init__(self, g0: float, tau: float, eta: float, lambda_init: float, lambda_max: float, gap_ema: float):
        self.g0, self.tau, self.eta, self.lambda_max, self.gap_ema = g0, tau, eta, lambda_max, gap_ema
        self.lam = lambda_init
        self.g_hat = g0

    def update(self, G: float) -> float:
        self.g_hat = self.gap_ema * self.g_hat + (1 - self.gap_ema) * G
        self.lam = _clip(self.lam + (self.eta / self.g0) * (self.g_hat - self.tau), self.lambda_max)
        return self.lam

    def parts(self) -> dict:
        return {"lam": self.lam, "gap": self.g_hat / self.g0}

    def state_dict(self) -> dict:
        return {"lam": self.lam, "g_hat": self.g_hat}

    def load_state_dict(self, state: dict) -> None:
        self.lam, self.g_hat = state["lam"], state["g_hat"]


class PIDual:
    """λ = I + κ_p ξ: an integral I of the error (clipped: no windup) plus a proportional part on the
    error's running mean ξ."""

    def __init__(self, g0: float, tau: float, kappa_p: float, kappa_i: float, nu: float, lambda_init: float,
                 lambda_max: float):
        self.g0, self.tau, self.kp, self.ki, self.nu, self.lambda_max = g0, tau, kappa_p, kappa_i, nu, lambda_max
        self.xi = (g0 - tau) / g0
        self.integral = lambda_init
        self.lam = _clip(self.integral + self.kp * self.xi, lambda_max)

    def update(self, G: float) -> float:
        e = (G - self.tau) / self.g0
        self.xi = self.nu * self.xi + (1 - self.nu) * e
        self.integral = _clip(self.integral + self.ki * e, self.lambda_max)
        self.lam = _clip(self.integral + self.kp * self.xi, self.lambda_max)
        return self.lam

    def parts(self) -> dict:
        return {"lam": self.lam, "lam_P": self.kp * self.xi, "lam_I": self.integral, "gap": self.xi + self.tau / self.g0}

    def state_dict(self) -> dict:
        return {"lam": self.lam, "xi": self.xi, "integral": self.integral}

    def load_state_dict(self, state: dict) -> None:
        self.lam, self.xi, self.integral = state["lam"], state["xi"], state["integral"]


class PIDualVec:
    """One `PIDual` controller per element: Saddle's group multipliers μ_g (fastunlearn.saddle_groups). Element k
    sees the error e_k = (x_k − level_k) / scale_k and starts from ξ_{−1,k} = (start_k − level_k) / scale_k, with
    the same gains, the same clips and the same arithmetic as `PIDual`, so that PIDualVec([G0], [τ], [G0], …)
    gives PIDual(G0, τ, …)'s λ bit for bit (tests/test_dual.py)."""

    def __init__(self, scale, level, start, kappa_p: float, kappa_i: float, nu: float, lambda_init: float,
                 lambda_max: float):
        self.scale, self.level = [float(s) for s in scale], [float(v) for v in level]
        self.kp, self.ki, self.nu, self.lambda_max = kappa_p, kappa_i, nu, lambda_max
        self.xi = [(float(s) - v) / c for s, v, c in zip(start, self.level, self.scale)]
        self.integral = [lambda_init] * len(self.xi)
        self.lam = [_clip(i + self.kp * x, lambda_max) for i, x in zip(self.integral, self.xi)]

    def update(self, values) -> list[float]:
        for k, x in enumerate(values):
            e = (float(x) - self.level[k]) / self.scale[k]
            self.xi[k] = self.nu * self.xi[k] + (1 - self.nu) * e
            self.integral[k] = _clip(self.integral[k] + self.ki * e, self.lambda_max)
            self.lam[k] = _clip(self.integral[k] + self.kp * self.xi[k], self.lambda_max)
        return list(self.lam)

    def parts(self) -> dict:
        return {"lam": list(self.lam), "lam_P": [self.kp * x for x in self.xi], "lam_I": list(self.integral)}

    def state_dict(self) -> dict:
        return {"lam": list(self.lam), "xi": list(self.xi), "integral": list(self.integral)}

    def load_state_dict(self, state: dict) -> None:
        self.lam, self.xi, self.integral = list(state["lam"]), list(state["xi"]), list(state["integral"])
