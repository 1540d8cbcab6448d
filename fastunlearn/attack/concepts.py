"""The attack's settings and the concept under attack: AttackConfig, the <c*> token, the forget (or retained)
prompts with their concept word replaced, and the original model's x_0 samples of them (docs/attacks.md)."""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from ..errors import FastUnlearnError

TOKEN = "<c*>"
ATTACKS = ("inversion", "search", "all")


@dataclass(frozen=True)
class AttackConfig:
    steps: int = 1000                          # inversion: optimiser steps
    budgets: tuple[int, ...] = (100, 300, 1000)  # inversion: steps at which the embedding is evaluated (+ steps)
    lr: float = 5e-3
    weight_decay: float = 1e-2
    batch_size: int = 16
    init_word: str = "a"                       # <c*> starts as this word's embedding (mean of its tokens)
    seed: int = 0
    samples_per_prompt: int = 10               # data-free x_0: teacher samples per forget prompt
    sample_steps: int = 25                     # ... drawn with this many DDIM steps
    eval_samples: int = 100                    # judged samples per evaluation
    num_inference_steps: int = 25
    guidance_scale: float | None = None        # None: the world's (digits 4.0), else 7.5
    loss_batch: int = 64                       # fixed (x_t, t, y) rows of the reported loss
    search_k: int = 2                          # prefix words
    search_batch: int = 16                     # fixed rows on which every candidate prefix is ranked
    search_exhaustive_limit: int = 5000        # exhaustive when sum_{j<=k} V^j is at most this
    search_candidates: int = 64                # gradient-guided: words tried per position and round
    search_rounds: int = 2
    search_top: int = 3                        # best prefixes sampled and judged

    def check(self) -> AttackConfig:
        if not self.budgets or min(self.budgets) <= 0:
            raise FastUnlearnError(f"every attack budget must be a positive number of steps, got {list(self.budgets)}")
        if self.steps <= 0:
            raise FastUnlearnError(f"--steps must be a positive number of steps, got {self.steps}")
        if max(self.budgets) > self.steps:
            raise FastUnlearnError(f"budget {max(self.budgets)} is more than --steps {self.steps}")
        for name in ("batch_size", "samples_per_prompt", "sample_steps", "eval_samples", "num_inference_steps",
                     "loss_batch", "search_k", "search_batch", "search_candidates", "search_rounds", "search_top"):
            if getattr(self, name) < 1:
                raise FastUnlearnError(f"{name} must be at least 1, got {getattr(self, name)}")
        if not (self.lr > 0 and self.weight_decay >= 0):
            raise FastUnlearnError(f"lr must be > 0 and weight_decay >= 0, got {self.lr}, {self.weight_decay}")
        return replace(self, budgets=tuple(sorted(set(self.budgets) | {self.steps})))  # the last step always



# ---------------------------------------------------------------------------------------------------------
# Concepts and their data


def replace_concept(prompt: str, words, token: str = TOKEN) -> str | None:
    """`prompt` with every whole-word occurrence of one of `words` (case-insensitive) replaced by `token`,
    or None when it names none of them."""
    from ..data import concept_pattern

    new = concept_pattern(words).sub(token, prompt)
    return new if new != prompt else None


def output_target(scheduler, x0, noise, t):
    """What the UNet predicts for x_t = add_noise(x0, noise, t): ε, v = α_t ε − σ_t x0, or x0."""
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return scheduler.get_velocity(x0, noise, t)
    return x0 if kind == "sample" else noise


@dataclass
class ConceptData:
    """One concept under attack: x_0 latents (N, C, h, w) fp32 CPU with the prompt of each row, the attack
    prompt of each distinct prompt (its concept word replaced by <c*>), and the judge's label (or None)."""

    name: str
    latents: torch.Tensor
    rows: list[str]
    prompts: list[str]
    attack_prompts: list[str]
    label: int | None = None

    def draw(self, n: int, gen: torch.Generator, scheduler):
        """(x_t, t, y, prompt index) for `n` rows drawn with `gen`: row, noise ε and t ~ U{0..T-1}."""
        i = torch.randint(0, len(self.latents), (n,), generator=gen)
        x0 = self.latents[i]
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (n,), generator=gen)
        idx = torch.tensor([self.prompts.index(self.rows[j]) for j in i.tolist()])
        return scheduler.add_noise(x0, noise, t), t, output_target(scheduler, x0, noise, t), idx


def concept_data(name, original, prompts, words, per_prompt, key, cfg, data_dir=None, label=None) -> ConceptData:
    """The original model's own samples of `prompts` (data-free, the training runs' cache), or the encoded
    images of `data_dir`; prompts naming none of `words` are dropped (a one-line error if that is all)."""
    from ..config import EvalConfig, TrainConfig
    from ..data import training_latents

    def attack_prompts(prompts) -> dict:
        attack = {p: replace_concept(p, words) for p in dict.fromkeys(prompts)}
        if not any(attack.values()):
            raise FastUnlearnError(f"the concept word {'/'.join(words)!r} is in none of the {name} prompts "
                                   f"({next(iter(attack))!r}, ...): give --concept a word they contain")
        return attack

    if not data_dir:
        prompts = [p for p, a in attack_prompts(prompts).items() if a]  # checked before any sampling
    tcfg = TrainConfig(cache_dir=cfg["cache_dir"], sample_steps=cfg["sample_steps"],
                       eval=EvalConfig(guidance_scale=cfg["guidance_scale"]))
    lat, rows = training_latents("forget", list(prompts), data_dir, per_prompt, key, original, original, tcfg, 0)
    attack = attack_prompts(rows)
    keep = torch.tensor([attack[r] is not None for r in rows])
    rows = [r for r in rows if attack[r] is not None]
    prompts = [p for p in attack if attack[p]]
    return ConceptData(name, lat[keep], rows, prompts, [attack[p] for p in prompts], label)
