"""Robust unlearning (`--robust`, config section `robust.*`): an adversarial inner attack during training, for every
method (docs/methods.md, "Robust unlearning").

A pool of K adversarial embeddings e_1..e_K (one row per text encoder each: two for SDXL) stands in for the concept
word w of the forget prompts, c_f[w -> e_k]. After every `robust.every` optimiser steps, `robust.steps` AdamW steps of
the Concept Inversion objective of fastunlearn.attack on the CURRENT student,

    min_e  E_{x_0, ε, t} ‖ε_θ(x_t, t, c_f[w -> e_k]) − y‖²      (x_0: the run's forget latents, the original's samples)

move the pool on from where the last refresh left it (the optimiser's moments too). Each micro-batch then carries
adversarial copies of its first round(share · forget_batch_size) forget rows: the same x_t and t under c_f[w -> e_k]
(the entries in turn), each with its plain row's target; every method's forget term covers them
(fastunlearn.step.Step.forget and widen).

The adversarial prompts' conditioning lives in the run's Conditioner as extra rows (ids after the prompts' own),
encoded again at each refresh. Tokenizers and text encoders are never changed: a pool row enters through a forward
hook on the token embedding, at the concept word's position. The pool and its optimiser travel in the checkpoints,
so a resumed run equals the uninterrupted one. Not under ZeRO-3 (the config refuses it).
"""
from __future__ import annotations

import copy
import math

import torch

from .errors import FastUnlearnError

WEIGHT_DECAY = 1e-2  # the inner AdamW's, as the attack's (fastunlearn.attack.AttackConfig)


class Robust:
    """What the trainer calls when --robust is off: nothing happens, nothing is saved or reported."""

    postfix: dict = {}

    def extend(self, st, step: int, micro: int):
        return st

    def refresh(self, step: int) -> None:
        pass

    def state_dict(self):
        return None

    def load_state_dict(self, state) -> None:
        pass

    def report(self) -> dict:
        return {}


def make_robust(trainer) -> Robust:
    """The run's robust part: the adversarial pool with --robust, else a no-op."""
    return AdversarialPool(trainer) if trainer.cfg.robust.enabled else Robust()


def concept_words(cfg, forget, info, world) -> list[str]:
    """The concept's words: robust.concept ("a,b": either), else the embedded world's. A one-line error when there
    are none or a forget prompt names none of them."""
    from .data import concept_pattern

    if cfg.robust.concept is not None:
        words = [w.strip() for w in str(cfg.robust.concept).split(",") if w.strip()]
    else:
        words = world.concept_words(info) if info is not None and hasattr(world, "concept_words") else None
        if not words:
            raise FastUnlearnError("--robust needs the concept word of the forget prompts, which its inner attack "
                                   "replaces: give it with --robust-concept WORD (robust.concept)")
    pattern = concept_pattern(words)
    missing = [p for p in forget if not pattern.search(p)]
    if missing:
        raise FastUnlearnError(f"robust.concept {'/'.join(words)!r} is not in the forget prompt {missing[0]!r} ("
                               f"{len(missing)} of {len(forget)} lack it): the inner attack replaces it in every forget "
                               "prompt; give a word they all contain with --robust-concept")
    return words


def check_robust(cfg) -> None:
    """fastunlearn.cli.check_run's part: the concept word against the run's forget prompts (nothing loaded)."""
    from . import worlds
    from .data import resolve_prompts

    if cfg.robust.enabled:
        forget, _, _, info, _ = resolve_prompts(cfg)
        concept_words(cfg, forget, info, worlds.get(cfg.model, cfg.cache_dir))


def concept_tokens(tok, prompts, pattern):
    """(ids, concept mask, attention mask), each (P, L), of `prompts` padded and truncated as the pipeline's tokenizer
    does, with each occurrence of the concept as ONE position (the mask; its id is a stand-in, BOS)."""
    L, bos, eos = tok.model_max_length, tok.bos_token_id, tok.eos_token_id
    ids = torch.full((len(prompts), L), tok.pad_token_id if tok.pad_token_id is not None else eos, dtype=torch.long)
    mask, att = torch.zeros(len(prompts), L, dtype=torch.bool), torch.zeros(len(prompts), L, dtype=torch.long)
    for i, prompt in enumerate(prompts):
        row, marks = [], []
        for j, part in enumerate(pattern.split(prompt)):
            if j:
                marks.append(len(row))
                row.append(bos)
            row += tok(part, add_special_tokens=False).input_ids
        row = [bos, *row[:L - 2], eos]
        ids[i, :len(row)], att[i, :len(row)] = torch.tensor(row), 1
        mask[i, [m + 1 for m in marks if m + 1 < len(row) - 1]] = True
    return ids, mask, att


class AdversarialPool(Robust):
    """The pool of adversarial concept embeddings, its refreshes and the adversarial rows of each micro-batch."""

    def __init__(self, trainer):
        from .data import concept_pattern
        from .models import encoders

        t, self.args = trainer, trainer.cfg.robust
        self.t, self.cond, self.postfix, self.trace = t, t.cond, {}, []
        self.words = concept_words(t.cfg, t.forget, t.world_info, t.embedded_world)
        self.pattern = concept_pattern(self.words)
        self.encoders = encoders(t.pipe)
        self.K, self.P, self.base = self.args.pool, len(t.forget), len(self.cond.prompts)
        self.prompt_of = torch.full((self.base,), -1, dtype=torch.long)  # Conditioner id -> forget prompt index
        self.prompt_of[self.cond.ids(t.forget)] = torch.arange(self.P)
        self.n_adv = min(t.cfg.forget_batch_size, max(1, round(self.args.share * t.cfg.forget_batch_size)))
        self.tokens = [concept_tokens(tok, t.forget, self.pattern) for tok, _ in self.encoders]
        self.pool = []
        for tok, enc in self.encoders:  # even entries start as the concept word, odd ones as init_word
            start = [self._embedding(tok, enc, w) for w in (self.words[0], self.args.init_word)]
            rows = torch.stack([start[k % 2] for k in range(self.K)]).to(t.device)
            self.pool.append(torch.nn.Parameter(rows))
        self.opt = torch.optim.AdamW(self.pool, lr=self.args.lr, weight_decay=WEIGHT_DECAY)
        self._evaluator = None
        self._set_table()

    @staticmethod
    def _embedding(tok, enc, word):
        ids = tok(word, add_special_tokens=False).input_ids
        if not ids:
            raise FastUnlearnError(f"robust: {word!r} encodes to no token")
        return enc.get_input_embeddings().weight[ids].detach().float().mean(0)

    # ---- encoding ---------------------------------------------------------------------------------
    def encode(self, tokens, entries):
        """(hidden (N, L, D), pooled (N, D2) or None) of the N tokenized prompts `tokens` (one triple per text
        encoder) with pool entry `entries[n]` as the concept word, exactly as the pipeline encodes a prompt;
        differentiable in the pool where gradients are enabled."""
        hidden, pooled = [], None
        for (tok, enc), (ids, mask, att), rows in zip(self.encoders, tokens, self.pool):
            dev = enc.device
            where, value = mask.to(dev).unsqueeze(-1), rows[entries.to(rows.device)].to(dev).unsqueeze(1)
            hook = enc.get_input_embeddings().register_forward_hook(
                lambda module, inputs, out, where=where, value=value: torch.where(where, value.to(out.dtype), out))
            try:
                if self.cond.sdxl:  # SDXL: the penultimate layer of each encoder, the last one's pooled projection
                    out = enc(ids.to(dev), output_hidden_states=True)
                    pooled = out[0] if pooled is None and out[0].ndim == 2 else pooled
                    hidden.append(out.hidden_states[-2])
                else:
                    use_mask = getattr(enc.config, "use_attention_mask", False)
                    hidden.append(enc(ids.to(dev), attention_mask=att.to(dev) if use_mask else None)[0])
            finally:
                hook.remove()
        return torch.cat(hidden, -1), pooled

    def table(self):
        """Every (entry k, forget prompt p) pair, row k·P + p: the encoded adversarial prompts."""
        tokens = [tuple(x.repeat(self.K, 1) for x in tok) for tok in self.tokens]
        return self.encode(tokens, torch.arange(self.K).repeat_interleave(self.P))

    def _set_table(self):
        with torch.no_grad():
            self.cond.set_extra(*self.table())

    # ---- the micro-batches ------------------------------------------------------------------------
    def extend(self, st, step, micro):
        """The training step's micro-batch with its adversarial copies (not the probes' negative steps)."""
        if step < 0:
            return st
        n = self.n_adv
        entry = (torch.arange(n) + (step * self.t.cfg.gradient_accumulation_steps + micro) * n) % self.K
        st.n_adv, st.adv_ids = n, self.base + entry * self.P + self.prompt_of[st.c_f[:n]]
        return st

    # ---- the refresh ------------------------------------------------------------------------------
    def inner_loss(self, x0, noise, t, rows, entries, grad=True):
        """The Concept Inversion loss of the current student on forget latents x0 (their Conditioner ids `rows`)
        with pool entries `entries`."""
        from .engine import unet_call
        from .ops import noise_prediction_loss

        b = self.t.batches
        cond = copy.copy(self.cond)  # the adversarial rows, differentiable in the pool
        with torch.set_grad_enabled(grad):
            cond.set_extra(*self.table())
        ids = self.base + entries * self.P + self.prompt_of[rows]
        (out,) = unet_call(self.t.engine.module, [(b.scheduler.add_noise(x0, noise, t), t, ids)], cond, self.t.device,
                           self.t.dtype, grad)
        y = b.output_target(x0, noise, t).to(out.device, torch.float32)
        return noise_prediction_loss(out.float(), [y], torch.ones(len(out), 1, device=out.device))

    def refresh(self, step):
        """After every `every` optimiser steps: `steps` AdamW steps on the pool (gradients averaged over ranks, so
        the pool stays the same everywhere), its strength, and the curves."""
        from .engine import all_reduce, all_reduce_sum_

        a, b = self.args, self.t.batches
        if step % a.every:
            return
        g = torch.Generator().manual_seed(hash((self.t.cfg.seed, step, self.t.rank, 0x7B05)) & (2 ** 63 - 1))
        losses = []
        for _ in range(a.steps):
            i = torch.randint(0, len(b.lat_f), (a.batch,), generator=g)
            x0 = b.lat_f[i]
            noise = torch.randn(x0.shape, generator=g)
            t = torch.randint(0, b.scheduler.config.num_train_timesteps, (a.batch,), generator=g)
            loss = self.inner_loss(x0, noise, t, b.ids_f[i], torch.arange(a.batch) % self.K)
            grads = torch.autograd.grad(loss, self.pool)
            for gr in grads:
                all_reduce_sum_(gr)
                gr /= self.t.world
            value = all_reduce(float(loss.detach()), "mean")
            if not (math.isfinite(value) and all(bool(torch.isfinite(gr).all()) for gr in grads)):
                self.t.warn(f"robust: step {step}: non-finite inner attack loss or gradient; that inner step skipped")
                continue
            for p, gr in zip(self.pool, grads):
                p.grad = gr
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            losses.append(value)
        self._set_table()
        loss = sum(losses) / len(losses) if losses else float("nan")
        strength = self.strength()
        self.trace.append([step, round(loss, 6), None if strength is None else round(strength, 6)])
        self.postfix = {"adv": f"{loss:.3g}", **({"pool": f"{strength:.2f}"} if strength is not None else {})}
        self.t.log(f"robust step {step} inner_loss={loss:.5g}" +
                   (f" pool_strength={strength:.4g}" if strength is not None else ""))
        self.t.tracker.log({"inner_loss": loss, "pool_strength": strength}, step, "robust/")

    def strength(self) -> float | None:
        """The share of `strength_samples` samples of the current student, under the pool's adversarial prompts,
        that the run's forget judge reads as the concept (its forget accuracy or forget rate). Rank 0 only; None
        without a judge. The (prompt, seed) pairs are the first of the in-training evaluation's forget set that name
        the concept; sample i uses entry i mod K; same initial noise, sampler and guidance as the evaluation."""
        from .sampling import ddim_view, initial_latents, latent_shape, with_unet

        if not self.args.strength_samples or self.t.rank != 0:
            return None
        if self._evaluator is None:
            self._evaluator = self.t.evaluator(final=False)
        ev = self._evaluator
        pairs = [(p, s) for p, s in zip(*ev.forget) if self.pattern.search(p)][:self.args.strength_samples]
        if (ev.classifier is None and ev.judge is None) or not pairs:
            return None
        prompts, seeds = [p for p, _ in pairs], [s for _, s in pairs]
        tokens = [concept_tokens(tok, prompts, self.pattern) for tok, _ in self.encoders]
        module, n = self.t.engine.module, len(prompts)
        with torch.no_grad():
            hidden, pooled = self.encode(tokens, torch.arange(n) % self.K)
        kwargs = {"prompt_embeds": hidden.to(self.t.dtype), "negative_prompt_embeds": self.cond.hidden[:1].expand(n, -1, -1)}
        if self.cond.sdxl:
            kwargs.update(pooled_prompt_embeds=pooled.to(self.t.dtype),
                          negative_pooled_prompt_embeds=self.cond.pooled[:1].expand(n, -1))
        pipe = with_unet(self.t.pipe, module)
        shape = latent_shape(pipe, ev.sampler.height, ev.sampler.width)
        module.eval()
        try:
            with ddim_view(pipe):
                images = pipe(**kwargs, latents=initial_latents(prompts, seeds, shape).to(self.t.device, self.t.dtype),
                              num_inference_steps=ev.sampler.num_inference_steps, guidance_scale=ev.sampler.guidance_scale,
                              height=shape[1] * pipe.vae_scale_factor, width=shape[2] * pipe.vae_scale_factor, eta=0.0,
                              output_type="pt", return_dict=False)[0].float().cpu()
        finally:
            module.train()
        return float(ev.shows_concept(images, prompts).float().mean())

    # ---- checkpoints and the report ---------------------------------------------------------------
    def state_dict(self):
        return {"pool": [p.detach().cpu().clone() for p in self.pool], "opt": self.opt.state_dict(), "trace": self.trace}

    def load_state_dict(self, state):
        if state is None:
            return
        with torch.no_grad():
            for p, saved in zip(self.pool, state["pool"]):
                p.copy_(saved)
        self.opt.load_state_dict(state["opt"])
        self.trace = [list(row) for row in state["trace"]]
        self._set_table()

    def report(self):
        strengths = [s for _, _, s in self.trace if s is not None]
        return {"robust": {"concept": self.words, "adversarial_rows_per_step": self.n_adv, "pool": self.K,
                           "final_pool_strength": strengths[-1] if strengths else None,
                           "trace": self.trace}}  # [step, inner loss, pool strength] at each refresh
