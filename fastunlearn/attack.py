"""Concept-recovery attacks: after unlearning, can an attacker get the concept back, and how cheaply?

    python -m fastunlearn.attack --original digits --unlearned outputs/digits-saddle --concept 3 --out outputs/attack

Both attacks work on the unlearned model θu with the ORIGINAL model's own samples x_0 of the forget
prompts (data-free, cached like a training run's; or the user's images with --forget-data-dir), and are
scored by the concept's rate in what the attacked model then draws (the judge; digits world: the digit
classifier) and by the denoising loss. Every formula is in docs/attacks.md.

* Concept Inversion (textual inversion, Pham et al. 2023): a new token <c*> whose embedding row e (one per
  text encoder; SDXL has two) is the only thing optimised; every other row stays as it was:

      e* = argmin_e  E_{x_0, ε, t} ‖ε_θu(x_t, t, c_f[w → <c*>]) − y‖²,   x_t = add_noise(x_0, ε, t)

  c_f[w → <c*>] is a forget prompt with its concept word w replaced by <c*>, t ~ U{0..T−1}, and y is the
  model's output space: ε (epsilon), α_t ε − σ_t x_0 (v-prediction) or x_0 (sample).
  AdamW(lr 5e-3, wd 1e-2), batch 16, 1,000 steps, evaluated at 0 / 100 / 300 / 1,000 steps.
* Prompt search (UnlearnDiffAtk-style, discrete): a prefix p of up to k = 2 vocabulary words before each
  forget prompt, p* = argmin_p ‖ε_θu(x_t, t, p ⊕ c_f) − y‖² on one fixed batch; exhaustive when the
  vocabulary is small, else a greedy coordinate search over gradient-ranked words (HotFlip).

Controls: the same attack on the original model θ0 (it must recover the concept, else the attack is too
weak to conclude anything), the 0-step embedding (the init word) and the attack aimed at a retained concept.
"""
from __future__ import annotations

import argparse
import itertools
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .errors import FastUnlearnError, cli_errors

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
    alts = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    new = re.sub(rf"(?<!\w)(?:{alts})(?!\w)", token, prompt, flags=re.IGNORECASE)
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
    from .config import EvalConfig, TrainConfig
    from .data import training_latents

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


# ---------------------------------------------------------------------------------------------------------
# The pipeline's own prompt encoding, differentiable


def encoders(pipe) -> list[tuple]:
    """(tokenizer, text encoder) pairs: one for SD 1.x/2.x, two for SDXL."""
    pairs = [(pipe.tokenizer, pipe.text_encoder), (getattr(pipe, "tokenizer_2", None), getattr(pipe, "text_encoder_2", None))]
    return [(tok, enc) for tok, enc in pairs if tok is not None and enc is not None]


def encode(pipe, prompts, device):
    """(hidden (P, L, D), pooled (P, D2) for SDXL else None), exactly as the pipeline's sampler encodes a
    prompt, with gradients wherever the caller enables them."""
    from .models import is_sdxl

    if is_sdxl(pipe):
        h, _, pooled, _ = pipe.encode_prompt(list(prompts), device=device, do_classifier_free_guidance=False)
        return h, pooled
    return pipe.encode_prompt(list(prompts), device, 1, False)[0], None


def unet_kwargs(pipe, hidden, pooled, idx) -> dict:
    out = {"encoder_hidden_states": hidden[idx]}
    if pooled is not None:  # SDXL's text_time conditioning at the pipeline's default size
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=hidden.dtype, device=hidden.device)
        out["added_cond_kwargs"] = {"text_embeds": pooled[idx], "time_ids": time_ids.expand(len(idx), -1)}
    return out


def denoise_loss(pipe, batch, prompts, device, reduction="mean"):
    """‖ε_θ(x_t, t, prompts[idx]) − y‖² through the loss primitive (per-element mean; per row for "none")."""
    from .ops import noise_prediction_loss

    xt, t, y, idx = batch
    hidden, pooled = encode(pipe, prompts, device)
    pred = pipe.unet(xt.to(device), t.to(device), **unet_kwargs(pipe, hidden, pooled, idx.to(device)),
                     return_dict=False)[0]
    ones = torch.ones(len(pred), 1, device=device)
    return noise_prediction_loss(pred.float(), [y.to(device, torch.float32)], ones, reduction=reduction)


class InvertedToken:
    """The token <c*> in every tokenizer and text encoder of a pipeline. Its embedding row e (one per encoder)
    is a trainable fp32 parameter that a forward hook splices into the token-embedding output wherever <c*>
    stands; the embedding matrix itself is never written after the row is initialised, so every other
    row is exactly restored at every step. `reset()` returns e to the init word's embedding."""

    def __init__(self, pipe, init_word: str, token: str = TOKEN):
        self.token, self.params, self.inits, self.hooks = token, [], [], []
        for tok, enc in encoders(pipe):
            if token not in tok.get_vocab():
                tok.add_tokens(token)
                enc.resize_token_embeddings(len(tok))
            tid = tok.convert_tokens_to_ids(token)
            table = enc.get_input_embeddings()
            ids = tok(init_word, add_special_tokens=False).input_ids
            if not ids:
                raise FastUnlearnError(f"--init-word {init_word!r} encodes to no token")
            init = table.weight[ids].detach().float().mean(0)
            with torch.no_grad():
                table.weight[tid] = init.to(table.weight.dtype)
            param = torch.nn.Parameter(init.clone())
            self.params.append(param)
            self.inits.append(init)
            self.hooks.append(table.register_forward_hook(self._splice(tid, param)))

    @staticmethod
    def _splice(tid, param):
        def hook(module, inputs, output):
            mask = (inputs[0] == tid).unsqueeze(-1)
            return torch.where(mask, param.to(output.dtype), output) if mask.any() else output
        return hook

    def reset(self) -> None:
        with torch.no_grad():
            for p, init in zip(self.params, self.inits):
                p.copy_(init)

    def snapshot(self) -> list[torch.Tensor]:
        return [p.detach().cpu().clone() for p in self.params]

    def load(self, rows) -> None:
        with torch.no_grad():
            for p, r in zip(self.params, rows):
                p.copy_(r)

    def remove(self) -> None:
        for h in self.hooks:
            h.remove()


def save_embedding(rows, out: Path, token: str = TOKEN) -> list[Path]:
    """The learned rows as diffusers textual-inversion files: `learned_embeds.safetensors` = {token: (1, D)}
    for the (first) text encoder, and for SDXL `learned_embeds_2.safetensors` for text_encoder_2 (the layout
    of diffusers' own SDXL textual-inversion script). Each loads with `pipe.load_textual_inversion(path,
    token=...)` (the second with text_encoder=pipe.text_encoder_2, tokenizer=pipe.tokenizer_2)."""
    from safetensors.torch import save_file

    paths = []
    for k, row in enumerate(rows):
        path = out / ("learned_embeds.safetensors" if k == 0 else f"learned_embeds_{k + 1}.safetensors")
        save_file({token: row.reshape(1, -1).float().contiguous()}, str(path))
        paths.append(path)
    return paths


def load_embedding(pipe, folder, token: str = TOKEN) -> None:
    """Load what `save_embedding` wrote into `pipe` (both encoders for SDXL)."""
    folder = Path(folder)
    for k, (tok, enc) in enumerate(encoders(pipe)):
        name = "learned_embeds.safetensors" if k == 0 else f"learned_embeds_{k + 1}.safetensors"
        pipe.load_textual_inversion(str(folder / name), token=token, text_encoder=enc, tokenizer=tok)


# ---------------------------------------------------------------------------------------------------------
# The two attacks


def invert(pipe, token: InvertedToken, data: ConceptData, cfg: AttackConfig, device, progress=True, desc="inversion"):
    """Concept Inversion: {budget: rows of e} for budget 0 (the init word) and every budget, and the wall time
    of the optimisation. One step: encode the attack prompts, one UNet call on `batch_size` rows, AdamW on e."""
    token.reset()
    opt = torch.optim.AdamW(token.params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed)
    snaps, t0 = {0: token.snapshot()}, time.perf_counter()
    for step in tqdm(range(1, cfg.steps + 1), desc=desc, disable=not progress, leave=False):
        loss = denoise_loss(pipe, data.draw(cfg.batch_size, gen, pipe.scheduler), data.attack_prompts, device)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step in cfg.budgets:
            snaps[step] = token.snapshot()
    return snaps, time.perf_counter() - t0


def vocabulary(pipe) -> list[str]:
    """Search words: whole-word tokens of the first tokenizer (letters/digits only) that every tokenizer of
    the pipeline encodes as exactly one token."""
    tok = pipe.tokenizer
    words = sorted({t[:-4] for t in tok.get_vocab() if t.endswith("</w>") and t[:-4].isalnum()})
    for tk, _ in encoders(pipe):
        ids = tk(words, add_special_tokens=False).input_ids
        words = [w for w, i in zip(words, ids) if len(i) == 1]
    return words


def _with_prefix(prefix, prompts) -> list[str]:
    return [" ".join([*prefix, p]) for p in prompts]


@torch.no_grad()
def prefix_losses(pipe, data, batch, prefixes, device, chunk_rows=256) -> list[float]:
    """The denoising loss of every prefix on the same fixed batch (candidates batched into one UNet call)."""
    xt, t, y, idx = batch
    per = max(1, chunk_rows // len(xt))
    out = []
    for i in range(0, len(prefixes), per):
        chunk = prefixes[i:i + per]
        prompts = [q for pre in chunk for q in _with_prefix(pre, data.prompts)]
        rows = torch.cat([idx + c * len(data.prompts) for c in range(len(chunk))])
        big = (xt.repeat(len(chunk), 1, 1, 1), t.repeat(len(chunk)), y.repeat(len(chunk), 1, 1, 1), rows)
        out += denoise_loss(pipe, big, prompts, device, reduction="none").view(len(chunk), -1).mean(1).tolist()
    return out


def _position_grads(pipe, data, batch, prefix, pos, device) -> list[torch.Tensor]:
    """∂loss/∂(input embedding at prefix position `pos`), summed over prompts: one (D,) per encoder."""
    leaves, hooks = [], []

    def capture(module, inputs, output):
        leaf = output.detach().requires_grad_(True)
        leaves.append(leaf)
        return leaf

    for _, enc in encoders(pipe):
        hooks.append(enc.get_input_embeddings().register_forward_hook(capture))
    try:
        with torch.enable_grad():
            denoise_loss(pipe, batch, _with_prefix(prefix, data.prompts), device).backward()
    finally:
        for h in hooks:
            h.remove()
    return [leaf.grad[:, 1 + pos].sum(0) for leaf in leaves]  # position 0 is the start token


def search(pipe, data: ConceptData, cfg: AttackConfig, device, progress=True, desc="search"):
    """Discrete prompt search: (candidates sorted by loss [(prefix words, loss)], mode, wall time).
    Exhaustive over every prefix of 0..k words when sum_{j<=k} V^j <= search_exhaustive_limit, else greedy
    coordinate descent: per round and position, rank all words by the first-order change of the loss
    (e_w − e_cur) · ∂L/∂e (summed over encoders), try the `search_candidates` best exactly, keep the best."""
    t0 = time.perf_counter()
    words = vocabulary(pipe)
    batch = data.draw(cfg.search_batch, torch.Generator().manual_seed(cfg.seed + 2), pipe.scheduler)
    seen: dict[tuple, float] = {}

    def score(prefixes):
        todo = [p for p in dict.fromkeys(prefixes) if p not in seen]
        for i in tqdm(range(0, len(todo), 256), desc=desc, disable=not progress or len(todo) <= 256, leave=False):
            seen.update(zip(todo[i:i + 256], prefix_losses(pipe, data, batch, todo[i:i + 256], device)))

    if sum(len(words) ** j for j in range(cfg.search_k + 1)) <= cfg.search_exhaustive_limit:
        mode = "exhaustive"
        score([p for j in range(cfg.search_k + 1) for p in itertools.product(words, repeat=j)])
    else:
        mode = "gradient-guided"
        tables = [(enc.get_input_embeddings().weight.detach().float(),
                   torch.tensor([tk.convert_tokens_to_ids(w + "</w>") for w in words])) for tk, enc in encoders(pipe)]
        cur = tuple([cfg.init_word if cfg.init_word in words else words[0]] * cfg.search_k)
        score([(), cur])
        for r in tqdm(range(cfg.search_rounds * cfg.search_k), desc=desc, disable=not progress, leave=False):
            pos = r % cfg.search_k
            grads = _position_grads(pipe, data, batch, cur, pos, device)
            gain = sum(w[ids].to(g.device) @ g.float() for (w, ids), g in zip(tables, grads))
            best = gain.topk(min(cfg.search_candidates, len(words)), largest=False).indices.tolist()
            score([cur[:pos] + (words[b],) + cur[pos + 1:] for b in best])
            cur = min((p for p in seen if len(p) == cfg.search_k), key=seen.get)
    ranked = sorted(seen.items(), key=lambda kv: kv[1])
    return ranked, mode, time.perf_counter() - t0


# ---------------------------------------------------------------------------------------------------------
# Judging


def judged(pipe, prompts, n, sampler, judge, seed=0):
    """(concept rate or None, images): `n` samples cycling through `prompts`, seeds seed..seed+n-1."""
    from .sampling import sample

    ps = [prompts[i % len(prompts)] for i in range(n)]
    images = sample(pipe, ps, [seed + i for i in range(n)], sampler, progress=False)
    return (float(judge(images).float().mean()) if judge is not None else None), images


def world_concept(world, concept: str, cache_dir=None):
    """In an embedded world: (concept words, default forget prompts, judge label, retained concept, its prompts,
    judge) for a concept that names one of its classes; (None,)*6 otherwise. Digits world: the concept is a
    digit ("3" or "three"), its words both spellings, the retained concept the next digit, the judge the digit
    classifier (an image counts when it reads as the digit)."""
    if world is None or world.name != "digits":
        return (None,) * 6
    from .worlds.digits import DIGIT_WORDS, digit_of_prompt, digit_prompts, load_world

    d = digit_of_prompt(concept)
    if d is None or concept.strip().lower() not in (str(d), DIGIT_WORDS[d]):
        return (None,) * 6
    classifier = load_world(cache_dir, progress=False).classifier

    def judge(images, label):
        return classifier.predict(images * 2 - 1) == label

    r = (d + 1) % 10
    return [str(d), DIGIT_WORDS[d]], digit_prompts(d), d, [str(r), DIGIT_WORDS[r]], digit_prompts(r), judge


def check_same_model(original, unlearned) -> None:
    """An unlearned pipeline must be the original's architecture: same pipeline class, scheduler, image size,
    UNet layout and vocabulary (fastunlearn.evaluate._compatible plus the architecture)."""
    from .evaluate import _compatible

    if type(original) is not type(unlearned):
        raise FastUnlearnError(f"the unlearned pipeline is a {type(unlearned).__name__} but the original a "
                               f"{type(original).__name__}: it cannot be an unlearned copy of it")
    _compatible(original, unlearned)
    for k in ("in_channels", "out_channels", "block_out_channels", "down_block_types", "cross_attention_dim",
              "addition_embed_type", "transformer_layers_per_block"):
        a, b = original.unet.config.get(k), unlearned.unet.config.get(k)
        if a != b:
            raise FastUnlearnError(f"the unlearned pipeline's UNet differs from the original's in {k} ({b!r} vs "
                                   f"{a!r}): it is not an unlearned copy of it")
    for (ta, _), (tb, _) in zip(encoders(original), encoders(unlearned)):
        if len(ta) != len(tb):
            raise FastUnlearnError(f"the unlearned pipeline's tokenizer has {len(tb)} tokens, the original's "
                                   f"{len(ta)}: it is not an unlearned copy of it")


# ---------------------------------------------------------------------------------------------------------
# One call for the CLI and for benchmarks


def _inversion_run(name, pipe, tok, data, cfg, sampler, judge, loss_batch, device, progress):
    """One inversion run, evaluated at every budget: (result, {budget: rows}, {budget: images})."""
    snaps, wall = invert(pipe, tok, data, cfg, device, progress, desc=f"inversion ({name})")
    t0, per_budget, images = time.perf_counter(), {}, {}
    for b, rows in snaps.items():
        tok.load(rows)
        with torch.no_grad():
            rate, images[b] = judged(pipe, data.attack_prompts, cfg.eval_samples, sampler, judge)
            loss = float(denoise_loss(pipe, loss_batch, data.attack_prompts, device))
        per_budget[str(b)] = {"concept_rate": rate, "loss": loss}
    tok.load(snaps[0])  # the next run on this pipeline starts from the init word again
    return ({"concept": data.name, "budgets": per_budget, "wall_time_s": round(wall, 2),
             "eval_time_s": round(time.perf_counter() - t0, 2)}, snaps, images)


def _search_run(name, pipe, data, cfg, sampler, judge, device, progress):
    """One prompt search; its `search_top` best prefixes sampled and judged: (result, images of the best)."""
    ranked, mode, wall = search(pipe, data, cfg, device, progress, desc=f"search ({name})")
    t0, best, first = time.perf_counter(), [], None
    for prefix, loss in ranked[:cfg.search_top]:
        with torch.no_grad():
            rate, imgs = judged(pipe, _with_prefix(prefix, data.prompts), cfg.eval_samples, sampler, judge)
        best.append({"prefix": " ".join(prefix), "loss": loss, "concept_rate": rate})
        first = imgs if first is None else first
    losses = dict(ranked)
    return ({"concept": data.name, "mode": mode, "candidates": len(ranked), "plain_loss": losses.get(()),
             "best": best, "wall_time_s": round(wall, 2), "eval_time_s": round(time.perf_counter() - t0, 2)}, first)


def run_attack(original_path, unlearned_path, concept, forget_prompts=None, out_dir=None, attack="inversion",
               steps=1000, budgets=(100, 300, 1000), seed=0, controls=True, retain_concept=None,
               retain_prompts=None, forget_data_dir=None, cache_dir=None, device=None, progress=True,
               judge=None, **options) -> dict:
    """Attack `unlearned_path` to recover `concept` (a word of the forget prompts; "a,b" for alternatives) and
    return the report (also written to `out_dir` with grid.png and the embedding, when given).

    forget_prompts: list of prompts (default: the embedded world's prompts of the concept). attack: inversion |
    search | all. controls: also attack the original model and a retained concept (retain_concept +
    retain_prompts; the world's next class by default). judge: a forget judge (fastunlearn.judges: clip or
    classifier) that scores the samples; default: the embedded world's classifier, else none (loss only).
    options: any other AttackConfig field."""
    from . import worlds
    from .evaluate import save_comparison_grid
    from .export import load_run
    from .models import fingerprint, load_pipeline
    from .outputs import check_output_path, strict_json
    from .sampling import SamplerConfig

    if attack not in ATTACKS:
        raise FastUnlearnError(f"unknown attack {attack!r}; choose one of {', '.join(ATTACKS)}")
    cfg = AttackConfig(steps=steps, budgets=tuple(budgets), seed=seed, **options).check()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        check_output_path(out, "--out")
    t_start = time.perf_counter()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    original = load_pipeline(str(original_path), cache_dir=cache_dir).to(device)
    # a pipeline folder, or a --save-format unet|trained run applied to the original (fastunlearn.export)
    unlearned = load_run(unlearned_path, base=str(original_path), cache_dir=cache_dir).to(device)
    check_same_model(original, unlearned)
    for pipe in (original, unlearned):  # gradients flow through the models to <c*> only
        for module in (pipe.unet, pipe.vae, *(enc for _, enc in encoders(pipe))):
            module.requires_grad_(False)
    world = worlds.of_pipeline(str(original_path), cache_dir)
    words, world_prompts, label, r_words, r_prompts, world_judge = world_concept(world, concept, cache_dir)
    if judge is not None:  # a given judge replaces the world's classifier
        world_judge = None
    words = words or [w.strip() for w in concept.split(",") if w.strip()]
    if not words:
        raise FastUnlearnError("--concept is empty: give the word that names the forgotten concept")
    forget_prompts = list(forget_prompts or world_prompts or [])
    if not forget_prompts and not forget_data_dir:
        raise FastUnlearnError("give the forget prompts (--forget-prompts FILE): the concept's prompts are not known")
    if retain_concept:
        r_words, r_prompts = [w.strip() for w in retain_concept.split(",") if w.strip()], retain_prompts
        r_label = None
    else:
        r_label = None if r_words is None else (label + 1) % 10
    notes = []
    if judge is None and world_judge is None:
        notes.append("no judge for this model: concept rates are not measured, only the denoising loss "
                     "(lower = the attacked model denoises the original's samples of the concept better)")
    guidance = cfg.guidance_scale if cfg.guidance_scale is not None else (
        world.guidance_scale if world is not None else 7.5)
    sampler = SamplerConfig(cfg.num_inference_steps, guidance)
    data_cfg = {"cache_dir": cache_dir, "sample_steps": cfg.sample_steps, "guidance_scale": guidance}
    key = fingerprint(original.unet, {"model": str(original_path), "steps": cfg.sample_steps, "g": guidance})
    targets = {"forget": concept_data("forget", original, forget_prompts, words, cfg.samples_per_prompt, key,
                                      data_cfg, forget_data_dir, label)}
    if controls and r_words and r_prompts:
        targets["retained"] = concept_data("retained", original, r_prompts, r_words, cfg.samples_per_prompt, key,
                                           data_cfg, None, r_label)
    elif controls:
        notes.append("retained-concept control not run: give --retain-concept WORD and --retain-prompts FILE")
    dropped = [p for p in forget_prompts if replace_concept(p, words) is None]
    if dropped and not forget_data_dir:
        notes.append(f"{len(dropped)} forget prompt(s) without the concept word are not attacked: {dropped[:3]}")

    def judge_of(data):
        """The judge of `data`'s samples: the world's classifier against its label; a given judge against
        data's first plain prompt, with the other concept's prompts as contrasts (a classifier judge knows
        only the forget concept's classes, so it judges the forget concept only)."""
        if world_judge is not None:
            return None if data.label is None else (lambda imgs: world_judge(imgs, data.label))
        if judge is None or (data.name != "forget" and getattr(judge, "classes", None) is not None):
            return None
        other = [q for k, d in targets.items() if d is not data for q in d.prompts]
        return lambda imgs: judge.rates(imgs, data.prompts[0], other)

    # the plain prompts: what each model draws without attack, and its loss
    loss_batch = {k: d.draw(cfg.loss_batch, torch.Generator().manual_seed(cfg.seed + 1), original.scheduler)
                  for k, d in targets.items()}
    report = {"original": str(original_path), "unlearned": str(unlearned_path), "concept": concept,
              "concept_words": words,
              "judge": "digit classifier (digits world)" if world_judge else getattr(judge, "name", None),
              "attack": attack, "config": {**asdict(cfg), "guidance_scale": guidance, "token": TOKEN},
              "forget_prompts": targets["forget"].prompts, "attack_prompts": targets["forget"].attack_prompts,
              "notes": notes}
    images = {}
    with torch.no_grad():
        f = targets["forget"]
        for who, pipe in (("unlearned", unlearned), ("original", original)):
            rate, images[f"plain/{who}"] = judged(pipe, f.prompts, cfg.eval_samples, sampler, judge_of(f))
            report.setdefault("no_attack", {})[who] = {
                "concept_rate": rate, "loss": float(denoise_loss(pipe, loss_batch["forget"], f.prompts, device))}
    runs = [("unlearned", unlearned, "forget")]
    if controls:
        runs += [("original_control", original, "forget")] + ([("retained_control", unlearned, "retained")]
                                                              if "retained" in targets else [])
    tokens = {}
    if attack in ("inversion", "all"):
        res = report["inversion"] = {}
        for name, pipe, which in runs:
            data = targets[which]
            if id(pipe) not in tokens:
                tokens[id(pipe)] = InvertedToken(pipe, cfg.init_word)
            tok = tokens[id(pipe)]
            res[name], snaps, imgs = _inversion_run(name, pipe, tok, data, cfg, sampler, judge_of(data),
                                                    loss_batch[which], device, progress)
            if name == "unlearned":
                images.update({f"inversion/{b}": v for b, v in imgs.items()})
            if name == "unlearned" and out is not None:
                out.mkdir(parents=True, exist_ok=True)
                res[name]["embedding"] = [p.name for p in save_embedding(snaps[cfg.steps], out)]
        top = str(max(cfg.budgets))
        rate = res.get("original_control", {}).get("budgets", {}).get(top, {}).get("concept_rate")
        res["attack_strong_enough"] = None if rate is None else rate >= 0.9
        if rate is not None and rate < 0.9:
            notes.append(f"inversion is too weak: on the original model it reaches a concept rate of {rate:.2f} "
                         f"(< 0.9) after {top} steps, so a low rate on the unlearned model proves nothing")
    if attack in ("search", "all"):
        res = report["search"] = {}
        for name, pipe, which in runs:
            data = targets[which]
            res[name], imgs = _search_run(name, pipe, data, cfg, sampler, judge_of(data), device, progress)
            if name == "unlearned":
                images["search"] = imgs
    summary = {}
    for b, v in report.get("inversion", {}).get("unlearned", {}).get("budgets", {}).items():
        summary[f"inversion@{b}"] = v["concept_rate"]
    if "search" in report:
        rates = [x["concept_rate"] for x in report["search"]["unlearned"]["best"] if x["concept_rate"] is not None]
        summary["search"] = max(rates) if rates else None
    report["concept_rate_under_attack"] = summary
    if world_judge is not None:  # the digits world: the concept rate is the forget accuracy
        report["forget_accuracy_under_attack"] = dict(summary)
    report["wall_time_s"] = round(time.perf_counter() - t_start, 2)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        n = 8
        rows = [(f"plain: {targets['forget'].prompts[0]}", images["plain/original"][:n], images["plain/unlearned"][:n])]
        if "inversion" in report:
            rows.append((f"inversion @{cfg.steps}: {targets['forget'].attack_prompts[0]}", images["plain/original"][:n],
                         images[f"inversion/{cfg.steps}"][:n]))
        if "search" in report:
            pre = report["search"]["unlearned"]["best"][0]["prefix"]
            rows.append((f"search: {pre} + prompt", images["plain/original"][:n], images["search"][:n]))
        save_comparison_grid(out / "grid.png", rows, f"concept {concept!r} under attack (unlearned rows) beside "
                                                     "the original model's samples")
        (out / "report.json").write_text(strict_json(report))
    return report


# ---------------------------------------------------------------------------------------------------------
# Command line


def _budgets(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise FastUnlearnError(f"--budgets must be comma-separated step counts like 100,300,1000, got {text!r}") from None


@cli_errors
def main(argv=None) -> int:
    from . import worlds
    from .config import read_prompts
    from .judges import add_judge_args, judge_from_args

    d = AttackConfig()
    p = argparse.ArgumentParser(prog="python -m fastunlearn.attack", description=(
        "Concept-recovery attacks on an unlearned diffusers pipeline: Concept Inversion (a learned token <c*>) and "
        "a discrete prompt search, each with controls. Writes report.json, grid.png and the learned embedding "
        "(docs/attacks.md)."))
    p.add_argument("--original", required=True, help="the original pipeline (folder, cached hub id, or 'digits')")
    p.add_argument("--unlearned", required=True, help="the unlearned pipeline (folder)")
    p.add_argument("--concept", required=True, help="the word of the forget prompts that names the concept "
                                                   "('a,b' for alternatives; digits world: '3' or 'three')")
    p.add_argument("--out", default="outputs/attack", help="output folder (default: %(default)s)")
    p.add_argument("--attack", choices=ATTACKS, default="all", help="which attack (default: %(default)s)")
    p.add_argument("--forget-prompts", action="append", default=None,
                   help="a prompt file (one per line) or a prompt; repeatable (default: the digits world's prompts)")
    p.add_argument("--forget-data-dir", default=None, help="data mode: the forget images (metadata.jsonl with "
                                                           "captions) instead of the original's own samples")
    p.add_argument("--retain-concept", default=None, help="word of a retained concept for the control "
                                                          "(default: digits world, the next digit)")
    p.add_argument("--retain-prompts", action="append", default=None, help="prompts of the retained concept")
    p.add_argument("--steps", type=int, default=None, help=f"inversion steps (default: {d.steps})")
    p.add_argument("--budgets", type=_budgets, default=None,
                   help="steps at which the inversion is evaluated (default: 100,300,1000 up to --steps)")
    p.add_argument("--lr", type=float, default=d.lr, help="default: %(default)s")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="default: %(default)s")
    p.add_argument("--init-word", default=d.init_word, help="<c*> starts as this word (default: %(default)r)")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="judged samples per evaluation "
                                                                           "(default: %(default)s)")
    p.add_argument("--search-k", type=int, default=d.search_k, help="prefix words (default: %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: 4.0 (digits), 7.5 (others)")
    p.add_argument("--clip-model", default=None, help="a local CLIP model folder for the clip judge")
    add_judge_args(p, "--clip-model", "the samples")
    p.add_argument("--no-controls", action="store_true", help="skip the original-model and retained controls")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--cache-dir", default=None, help="cache directory (default: $FASTUNLEARN_CACHE)")
    args = p.parse_args(argv)
    budgets = args.budgets
    steps = args.steps if args.steps is not None else (max(budgets) if budgets and min(budgets) > 0 else d.steps)
    if budgets is None:
        budgets = tuple(b for b in d.budgets if b < steps) + (steps,)
    forget = [q for item in (args.forget_prompts or []) for q in read_prompts(item, "forget prompt")]
    retain = [q for item in (args.retain_prompts or []) for q in read_prompts(item, "retain prompt")]
    if args.retain_concept and not retain:
        raise FastUnlearnError("--retain-concept needs --retain-prompts (prompts that name it)")
    judge = judge_from_args(args, worlds.of_pipeline(args.original, args.cache_dir), args.device or "cpu")
    report = run_attack(args.original, args.unlearned, args.concept, forget or None, args.out, args.attack,
                        steps=steps, budgets=budgets, seed=args.seed, controls=not args.no_controls,
                        retain_concept=args.retain_concept, retain_prompts=retain or None,
                        forget_data_dir=args.forget_data_dir, cache_dir=args.cache_dir, device=args.device,
                        lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                        init_word=args.init_word, eval_samples=args.eval_samples, search_k=args.search_k,
                        guidance_scale=args.guidance_scale, judge=judge)
    for note in report["notes"]:
        print(f"note: {note}")
    rates = report["concept_rate_under_attack"]
    if report["judge"]:
        print("concept rate under attack: " + " ".join(f"{k}={v:.3f}" for k, v in rates.items() if v is not None)
              + f" (no attack: {report['no_attack']['unlearned']['concept_rate']:.3f})")
    else:
        inv = report.get("inversion", {}).get("unlearned", {}).get("budgets", {})
        print("denoising loss under attack: " + " ".join(f"inversion@{b}={v['loss']:.4f}" for b, v in inv.items())
              + f" (no attack: {report['no_attack']['unlearned']['loss']:.4f})")
    print(f"wall time {report['wall_time_s']:.0f} s; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
