"""The unlearning methods (docs/methods.md): each a short combination of the one loss primitive
(`fastunlearn.ops.noise_prediction_loss`, docs/kernels.md).

Every method sees a `Step`: the noised forget and retain latents of one micro-batch and two
callables, `step.student(*items)` and `step.teacher(*items)`, each of which runs all the
(x_t, prompts) items it is given in ONE UNet call. Most methods make one call of each per step;
CA and SalUn call the student a second time (no gradient) for their target, and EraseDiff makes
K + 1 more calls of the student's module for its inner loop (docs/methods.md lists them).

The shared pieces are

    R(θ)  retain distillation + unconditional branch pinned to the teacher   (`retain_from`)
    G(θ)  forget gap against the configured forget target                    (`forget_target`)

and each method is a few lines over them. Losses are in the model's output space (epsilon
or v-prediction: the teacher predicts in the same space, and the denoising targets `eps_*` are
converted to it by the trainer).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .config import register_method
from .errors import FastUnlearnError
from .ops import noise_prediction_loss
from .saddle_groups import GroupSettings, SaddleGroups
from .settings import num
from .step import Context, Step  # noqa: F401  (a method's view of the run: fastunlearn.step)
from .uce import RECE, UCE

if TYPE_CHECKING:
    from .config import TrainConfig


def mse(student, targets, coeffs=None, weights=None):
    """The primitive with per-sample coefficients broadcast from a list (one value per target)."""
    B = student.shape[0]
    if coeffs is None:
        coeffs = [1.0] * len(targets)
    c = torch.tensor(coeffs, dtype=torch.float32, device=student.device).expand(B, -1)
    return noise_prediction_loss(student, list(targets), c, weights, check_finite=False)  # the trainer skips non-finite steps


class Method:
    """Base: R + forget target plumbing. Subclasses define `loss`, and `Config` if they have settings
    (a dataclass; its section in the run's config is the method's name)."""

    name = ""
    Config = None
    needs_full_gradient = False  # True: cannot run with ZeRO-3 partitioned gradients
    closed_form = False          # True: solved on the weights instead of trained (fastunlearn.uce: UCE, RECE)

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.args = getattr(cfg, self.name) if self.Config is not None else None

    # ---- shared pieces -------------------------------------------------------------------------
    def forget_teacher_items(self, st: Step):
        if self.cfg.forget_target == "esd":
            return [(st.x_f, st.t_f, st.c_f)]
        if self.cfg.forget_target == "anchor":
            return [(st.x_f, st.t_f, st.a_f)]
        return []

    def forget_target(self, st: Step, extra, T_f_null):
        """(targets, coeffs) of the forget target from the teacher outputs `extra`."""
        if self.cfg.forget_target == "esd":
            eta = self.cfg.forget_eta
            return [T_f_null, extra[0]], [1 + eta, -eta]
        if self.cfg.forget_target == "anchor":
            return [extra[0]], [1.0]
        return [st.fresh_f], [1.0]

    def r_and_g(self, st: Step, keep: dict | None = None):
        """R(θ) and G(θ) with one student call and one teacher call (`keep`: gets the retain and unconditional
        outputs, s_r, s_u, T_r, T_u, for Saddle's neighbour groups)."""
        Bf = st.x_f.shape[0]
        s_f, s_r, s_u = st.student(st.forget(), (st.x_r, st.t_r, st.c_r), (st.x_all, st.t_all, st.null(len(st.x_all))))
        T_r, T_u, *extra = st.teacher((st.x_r, st.t_r, st.c_r), (st.x_all, st.t_all, st.null(len(st.x_all))),
                                      *self.forget_teacher_items(st))
        R = self.retain_from(st, s_r, s_u, T_r, T_u)
        targets, coeffs = self.forget_target(st, extra, T_u[:Bf])
        G = mse(s_f, st.widen(*targets), coeffs)  # robust: over the forget rows and their adversarial copies
        if keep is not None:
            keep.update(s_r=s_r, s_u=s_u, T_r=T_r, T_u=T_u)
        return R, G

    def retain_from(self, st: Step, s_r, s_u, T_r, T_u):
        if self.cfg.retain_target == "noise":
            return mse(s_r, [st.eps_r]) + mse(s_u, [T_u])
        return mse(s_r, [T_r]) + mse(s_u, [T_u])

    def retain_only(self, st: Step, extra_student=(), extra_teacher=()):
        """R(θ) plus outputs of extra student/teacher items, still one call per model."""
        outs = st.student((st.x_r, st.t_r, st.c_r), (st.x_all, st.t_all, st.null(len(st.x_all))), *extra_student)
        touts = st.teacher((st.x_r, st.t_r, st.c_r), (st.x_all, st.t_all, st.null(len(st.x_all))), *extra_teacher)
        return self.retain_from(st, outs[0], outs[1], touts[0], touts[1]), outs[2:], touts[2:]

    # ---- hooks the trainer calls ---------------------------------------------------------------
    def setup(self, ctx: Context) -> None:
        """Once before training (after a resume too): measure or build what the method needs."""

    def report(self) -> dict:
        """The method's own fields of the final report."""
        return {}

    def loss(self, st: Step):
        raise NotImplementedError

    def after_step(self, logs: dict, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


@dataclass
class OVWConfig:
    alpha: float = num(0.25, above=0)  # weight of G (0.25: the digits comparison, benchmarks/RESULTS.md)


class OVW(Method):
    """Overwrite: minimise R + α·G."""

    name = "ovw"
    Config = OVWConfig

    def loss(self, st):
        R, G = self.r_and_g(st)
        return R + self.args.alpha * G, {"R": R, "G": G}


@dataclass
class SaddleConfig(GroupSettings):  # + retain, retain_weight, rho, mu_*, dro_eta, group_ema (fastunlearn.saddle_groups)
    dual: str = "pi"                        # λ's update rule: pi (proportional-integral) | ga (gradient ascent)
    tau: float = num(0.2, above=0)          # constraint level, as a fraction of G0 (the original model's forget gap)
    kappa_p: float = num(0.5, 0)            # pi: proportional gain (on the running mean ξ of the error)
    kappa_i: float = num(0.01, 0)           # pi: integral gain
    nu: float = num(0.9, 0, 1)              # pi: decay of ξ
    eta_lambda: float = num(0.1, 0)         # ga: dual step size, in units of 1/G0
    gap_ema: float = num(0.9, 0, 1)         # ga: Ĝ = running mean of G with this decay
    lambda_init: float = num(0.0, 0)        # pi: the integral's start I_{-1}; ga: λ_0
    lambda_max: float = num(10.0, above=0)
    g0_batches: int = num(8, 1)             # fixed forget batches that measure G0 (and G, for the probe)
    probe_every: int = num(10, 0)           # G on the G0 batches every N steps (0: off; constraint_met_step
                                            # then comes from the controller's running mean)

    def check(self, prefix: str) -> None:
        self.check_groups(prefix)
        if self.dual not in ("pi", "ga"):
            raise FastUnlearnError(f"{prefix}dual must be pi or ga, got {self.dual!r}")
        if self.nu >= 1:
            raise FastUnlearnError(f"{prefix}nu must be below 1 (got {self.nu}): ξ would never move")
        if self.lambda_init > self.lambda_max:
            raise FastUnlearnError(f"{prefix}lambda_init ({self.lambda_init}) must not exceed {prefix}lambda_max "
                                   f"({self.lambda_max})")


class Saddle(Method):
    """min R s.t. G ≤ τ: L = R + λ (G − τ), λ updated after each optimiser step by a PI controller on
    the error (G − τ)/G0 or by dual gradient ascent (fastunlearn.dual, docs/methods.md). With `retain: constraints
    | dro` the retain side is per neighbour group (fastunlearn.saddle_groups)."""

    name = "saddle"
    Config = SaddleConfig

    def __init__(self, cfg):
        super().__init__(cfg)
        self.lam = self.args.lambda_init  # until setup builds the controller (which needs G0)
        self.g0 = None        # the original model's forget gap, measured before training
        self.tau = None
        self.dual = None
        self.constraint_met_step = None
        self.peak_lambda = None
        self.lambda_trace = []   # λ used at each step
        self.probe_trace = []    # [step, G/G0 on the fixed G0 batches]
        self._probe_batches = []
        self.groups = None       # retain: constraints | dro (fastunlearn.saddle_groups)

    def setup(self, ctx):
        self.ctx = ctx
        g0 = self.forget_gap(ctx, self.args.g0_batches)  # also caches the probe's batches and targets
        if self.g0 is None:  # not restored from a checkpoint
            self.g0 = g0
            if not self.g0 > 0:
                raise FastUnlearnError(f"saddle: the original model's forget gap G0 = {self.g0} is not positive; "
                                       "the forget target equals the teacher (check forget_target and prompts)")
            self.tau = self.args.tau * self.g0
        self.dual = self.make_dual()
        self.lam = self.dual.lam
        self.peak_lambda = self.lam if self.peak_lambda is None else self.peak_lambda
        if self.args.retain != "mean":
            self.groups = SaddleGroups(self, ctx, mse)

    def make_dual(self):
        from .dual import GADual, PIDual

        s = self.args
        if s.dual == "ga":
            return GADual(self.g0, self.tau, s.eta_lambda, s.lambda_init, s.lambda_max, s.gap_ema)
        return PIDual(self.g0, self.tau, s.kappa_p, s.kappa_i, s.nu, s.lambda_init, s.lambda_max)

    def forget_gap(self, ctx, batches: int) -> float:
        """G at θ0 (student = teacher), averaged over `batches` fixed forget batches and all ranks. The
        batches and their combined targets are kept for the probe (`probe`)."""
        total, self._probe_batches = 0.0, []
        for b in range(batches):
            st = ctx.make_step(-1 - b, 0)
            T_c, T_null, *extra = ctx.teacher((st.x_f, st.t_f, st.c_f), (st.x_f, st.t_f, st.null(len(st.x_f))),
                                              *self.forget_teacher_items(st))
            targets, coeffs = self.forget_target(st, extra, T_null)
            target = sum(c * T for c, T in zip(coeffs, targets))  # the primitive's combined target, kept once
            self._probe_batches.append(((st.x_f, st.t_f, st.c_f), target))
            total += float(mse(T_c, [target]))
        return ctx.all_reduce(total / batches, "mean")

    @torch.no_grad()
    def probe(self) -> float:
        """G of the current student on the G0 batches (same inputs, same targets): a paired, low-noise
        measure of the constraint, G_probe / G0 = 1 at θ0."""
        total = sum(float(mse(self.ctx.call([items], grad=False)[0], [target]))
                    for items, target in self._probe_batches)
        return self.ctx.all_reduce(total / len(self._probe_batches), "mean") / self.g0

    def loss(self, st):
        if self.groups is not None:
            return self.groups.loss(st)
        R, G = self.r_and_g(st)
        return R + self.lam * (G - self.tau), {"R": R, "G": G}

    def after_step(self, logs, step):
        self.lam = self.dual.update(float(logs["G"]))
        self.peak_lambda = max(self.peak_lambda, self.lam)
        self.lambda_trace.append(round(self.lam, 6))
        logs.update(self.dual.parts(), tau=self.args.tau)
        every = self.args.probe_every
        if every and step % every == 0:
            value = self.probe()
            self.probe_trace.append([step, round(value, 6)])
            logs["probe"] = value
            if self.constraint_met_step is None and value <= self.args.tau:
                self.constraint_met_step = step
        elif not every and self.constraint_met_step is None and logs["gap"] <= self.args.tau:
            self.constraint_met_step = step
        if self.groups is not None:
            self.groups.after_step(logs, step)

    def state_dict(self):
        state = {"lam": self.lam, "g0": self.g0, "tau": self.tau, "dual": self.dual.state_dict(),
                 "constraint_met_step": self.constraint_met_step, "peak_lambda": self.peak_lambda,
                 "lambda_trace": self.lambda_trace, "probe_trace": self.probe_trace}
        if self.groups is not None:
            state["groups"] = self.groups.state_dict()
        return state

    def load_state_dict(self, state):
        for k in ("lam", "g0", "tau", "constraint_met_step", "peak_lambda", "lambda_trace", "probe_trace"):
            setattr(self, k, state[k])
        self.dual = self.make_dual()
        self.dual.load_state_dict(state["dual"])
        if self.groups is not None:
            self.groups.load_state_dict(state["groups"])

    def report(self):
        return {"constraint_met_step": self.constraint_met_step, "final_lambda": self.lam,
                "peak_lambda": self.peak_lambda, "G0": self.g0, "tau": self.tau, "dual": self.args.dual,
                "lambda_trace": self.lambda_trace, "probe_trace": self.probe_trace,
                **(self.groups.report() if self.groups is not None else {})}


class ESD(Method):
    """Erased Stable Diffusion: G with the negative-guidance target only, no R."""

    name = "esd"

    def loss(self, st):
        (s_f,) = st.student(st.forget())
        T_null, *extra = st.teacher((st.x_f, st.t_f, st.null(len(st.x_f))), *self.forget_teacher_items(st))
        targets, coeffs = self.forget_target(st, extra, T_null)
        G = mse(s_f, st.widen(*targets), coeffs)
        return G, {"G": G}


@dataclass
class GAConfig:
    beta: float = num(1.0, 0)  # weight of the ascent term


class GA(Method):
    """Gradient ascent / NegGrad+: R − β·E_forget ‖ε_θ − ε‖²."""

    name = "ga"
    Config = GAConfig

    def loss(self, st):
        R, (s_f,), _ = self.retain_only(st, extra_student=[st.forget()])
        F = mse(s_f, st.widen(st.eps_f))
        return R - self.args.beta * F, {"R": R, "F": F}


class ConceptAblation(Method):
    """Concept Ablation (model-based): ‖ε_θ(x_f, c_f) − sg(ε_θ(x_f, c_a))‖² + R."""

    name = "ca"

    def loss(self, st):
        R, (s_f,), _ = self.retain_only(st, extra_student=[st.forget()])
        (anchor,) = st.student((st.x_f, st.t_f, st.a_f), grad=False)
        G = mse(s_f, st.widen(anchor))
        return R + G, {"R": R, "G": G}


@dataclass
class SalUnConfig:
    mask_ratio: float = num(0.5, hi=1, above=0)  # share of the trained weights in the saliency mask
    alpha: float = num(0.5, 0)                   # weight of the retain loss
    mask_batches: int = num(4, 1)                # forget batches whose gradient magnitudes rank the weights


class SalUn(Method):
    """Saliency unlearning: only the top `mask_ratio` of weights by |∇ forget loss| train; the forget
    target is the current model under a random retain prompt (stop-gradient), plus α·R."""

    name = "salun"
    Config = SalUnConfig
    needs_full_gradient = True
    mask_fraction = None

    def setup(self, ctx):
        """Keep the top `mask_ratio` of weights by |∇ denoising loss on forget data|, summed over
        `mask_batches` fixed forget batches and all ranks; gradients outside the mask are zeroed."""
        params = [p for p in ctx.module.parameters() if p.requires_grad]
        grads = [torch.zeros_like(p, dtype=torch.float32) for p in params]
        for b in range(self.args.mask_batches):
            st = ctx.make_step(-100 - b, 0)
            (s_f,) = ctx.call([(st.x_f, st.t_f, st.c_f)], grad=True)  # the module itself: no engine hooks
            for acc, gr in zip(grads, torch.autograd.grad(mse(s_f, [st.eps_f]), params)):
                acc += gr.float().abs()
        for gr in grads:
            ctx.all_reduce_sum_(gr)
        flat = torch.cat([gr.flatten() for gr in grads])
        k = max(1, int(flat.numel() * (1 - self.args.mask_ratio)))
        threshold = flat.kthvalue(k).values if k < flat.numel() else flat.max()
        masks = [(gr > threshold) for gr in grads]
        for p, m in zip(params, masks):
            p.register_hook(lambda g, m=m: g * m.to(g.dtype))
        self.mask_fraction = float(sum(m.sum() for m in masks) / flat.numel())

    def loss(self, st):
        R, (s_f,), _ = self.retain_only(st, extra_student=[st.forget()])
        (relabel,) = st.student((st.x_f, st.t_f, st.alt_r), grad=False)
        G = mse(s_f, st.widen(relabel))
        return G + self.args.alpha * R, {"R": R, "G": G}

    def report(self):
        return {"salun_mask_fraction": self.mask_fraction}


@dataclass
class EraseDiffConfig:
    inner_steps: int = num(2, 1)          # K inner SGD steps on the forget loss
    inner_lr: float = num(1e-3, above=0)  # inner SGD step size
    lambda_b: float = num(0.1, 0)         # weight of (f(θ) − f̂)


class EraseDiff(Method):
    """EraseDiff, first-order bilevel (BOME): f̂ = f after K inner SGD steps from θ (weights restored),
    then the outer loss R + λ_b (f(θ) − f̂), f = ‖ε_θ(x_f, c_f) − ε'‖² with a fresh noise ε'."""

    name = "erasediff"
    Config = EraseDiffConfig
    needs_full_gradient = True

    def setup(self, ctx):
        self.ctx = ctx

    def inner_forget_value(self, st) -> torch.Tensor:
        """f̂: f after K SGD steps from the current weights, taken on a functional copy (weights untouched)."""
        params = {n: p.detach().clone() for n, p in self.ctx.module.named_parameters() if p.requires_grad}
        items, (target,) = [st.forget()], st.widen(st.fresh_f)
        for _ in range(self.args.inner_steps):
            for p in params.values():
                p.requires_grad_(True)
            (out,) = self.ctx.call(items, params=params, grad=True)
            grads = torch.autograd.grad(mse(out, [target]), list(params.values()))
            params = {n: (p - self.args.inner_lr * g).detach() for (n, p), g in zip(params.items(), grads)}
        (out,) = self.ctx.call(items, params=params, grad=False)
        return mse(out, [target]).detach()

    def loss(self, st):
        f_hat = self.inner_forget_value(st)
        R, (s_f,), _ = self.retain_only(st, extra_student=[st.forget()])
        f = mse(s_f, st.widen(st.fresh_f))
        return R + self.args.lambda_b * (f - f_hat), {"R": R, "F": f, "f_hat": f_hat}


METHOD_CLASSES = {cls.name: cls for cls in (Saddle, OVW, ESD, EraseDiff, SalUn, GA, ConceptAblation, UCE, RECE)}
for _name, _cls in METHOD_CLASSES.items():  # their names and settings sections, into the run's config
    register_method(_name, _cls.Config, _cls.closed_form)


def make_method(cfg: TrainConfig) -> Method:
    try:
        return METHOD_CLASSES[cfg.method](cfg)
    except KeyError:
        raise FastUnlearnError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHOD_CLASSES)}") from None

