"""The unlearning methods: each a short combination of the one loss primitive (SPEC §2, §3).

Every method sees a `Step`: the noised forget and retain latents of one micro-batch and two
callables, `step.student(*items)` and `step.teacher(*items)`, each of which runs all the
(x_t, prompts) items it is given in ONE UNet call. The shared pieces are

    R(θ)  retain distillation + unconditional branch pinned to the teacher   (`retain_loss`)
    G(θ)  forget gap against the configured forget target                    (`forget_target`)

and each method is a few lines over them. Losses are in the model's output space (epsilon
or v-prediction: the teacher predicts in the same space, and the denoising targets `eps_*` are
converted to it by the trainer).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import TrainConfig
from .errors import FastUnlearnError
from .ops import noise_prediction_loss


def mse(student, targets, coeffs=None, weights=None):
    """The primitive with per-sample coefficients broadcast from a list (one value per target)."""
    B = student.shape[0]
    if coeffs is None:
        coeffs = [1.0] * len(targets)
    c = torch.tensor(coeffs, dtype=torch.float32, device=student.device).expand(B, -1)
    return noise_prediction_loss(student, list(targets), c, weights, check_finite=False)  # the trainer skips non-finite steps


@dataclass
class Step:
    """One micro-batch. Forget rows first, then retain rows; `null_*` are unconditional prompt ids."""

    x_f: torch.Tensor       # (Bf, C, h, w) noised forget latents
    x_r: torch.Tensor       # (Br, C, h, w) noised retain latents
    t_f: torch.Tensor
    t_r: torch.Tensor
    c_f: torch.Tensor       # prompt ids
    c_r: torch.Tensor
    a_f: torch.Tensor       # anchor prompt id per forget row
    alt_r: torch.Tensor     # a random retain prompt id per forget row (SalUn)
    eps_f: torch.Tensor     # denoising target of x_f in the model's output space (epsilon or v)
    eps_r: torch.Tensor
    fresh_f: torch.Tensor   # the same for an independent noise per forget row (EraseDiff's target)
    student: callable       # student(*[(x, t, ids)], grad=True) -> list of outputs
    teacher: callable       # teacher(*[(x, t, ids)]) -> list of outputs (no grad)
    inner_forget_value: callable  # EraseDiff: f after K inner SGD steps, weights untouched

    @property
    def x_all(self):
        return torch.cat([self.x_f, self.x_r])

    @property
    def t_all(self):
        return torch.cat([self.t_f, self.t_r])

    def null(self, n):
        return torch.zeros(n, dtype=torch.long)


class Method:
    """Base: R + forget target plumbing. Subclasses define `loss`."""

    name = ""
    needs_full_gradient = False  # True: cannot run with ZeRO-3 partitioned gradients

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.args = cfg.method_args

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
            eta = self.args.eta
            return [T_f_null, extra[0]], [1 + eta, -eta]
        if self.cfg.forget_target == "anchor":
            return [extra[0]], [1.0]
        return [st.fresh_f], [1.0]

    def r_and_g(self, st: Step):
        """R(θ) and G(θ) with one student call and one teacher call."""
        Bf = st.x_f.shape[0]
        s_f, s_r, s_u = st.student((st.x_f, st.t_f, st.c_f), (st.x_r, st.t_r, st.c_r),
                                   (st.x_all, st.t_all, st.null(len(st.x_all))))
        T_r, T_u, *extra = st.teacher((st.x_r, st.t_r, st.c_r), (st.x_all, st.t_all, st.null(len(st.x_all))),
                                      *self.forget_teacher_items(st))
        R = self.retain_from(st, s_r, s_u, T_r, T_u)
        targets, coeffs = self.forget_target(st, extra, T_u[:Bf])
        G = mse(s_f, targets, coeffs)
        return R, G

    def retain_from(self, st: Step, s_r, s_u, T_r, T_u):
        if self.args.retain_target == "noise":
            return mse(s_r, [st.eps_r]) + mse(s_u, [T_u])
        return mse(s_r, [T_r]) + mse(s_u, [T_u])

    def retain_only(self, st: Step, extra_student=(), extra_teacher=()):
        """R(θ) plus outputs of extra student/teacher items, still one call per model."""
        outs = st.student((st.x_r, st.t_r, st.c_r), (st.x_all, st.t_all, st.null(len(st.x_all))), *extra_student)
        touts = st.teacher((st.x_r, st.t_r, st.c_r), (st.x_all, st.t_all, st.null(len(st.x_all))), *extra_teacher)
        return self.retain_from(st, outs[0], outs[1], touts[0], touts[1]), outs[2:], touts[2:]

    # ---- hooks the trainer calls ---------------------------------------------------------------
    def setup(self, trainer) -> None:
        pass

    def loss(self, st: Step):
        raise NotImplementedError

    def after_step(self, logs: dict, step: int) -> None:
        pass

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class OVW(Method):
    """Overwrite: minimise R + α·G."""

    name = "ovw"

    def loss(self, st):
        R, G = self.r_and_g(st)
        return R + self.args.alpha * G, {"R": R, "G": G}


class Saddle(Method):
    """min R s.t. G ≤ τ: L = R + λ (G − τ); λ ← clip(λ + η_λ (Ĝ − τ), 0, λ_max) after each optimiser step."""

    name = "saddle"

    def __init__(self, cfg):
        super().__init__(cfg)
        s = cfg.saddle
        self.lam = s.lambda_init
        self.g0 = None        # the original model's forget gap, measured before training
        self.g_hat = None     # running mean of G
        self.tau = None
        self.constraint_met_step = None

    def setup(self, trainer):
        if self.g0 is None:  # not restored from a checkpoint
            self.g0 = trainer.measure_forget_gap(self.cfg.saddle.g0_batches)
            if not self.g0 > 0:
                raise FastUnlearnError(f"saddle: the original model's forget gap G0 = {self.g0} is not positive; "
                                       "the forget target equals the teacher (check forget_target and prompts)")
            self.tau = self.cfg.saddle.tau * self.g0
            self.g_hat = self.g0

    def loss(self, st):
        R, G = self.r_and_g(st)
        return R + self.lam * (G - self.tau), {"R": R, "G": G}

    def after_step(self, logs, step):
        s = self.cfg.saddle
        self.g_hat = s.gap_ema * self.g_hat + (1 - s.gap_ema) * float(logs["G"])
        self.lam = min(max(self.lam + (s.eta_lambda / self.g0) * (self.g_hat - self.tau), 0.0), s.lambda_max)
        if self.constraint_met_step is None and self.g_hat <= self.tau:
            self.constraint_met_step = step
        logs.update(lam=self.lam, gap=self.g_hat / self.g0, tau=self.tau / self.g0)

    def state_dict(self):
        return {"lam": self.lam, "g0": self.g0, "g_hat": self.g_hat, "tau": self.tau,
                "constraint_met_step": self.constraint_met_step}

    def load_state_dict(self, state):
        for k in ("lam", "g0", "g_hat", "tau", "constraint_met_step"):
            setattr(self, k, state[k])


class ESD(Method):
    """Erased Stable Diffusion: G with the negative-guidance target only, no R."""

    name = "esd"

    def loss(self, st):
        (s_f,) = st.student((st.x_f, st.t_f, st.c_f))
        T_null, *extra = st.teacher((st.x_f, st.t_f, st.null(len(st.x_f))), *self.forget_teacher_items(st))
        targets, coeffs = self.forget_target(st, extra, T_null)
        G = mse(s_f, targets, coeffs)
        return G, {"G": G}


class GA(Method):
    """Gradient ascent / NegGrad+: R − β·E_forget ‖ε_θ − ε‖²."""

    name = "ga"

    def loss(self, st):
        R, (s_f,), _ = self.retain_only(st, extra_student=[(st.x_f, st.t_f, st.c_f)])
        F = mse(s_f, [st.eps_f])
        return R - self.args.beta * F, {"R": R, "F": F}


class ConceptAblation(Method):
    """Concept Ablation (model-based): ‖ε_θ(x_f, c_f) − sg(ε_θ(x_f, c_a))‖² + R."""

    name = "ca"

    def loss(self, st):
        R, (s_f,), _ = self.retain_only(st, extra_student=[(st.x_f, st.t_f, st.c_f)])
        (anchor,) = st.student((st.x_f, st.t_f, st.a_f), grad=False)
        G = mse(s_f, [anchor])
        return R + G, {"R": R, "G": G}


class SalUn(Method):
    """Saliency unlearning: only the top `mask_ratio` of weights by |∇ forget loss| train; the forget
    target is the current model under a random retain prompt (stop-gradient), plus α·R."""

    name = "salun"
    needs_full_gradient = True

    def setup(self, trainer):
        trainer.apply_saliency_mask(self.args.mask_ratio)

    def loss(self, st):
        R, (s_f,), _ = self.retain_only(st, extra_student=[(st.x_f, st.t_f, st.c_f)])
        (relabel,) = st.student((st.x_f, st.t_f, st.alt_r), grad=False)
        G = mse(s_f, [relabel])
        return G + self.args.salun_alpha * R, {"R": R, "G": G}


class EraseDiff(Method):
    """EraseDiff, first-order bilevel (BOME): f̂ = f after K inner SGD steps from θ (weights restored),
    then the outer loss R + λ_b (f(θ) − f̂), f = ‖ε_θ(x_f, c_f) − ε'‖² with a fresh noise ε'."""

    name = "erasediff"
    needs_full_gradient = True

    def loss(self, st):
        f_hat = st.inner_forget_value(lambda out: mse(out, [st.fresh_f]), self.args.inner_steps, self.args.inner_lr)
        R, (s_f,), _ = self.retain_only(st, extra_student=[(st.x_f, st.t_f, st.c_f)])
        f = mse(s_f, [st.fresh_f])
        return R + self.args.lambda_b * (f - f_hat), {"R": R, "F": f, "f_hat": f_hat}


METHOD_CLASSES = {cls.name: cls for cls in (Saddle, OVW, ESD, EraseDiff, SalUn, GA, ConceptAblation)}


def make_method(cfg: TrainConfig) -> Method:
    try:
        return METHOD_CLASSES[cfg.method](cfg)
    except KeyError:
        raise FastUnlearnError(f"unknown method {cfg.method!r}; choose one of {', '.join(METHOD_CLASSES)}") from None

