"""The pipeline's own prompt encoding, differentiable, and the denoising loss both attacks minimise."""
from __future__ import annotations

import torch

from ..models import encoders  # noqa: F401  (the pipeline's (tokenizer, text encoder) pairs)


def encode(pipe, prompts, device):
    """(hidden (P, L, D), pooled (P, D2) for SDXL else None), exactly as the pipeline's sampler encodes a
    prompt, with gradients wherever the caller enables them."""
    from ..models import is_sdxl

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
    from ..ops import noise_prediction_loss

    xt, t, y, idx = batch
    hidden, pooled = encode(pipe, prompts, device)
    pred = pipe.unet(xt.to(device), t.to(device), **unet_kwargs(pipe, hidden, pooled, idx.to(device)),
                     return_dict=False)[0]
    ones = torch.ones(len(pred), 1, device=device)
    return noise_prediction_loss(pred.float(), [y.to(device, torch.float32)], ones, reduction=reduction)
