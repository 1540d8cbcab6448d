"""Building the digits world. The build trains, on the CPU: a digit classifier (the judge), an `AutoencoderKL`,
and a `CLIPTextModel` + `UNet2DConditionModel` jointly, then saves a `StableDiffusionPipeline` with
`save_pretrained`, so it loads through exactly the code path that loads SD 1.5. Its trainers (`_make_components`,
`_train_vae`, `_train_unet`) build the styles world too. Loading the built world: world.py.
"""
from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...sampling import SamplerConfig, sample
from ..build import TrainerRecipe, assemble_pipeline, save_world
from .classifier import train_classifier
from .data import IMAGE_SIZE, digit_prompts, eval_pairs, heldout_split, load_digit_images, prompt_words

WORLD_VERSION = "digits-v1"


@dataclass
class Recipe(TrainerRecipe):
    """How the world is trained. The default fits in a few minutes on 2 CPU cores."""

    eval_per_digit: int = 20
    sampler: dict = field(default_factory=lambda: SamplerConfig(num_inference_steps=25, guidance_scale=4.0).to_dict())


FAST_RECIPE = Recipe(classifier_steps=30, vae_steps=20, unet_steps=20, eval_per_digit=2,
                     sampler=SamplerConfig(num_inference_steps=3, guidance_scale=4.0).to_dict())


def _make_components(tokenizer):
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, sample_size=IMAGE_SIZE,
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(16, 32, 32), layers_per_block=1, norm_num_groups=8)
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=tokenizer.model_max_length, projection_dim=64,
        bos_token_id=0, eos_token_id=1, pad_token_id=1))
    unet = UNet2DConditionModel(
        sample_size=IMAGE_SIZE // 4, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=64,
        attention_head_dim=8, norm_num_groups=16)
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear", prediction_type="epsilon",
                              clip_sample=False, steps_offset=1)
    scheduler.register_to_config(set_alpha_to_one=False)  # as SD 1.5's config, read by DDIM at sampling
    return vae, text_encoder, unet, scheduler


def _lr_lambda(warmup: int, total: int):
    def f(step):
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    return f


def _train_vae(vae, images, recipe: Recipe, gen, bar):
    opt = torch.optim.AdamW(vae.parameters(), lr=recipe.vae_lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.vae_lr, total_steps=max(recipe.vae_steps, 2))
    vae.train()
    rgb = images.expand(-1, 3, -1, -1)
    for _ in range(recipe.vae_steps):
        x = rgb[torch.randint(0, len(rgb), (recipe.batch_size,), generator=gen)]
        post = vae.encode(x).latent_dist
        z = post.mean + post.std * torch.randn(post.mean.shape, generator=gen)
        rec = vae.decode(z).sample
        loss = F.mse_loss(rec, x) + 0.5 * F.l1_loss(rec, x) + 1e-5 * post.kl().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        bar.set_postfix(stage="vae", loss=f"{loss.item():.4f}", refresh=False)  # drawn by update, at its own pace
        bar.update(1)
    vae.eval().requires_grad_(False)
    with torch.no_grad():
        dist = vae.encode(rgb).latent_dist
    std = float(dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    return dist.mean * vae.config.scaling_factor, dist.std * vae.config.scaling_factor


def _train_unet(unet, text_encoder, tokenizer, scheduler, lat_mean, lat_std, labels, recipe: Recipe, gen, bar,
                phrasings=None):
    """Train the UNet and the text encoder jointly on the latents of labelled images; the prompt of a sample is a
    random one of `phrasings[label]` (default: the six phrasings of each digit). Returns their EMA copies."""
    params = list(unet.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=recipe.unet_lr, weight_decay=1e-2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(recipe.warmup_steps, recipe.unet_steps))
    ema_unet, ema_text = copy.deepcopy(unet).requires_grad_(False), copy.deepcopy(text_encoder).requires_grad_(False)
    all_prompts = phrasings if phrasings is not None else [digit_prompts(d) for d in range(10)]
    alphas = scheduler.alphas_cumprod
    snr = alphas / (1 - alphas)
    unet.train()
    text_encoder.train()
    for step in range(recipe.unet_steps):
        idx = torch.randint(0, len(labels), (recipe.batch_size,), generator=gen)
        x0 = lat_mean[idx] + lat_std[idx] * torch.randn(lat_mean[idx].shape, generator=gen)
        choice = torch.randint(0, len(all_prompts[0]), (len(idx),), generator=gen).tolist()
        drop = (torch.rand(len(idx), generator=gen) < recipe.uncond_prob).tolist()
        prompts = ["" if drop[i] else all_prompts[int(labels[j])][choice[i]] for i, j in enumerate(idx.tolist())]
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length,
                        truncation=True, return_tensors="pt").input_ids
        noise = torch.randn(x0.shape, generator=gen)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (len(idx),), generator=gen)
        xt = scheduler.add_noise(x0, noise, t)
        pred = unet(xt, t, encoder_hidden_states=text_encoder(ids)[0]).sample
        w = snr[t].clamp(max=recipe.min_snr_gamma) / snr[t]  # min-SNR weighting (epsilon target)
        loss = ((pred - noise).pow(2).mean((1, 2, 3)) * w).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        decay = min(recipe.ema_decay, (1 + step) / (10 + step))
        with torch.no_grad():
            for ema, live in ((ema_unet, unet), (ema_text, text_encoder)):
                for pe, p in zip(ema.parameters(), live.parameters()):
                    pe.lerp_(p, 1 - decay)
        bar.set_postfix(stage="unet", loss=f"{loss.item():.4f}", refresh=False)  # drawn by update, at its own pace
        bar.update(1)
    return ema_unet.eval(), ema_text.eval()


def score_pipeline(pipe, classifier, digits=range(10), per_digit: int = 20, sampler: SamplerConfig | None = None,
                   seed_offset: int = 0, progress=True):
    """Sample `per_digit` images of each digit and return (per-digit accuracy dict, images, labels)."""
    prompts, seeds, labels = eval_pairs(list(digits), per_digit, seed_offset)
    images = sample(pipe, prompts, seeds, sampler or SamplerConfig(), batch_size=200,
                    progress="scoring" if progress else False)
    pred = classifier.predict(images * 2 - 1)
    labels = torch.tensor(labels)
    per = {int(d): float((pred[labels == d] == d).float().mean()) for d in digits}
    return per, images, labels


def build_world(dest: Path, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    """Train every part of the world and save it into `dest` (which must not exist). Returns world.json's dict."""
    from ..tokenizer import build_clip_tokenizer

    t0 = time.time()
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    images, labels = load_digit_images()
    train_idx, held_idx = heldout_split(len(labels), recipe.seed)
    total = recipe.classifier_steps + recipe.vae_steps + recipe.unet_steps
    with tqdm(total=total, desc="building digits world", unit="step", disable=not progress) as bar:
        bar.set_postfix(stage="classifier")
        classifier = train_classifier(images[train_idx], labels[train_idx], steps=recipe.classifier_steps,
                                      seed=recipe.seed, progress=bar)
        heldout_acc = float((classifier.predict(images[held_idx]) == labels[held_idx]).float().mean())
        tokenizer = build_clip_tokenizer(prompt_words())
        vae, text_encoder, unet, scheduler = _make_components(tokenizer)
        lat_mean, lat_std = _train_vae(vae, images, recipe, gen, bar)
        unet, text_encoder = _train_unet(unet, text_encoder, tokenizer, scheduler, lat_mean, lat_std, labels,
                                         recipe, gen, bar)
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
    sampler = SamplerConfig(**recipe.sampler)
    per_digit, _, _ = score_pipeline(pipe, classifier, per_digit=recipe.eval_per_digit, sampler=sampler,
                                     progress=progress)
    return save_world(dest, pipe, classifier, {
        "version": WORLD_VERSION,
        "recipe": asdict(recipe),
        "classifier_heldout_accuracy": heldout_acc,
        "classifier_heldout_size": len(held_idx),
        "base_accuracy": sum(per_digit.values()) / len(per_digit),
        "base_accuracy_per_digit": per_digit,
        "base_accuracy_samples_per_digit": recipe.eval_per_digit,
    }, recipe, t0)
