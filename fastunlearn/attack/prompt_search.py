"""The discrete prompt search (UnlearnDiffAtk-style): a prefix of up to k vocabulary words before each forget
prompt, exhaustive over a small vocabulary, else a greedy coordinate search over gradient-ranked words
(HotFlip) (docs/attacks.md)."""
from __future__ import annotations

import itertools
import time

import torch
from tqdm.auto import tqdm

from .concepts import AttackConfig, ConceptData
from .encoding import denoise_loss, encoders


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
