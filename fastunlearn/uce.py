"""The closed-form methods, UCE and RECE (docs/methods.md): no training loop, one solve on the weights.

Both edit every cross-attention key and value projection (`attn2.to_k`, `attn2.to_v`) of the UNet, W -> W K
(fastunlearn.closed_form): the forget prompts' text-encoder rows are sent where the original sends their targets'
(the anchors, "" by default), while the rows of the preserve prompts (the run's retain prompts, `uce.preserve_prompts`
and "") keep what they give. RECE then adds, `rece.rounds` times, the adversarial rows that make the edited model
reproduce the concept (derived in closed form) to the erased rows, and solves again from the original weights.

The trainer (fastunlearn/train.py) sees a method with `closed_form = True`: it calls `bind` when the run is built
(the prompts are checked then, and the edited parameters become the ones a `trained` export saves), `solve` instead
of the loop, and `report`; evaluation, report, grid, card and exports are as for every method.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from .closed_form import adversarial, energy, gram, uce_map
from .config import read_prompts
from .errors import FastUnlearnError
from .settings import num

TOKENS = ("tail", "last")


@dataclass
class UCEConfig:
    erase_scale: float = num(1.0, 0)   # s_e: weight of the erased rows (UCE's erase_scale)
    preserve_scale: float | None = None  # s_p: weight of the preserved rows; none: UCE's default for `tokens`
                                         # (tail: max(0.1, 1/P), P preserve prompts with ""; last: 1)
    lamb: float = num(0.5, above=0)    # λ: the pull towards the original weights, λ‖W' − W‖²
    tokens: str = "tail"               # the rows of a prompt: tail (erase: its last token through EOS and padding,
                                       # preserve: every position) | last (its last token only, both)
    preserve_prompts: Any = None       # more prompts to preserve beside the run's retain prompts: a list or a file

    def check(self, prefix: str) -> None:
        if self.tokens not in TOKENS:
            raise FastUnlearnError(f"{prefix}tokens must be tail or last, got {self.tokens!r}")
        s = self.preserve_scale
        if s is not None and (isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or s < 0):
            raise FastUnlearnError(f"{prefix}preserve_scale must be a number >= 0 (or none: UCE's default), got {s}")
        if self.preserve_prompts is not None:
            read_prompts(self.preserve_prompts, f"{prefix}preserve_prompts")


@dataclass
class RECEConfig:
    rounds: int = num(3, 0)                   # adversarial rounds after the UCE solve (0: UCE itself)
    regular_scale: float = num(0.1, above=0)  # ρ: the ridge of the adversarial embedding, ρ‖e‖²


def projections(unet) -> dict[str, torch.nn.Linear]:
    """The edited projections, by module name: every cross-attention `to_k` and `to_v` (UCE's choice)."""
    found = {n: m for n, m in unet.named_modules() if ".attn2." in f".{n}." and n.endswith((".to_k", ".to_v"))}
    if not found:
        raise FastUnlearnError("the UNet has no cross-attention (attn2) to_k / to_v projections to edit")
    for name, m in found.items():
        if not isinstance(m, torch.nn.Linear) or m.bias is not None:
            raise FastUnlearnError(f"{name} is not a linear projection without bias: UCE edits only those")
    if len({m.in_features for m in found.values()}) != 1:
        raise FastUnlearnError("the cross-attention projections read inputs of different sizes")
    return found


@torch.no_grad()
def encode(pipe, prompts: list[str], batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(hidden (N, L, D) float64, last (N,)): the text-encoder rows of each prompt exactly as the pipeline conditions
    the UNet on it (SDXL: both encoders' penultimate states, side by side), and the position of its last token (the
    one before EOS; 0, BOS, for "")."""
    from .models import encoders, is_sdxl

    (tok, enc), *_ = encoders(pipe)  # the first tokenizer counts the tokens (SDXL's two agree)
    device = enc.device
    hidden = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i:i + batch]
        if is_sdxl(pipe):
            h = pipe.encode_prompt(chunk, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False)[0]
        else:
            h = pipe.encode_prompt(chunk, device, 1, False)[0]
        hidden.append(h.to(torch.float64))
    mask = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
               return_tensors="pt").attention_mask
    return torch.cat(hidden), (mask.sum(1) - 2).clamp(min=0)


def erase_rows(hidden, last, pairs, tokens: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(erased rows, their targets) for (prompt index, target index) pairs. tail: from each prompt's last token to the
    end (EOS and padding), position by position against its target's from the target's last token (UCE's published
    erase script); last: the two last tokens."""
    L = hidden.shape[1]
    C, V = [], []
    for f, a in pairs:
        i, j = int(last[f]), int(last[a])
        n = 1 if tokens == "last" else L - max(i, j)
        C.append(hidden[f, i:i + n])
        V.append(hidden[a, j:j + n])
    return torch.cat(C), torch.cat(V)


def preserve_rows(hidden, last, idx, tokens: str) -> torch.Tensor:
    """The preserved rows: every position of each prompt (tail), or its last token (last)."""
    if tokens == "last":
        return hidden[idx, last[idx]]
    return hidden[idx].reshape(-1, hidden.shape[-1])


class UCE:
    """Unified Concept Editing: one closed-form edit W -> W K of every cross-attention to_k and to_v."""

    name = "uce"
    Config = UCEConfig
    closed_form = True          # the trainer solves instead of training (bind, solve, report)
    needs_full_gradient = False

    def __init__(self, cfg):
        self.cfg, self.uce = cfg, cfg.uce
        self.args = getattr(cfg, self.name)
        self.pipe, self.solve_seconds, self.facts, self.trace = None, None, {}, []

    def bind(self, pipe, forget, anchors, retain) -> list[str]:
        """Check the prompts and keep them with the pipeline; the names of the parameters `solve` will change."""
        extra = read_prompts(self.uce.preserve_prompts, "uce.preserve_prompts") if self.uce.preserve_prompts else []
        both = sorted(set(extra) & set(forget))
        if both:
            raise FastUnlearnError(f"prompt {both[0]!r} is both a forget prompt and in uce.preserve_prompts")
        self.pipe, self.forget, self.anchors = pipe, list(forget), list(anchors)
        self.preserve = [p for p in dict.fromkeys(["", *retain, *extra]) if p not in set(forget)]
        return [f"{name}.weight" for name in projections(pipe.unet)]

    def preserve_scale(self) -> float:
        s = self.uce.preserve_scale
        if s is not None:
            return float(s)
        return max(0.1, 1 / len(self.preserve)) if self.uce.tokens == "tail" else 1.0

    @torch.no_grad()
    def solve(self) -> float:
        """Edit the pipeline's UNet in place; returns the wall seconds it took (text encoding included)."""
        start = time.perf_counter()
        u, mods = self.uce, projections(self.pipe.unet)
        weights = [m.weight for m in mods.values()]
        device = weights[0].device
        texts = list(dict.fromkeys([*self.forget, *self.anchors, *self.preserve]))
        at = {t: i for i, t in enumerate(texts)}
        hidden, last = encode(self.pipe, texts)
        hidden = hidden.to(device)
        C, V = erase_rows(hidden, last, [(at[f], at[a]) for f, a in zip(self.forget, self.anchors)], u.tokens)
        P = preserve_rows(hidden, last, [at[p] for p in self.preserve], u.tokens)
        s_p = self.preserve_scale()
        K = uce_map(C, V, P, u.erase_scale, s_p, u.lamb)
        G = gram(weights)
        K = self.refine(G, K, C, V, P, s_p)
        for w in weights:
            w.copy_((w.to(torch.float64) @ K).to(w.dtype))
        self.solve_seconds = time.perf_counter() - start
        moved = energy(G, C - V)
        self.facts = {
            "edited_projections": len(mods), "erased_rows": len(C), "preserved_rows": len(P),
            "preserve_prompts": len(self.preserve), "preserve_scale": s_p,
            # Σ‖W'c − Wc*‖² / Σ‖Wc − Wc*‖² over the erased rows: 1 = unmoved, 0 = at the targets' keys and values
            "forget_residual": energy(G, C @ K.T - V) / moved if moved > 0 else None,
            # Σ‖W'c − Wc‖² / Σ‖Wc‖² over the preserved rows: 0 = unchanged
            "preserve_residual": energy(G, P @ K.T - P) / max(energy(G, P), 1e-300),
        }
        return self.solve_seconds

    def refine(self, G, K, C, V, P, s_p):
        """RECE's rounds; UCE keeps its one solve."""
        return K

    def report(self) -> dict:
        u = self.uce
        return {"solve_seconds": None if self.solve_seconds is None else round(self.solve_seconds, 4),
                "uce": {"erase_scale": u.erase_scale, "lamb": u.lamb, "tokens": u.tokens, **self.facts}}


class RECE(UCE):
    """Reliable and Efficient Concept Erasure: UCE, then `rece.rounds` times the closed-form adversarial rows of the
    edited model are added to the erased rows (each with its concept row's target) and the edit is solved again."""

    name = "rece"
    Config = RECEConfig

    def refine(self, G, K, C, V, P, s_p):
        u, moved = self.uce, energy(G, C - V)
        C_all, V_all = C, V
        for r in range(1, self.args.rounds + 1):
            E = adversarial(G, K, C, self.args.regular_scale)
            gap = energy(G, E @ K.T - C) / moved if moved > 0 else None  # 0: E brings the concept's k, v back exactly
            C_all, V_all = torch.cat([C_all, E]), torch.cat([V_all, V])
            K = uce_map(C_all, V_all, P, u.erase_scale, s_p, u.lamb)
            after = energy(G, E @ K.T - C) / moved if moved > 0 else None
            self.trace.append({"round": r, "adversarial_gap": gap, "adversarial_gap_after": after})
        return K

    def report(self) -> dict:
        out = super().report()
        out["rece"] = {"rounds": self.args.rounds, "regular_scale": self.args.regular_scale, "trace": self.trace}
        return out


def start_from_uce(cfg, pipe, teacher, forget, anchors, retain) -> dict:
    """`--init uce`: edit the student (`pipe.unet`, before DeepSpeed sees it) with UCE at the run's uce.* settings;
    the teacher must be a separate copy, so that it stays the original. Returns the report's `init_uce` (the solve's
    facts and seconds)."""
    if cfg.lora.rank or hasattr(teacher, "extra_bytes"):
        raise FastUnlearnError("--init uce needs a teacher that is a copy of the original: not with LoRA or a shared "
                               "teacher (the edit would change the teacher too); use full weights and teacher: copy/auto")
    if cfg.method in ("uce", "rece"):
        raise FastUnlearnError(f"--init uce is for the trained methods; --method {cfg.method} is a closed-form edit itself")
    edit = UCE(cfg)
    edit.bind(pipe, forget, anchors, retain)
    edit.solve()
    return edit.report()
