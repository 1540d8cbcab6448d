"""Concept Inversion (textual inversion, Pham et al. 2023): the learned token <c*>, its optimisation and its
diffusers textual-inversion files (docs/attacks.md)."""
from __future__ import annotations

import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..errors import FastUnlearnError
from .concepts import TOKEN, AttackConfig, ConceptData
from .encoding import denoise_loss, encoders


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
