"""What a method sees of a run: one micro-batch (`Step`) and, at setup, a narrow view of the run (`Context`).

Batches (fastunlearn.data) make the `Step`s; with `--robust` (fastunlearn.robust) a step also carries adversarial
copies of its first forget rows, which every method's forget term takes through `forget()` and `widen()`.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch


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
    n_adv: int = 0          # robust training: the first n_adv forget rows come again, conditioned on
    adv_ids: torch.Tensor | None = None  # these ids (the forget prompt with a pool embedding as its concept word)

    @property
    def x_all(self):
        return torch.cat([self.x_f, self.x_r])

    @property
    def t_all(self):
        return torch.cat([self.t_f, self.t_r])

    def null(self, n):
        return torch.zeros(n, dtype=torch.long)

    def forget(self):
        """The (x, t, ids) item of a forget term: the forget rows, then their adversarial copies (same x_t, t)."""
        if not self.n_adv:
            return self.x_f, self.t_f, self.c_f
        n = self.n_adv
        return torch.cat([self.x_f, self.x_f[:n]]), torch.cat([self.t_f, self.t_f[:n]]), torch.cat([self.c_f, self.adv_ids])

    def widen(self, *per_row):
        """Per-forget-row targets for the rows of `forget()`: an adversarial copy has its plain row's target."""
        return [torch.cat([y, y[:self.n_adv]]) if self.n_adv else y for y in per_row]


@dataclass
class Context:
    """What a method may use of the run, handed to `Method.setup` (never the trainer itself)."""

    module: torch.nn.Module                   # the student's module; its trained parameters require grad
    make_step: Callable[[int, int], Step]     # make_step(step, micro): this rank's micro-batch (negative steps: probes)
    call: Callable                            # call(items, params=None, grad=True): the student module on (x, t, ids)
                                              # items in one batch, bypassing DeepSpeed; `params` substitutes values
    teacher: Callable                         # teacher(*items) -> outputs, no grad
    all_reduce: Callable[[float, str], float]  # all_reduce(value, "mean" | "max") over ranks
    all_reduce_sum_: Callable[[torch.Tensor], None]  # in-place sum of a tensor over ranks
    retain_groups: object = None              # the retain prompts' neighbour groups (fastunlearn.groups.GroupIndex:
                                              # names, and the group of each prompt id) when the run uses them
