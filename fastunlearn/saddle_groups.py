"""Saddle with neighbour groups (issue 26; docs/methods.md, "Saddle with neighbour groups").

A mean retain loss lets the nearest neighbour drift while the far ones hold it down. `saddle.retain` picks R's form:

    mean         L = R + λ (G − τ)                                                     (Saddle as before, bit for bit)
    constraints  L = κ_R · R + λ (G − τ) + Σ_{g ∈ B} μ_g (R_g − ρ_g)                   (κ_R = saddle.retain_weight)
    dro          L = Σ_{g ∈ B} w_g R_g / Σ_{g ∈ B} w_g + U + λ (G − τ)

with, over the micro-batch's retain rows of group g (B: the groups with rows in the micro-batch),

    R_g(θ) = mean_{i ∈ g} ‖ε_θ(x_t^i, c_r^i) − y_r^i‖²,   y_r = ε_θ0(x_t, c_r) (or ε with retain_target noise)

and U = ‖ε_θ(x_t^{f∪r}, ∅) − ε_θ0(x_t^{f∪r}, ∅)‖², R's unconditional line. Everything comes from the outputs of the
step's one student call and one teacher call (Method.r_and_g): no model call is added.

Before training, at θ0, on fixed retain batches (steps −1000, −1001, …: at least saddle.g0_batches of them, and
until every group has retain_batch_size rows over all ranks) each group's start R_g(θ0) (0 against the teacher)
and its reference D_g = mean_{i ∈ g} ‖ε_θ0(x_t^i, c_r^i) − ε_θ0(x_t^i, ∅)‖², how far its prompts move the original
model's prediction, are measured; the bound is ρ_g = R_g(θ0) + saddle.rho · D_g.

After each optimiser step, each group with rows in the step (over micro-batches and ranks, pooled) updates its running
mean R̄_g ← γ R̄_g + (1 − γ) R_g (γ = saddle.group_ema, R̄_g starting at R_g(θ0)); then

    constraints  μ = PIDualVec(scale D, level ρ, start R(θ0)).update(R̄): the PI rule of λ on e_g = (R̄_g − ρ_g)/D_g,
                 gains saddle.mu_kappa_p, mu_kappa_i, ν = saddle.nu, clipped to [0, saddle.mu_max]; μ starts at 0
    dro          w_g ← w_g exp(η (R̄_g − R_g(θ0))/D_g) / Σ_h w_h exp(η (R̄_h − R_h(θ0))/D_h),  η = saddle.dro_eta,
                 w starting uniform: exponentiated gradient on the groups' relative drift (Sagawa et al. 2020)
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .dual import PIDualVec
from .errors import FastUnlearnError
from .groups import log_key
from .settings import num

RETAIN_MODES = ("mean", "constraints", "dro")
REFERENCE_STEP = -1000     # the reference batches are make_step(-1000 - b, 0): none of another probe's
REFERENCE_MORE = 64        # batches drawn beyond g0_batches, at most, for every group to have its rows


@dataclass
class GroupSettings:
    """Saddle's settings for neighbour groups (a base of methods.SaddleConfig: the keys are `saddle.*`). The
    defaults are first guesses; the sweeps on tuning tasks (docs/methods.md) found no value that beats `mean` with
    the `esd` target. With the styles world's anchor target, `constraints` at retain_weight 1, rho 0.02 did, and
    that world's Saddle default uses it (fastunlearn.worlds.styles.World.group_method_defaults)."""

    retain: str = "mean"                     # R's form: mean | constraints (R_g <= rho_g per group) | dro (worst group)
    retain_weight: float = num(0.1, 0)       # constraints: κ_R, the weight of the mean R in the objective
    rho: float = num(0.05, above=0)          # constraints: ρ_g = R_g(θ0) + rho · D_g (D_g: the group's reference)
    mu_kappa_p: float = num(1.0, 0)          # constraints: the group multipliers' PI gains (their ν is saddle.nu)
    mu_kappa_i: float = num(0.05, 0)
    mu_max: float = num(10.0, above=0)       # constraints: μ_g is clipped to [0, mu_max]
    dro_eta: float = num(1.0, 0)             # dro: step size of the group weights' exponentiated gradient
    group_ema: float = num(0.9, 0, 1)        # decay of each group's running R̄_g (the multipliers' and weights' input)

    def check_groups(self, prefix: str) -> None:
        if self.retain not in RETAIN_MODES:
            raise FastUnlearnError(f"{prefix}retain must be one of {', '.join(RETAIN_MODES)}, got {self.retain!r}")
        if self.group_ema >= 1:
            raise FastUnlearnError(f"{prefix}group_ema must be below 1 (got {self.group_ema}): R̄_g would never move")


def per_row(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """‖a_i − b_i‖² of each row: the per-element mean square, in fp32."""
    return (a.float() - b.float()).pow(2).flatten(1).mean(1)


class SaddleGroups:
    """Saddle's retain side per neighbour group: the references, the objective's group terms, the multipliers μ_g
    (constraints) or weights w_g (dro), their logs, checkpoint state and report. Made by Saddle.setup."""

    def __init__(self, saddle, ctx, mse):
        self.saddle, self.args, self.ctx, self.mse = saddle, saddle.args, ctx, mse
        self.mode = self.args.retain
        if ctx.retain_groups is None:
            raise FastUnlearnError(f"saddle.retain {self.mode} needs neighbour groups of the retain prompts: give "
                                   "--retain-prompts once per group, or a retain file of `group: prompt` lines")
        self.index = ctx.retain_groups
        self.names = list(self.index.names)
        self.keys = [log_key(n) for n in self.names]
        self.r0, self.d = self.reference()
        self.rho = [r + self.args.rho * d for r, d in zip(self.r0, self.d)]
        self.r_bar = list(self.r0)
        self.w = [1.0 / len(self.names)] * len(self.names)
        self.dual = self.make_dual() if self.mode == "constraints" else None
        self.trace = []             # [step, [μ_g or w_g]] after every step
        self._acc, self._micro = None, 0

    def make_dual(self) -> PIDualVec:
        a = self.args
        return PIDualVec(self.d, self.rho, self.r0, a.mu_kappa_p, a.mu_kappa_i, a.nu, 0.0, a.mu_max)

    @property
    def values(self) -> list[float]:
        """The multipliers μ_g (constraints) or the weights w_g (dro), one per group."""
        return list(self.dual.lam) if self.dual is not None else list(self.w)

    @torch.no_grad()
    def reference(self) -> tuple[list[float], list[float]]:
        """(R_g(θ0), D_g) per group, on the teacher, averaged over the rows of fixed retain batches and all ranks."""
        ctx, cfg, K = self.ctx, self.saddle.cfg, len(self.names)
        total, b = None, 0
        while True:
            st = ctx.make_step(REFERENCE_STEP - b, 0)
            T_c, T_u = ctx.teacher((st.x_r, st.t_r, st.c_r), (st.x_r, st.t_r, st.null(len(st.x_r))))
            y = st.eps_r if cfg.retain_target == "noise" else T_c
            dev = T_c.device
            rows = torch.stack([torch.ones(len(T_c), device=dev), per_row(T_c, y), per_row(T_c, T_u)]).double()
            part = torch.zeros(3, K, dtype=torch.float64, device=dev).index_add_(1, self.index.rows(st.c_r).to(dev),
                                                                                  rows)
            ctx.all_reduce_sum_(part)
            total = part if total is None else total + part
            b += 1
            short = [n for n, c in zip(self.names, total[0].tolist()) if c < cfg.retain_batch_size]
            if b >= self.args.g0_batches and not short:
                break
            if b >= self.args.g0_batches + REFERENCE_MORE:
                raise FastUnlearnError(f"saddle.retain: retain group {short[0]!r} has fewer than {cfg.retain_batch_size} "
                                       f"rows in {b} retain batches; give it more prompts or retain_samples_per_prompt")
        count, r0, d = total.cpu().tolist()
        r0, d = [r / c for r, c in zip(r0, count)], [x / c for x, c in zip(d, count)]
        for name, x in zip(self.names, d):
            if not x > 0:
                raise FastUnlearnError(f"saddle.retain: retain group {name!r} has a zero reference D_g = {x}: the "
                                       "original model's prediction does not depend on its prompts")
        return r0, d

    # ---- a micro-batch ---------------------------------------------------------------------------------------
    def loss(self, st):
        s = self.saddle
        keep: dict = {}
        R, G = s.r_and_g(st, keep)
        y = st.eps_r if s.cfg.retain_target == "noise" else keep["T_r"]
        per = per_row(keep["s_r"], y)
        g = self.index.rows(st.c_r).to(per.device)
        K = len(self.names)
        count = torch.zeros(K, device=per.device).index_add_(0, g, torch.ones_like(per))
        sums = torch.zeros(K, device=per.device).index_add_(0, g, per)
        R_g, present = sums / count.clamp(min=1), count > 0
        self._accumulate(count.detach(), sums.detach())
        forget = s.lam * (G - s.tau)
        values = torch.tensor(self.values, device=per.device)
        if self.mode == "constraints":
            rho = torch.tensor(self.rho, device=per.device)
            penalty = torch.where(present, values * (R_g - rho), torch.zeros_like(R_g)).sum()
            return self.args.retain_weight * R + forget + penalty, {"R": R, "G": G}
        w = values * present
        R_dro = (w * R_g).sum() / w.sum() + self.mse(keep["s_u"], [keep["T_u"]])
        return R_dro + forget, {"R": R, "G": G, "R_dro": R_dro}

    def _accumulate(self, count, sums):
        """The step's per-group row counts and loss sums, over its micro-batches (a step skipped as non-finite
        never reaches after_step: the next step's first micro-batch starts afresh)."""
        if self._acc is None or self._micro >= self.saddle.cfg.gradient_accumulation_steps:
            self._acc, self._micro = torch.zeros(2, len(self.names), dtype=torch.float64, device=count.device), 0
        self._acc += torch.stack([count, sums]).double()
        self._micro += 1

    # ---- after the optimiser step ----------------------------------------------------------------------------
    def after_step(self, logs: dict, step: int) -> None:
        acc = self._acc if self._acc is not None else torch.zeros(2, len(self.names), dtype=torch.float64)
        self._acc, self._micro = None, 0
        self.ctx.all_reduce_sum_(acc)  # pooled over ranks, as G is
        count, sums = acc.cpu().tolist()
        gamma = self.args.group_ema
        for k, (n, total) in enumerate(zip(count, sums)):
            if n > 0:  # a group without rows this step keeps its running mean
                self.r_bar[k] = gamma * self.r_bar[k] + (1 - gamma) * (total / n)
        if self.dual is not None:
            self.dual.update(self.r_bar)
            name = "mu"
        else:
            x = [self.args.dro_eta * (r - r0) / d for r, r0, d in zip(self.r_bar, self.r0, self.d)]
            top = max(x)
            w = [wk * math.exp(xk - top) for wk, xk in zip(self.w, x)]
            self.w = [v / sum(w) for v in w]
            name = "w"
        values = self.values
        self.trace.append([step, [round(v, 6) for v in values]])
        for key, r, v in zip(self.keys, self.r_bar, values):
            logs[f"R_g/{key}"], logs[f"{name}_g/{key}"] = r, v
        logs["R_max"], logs[f"{name}_max"] = max(self.r_bar), max(values)

    # ---- checkpoint and report -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {"names": self.names, "r0": self.r0, "d": self.d, "rho": self.rho, "r_bar": self.r_bar, "w": self.w,
                "dual": self.dual.state_dict() if self.dual is not None else None, "trace": self.trace}

    def load_state_dict(self, state: dict) -> None:
        if state["names"] != self.names:
            raise FastUnlearnError(f"the checkpoint's retain groups ({', '.join(state['names'])}) are not this run's "
                                   f"({', '.join(self.names)}): pass --overwrite to start over")
        for k in ("r0", "d", "rho", "r_bar", "w", "trace"):
            setattr(self, k, state[k])
        if self.mode == "constraints":
            self.dual = self.make_dual()
            self.dual.load_state_dict(state["dual"])

    def report(self) -> dict:
        which = "multiplier" if self.dual is not None else "weight"
        return {"retain_loss_by_group": dict(zip(self.names, self.r_bar)),
                "retain_groups": {"mode": self.mode, "source": self.index.source, "names": self.names,
                                  "reference_by_group": dict(zip(self.names, self.d)),
                                  "start_by_group": dict(zip(self.names, self.r0)),
                                  **({"bound_by_group": dict(zip(self.names, self.rho))} if self.dual is not None else {}),
                                  f"{which}_by_group": dict(zip(self.names, self.values)),
                                  f"{which}_trace": self.trace}}
