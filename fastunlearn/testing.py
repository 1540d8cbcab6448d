"""Tiny random-weight pipelines with the real SD 1.x and SDXL layouts, for tests and smoke benchmarks.

They load and run through exactly the code paths of the real models (`from_pretrained`,
two text encoders and `text_time` added conditioning for SDXL), in well under a second.
"""
from __future__ import annotations

import torch

# train.py arguments that make a run as small as it gets (batches of 2, 2 sampling steps, no in-training evaluation)
SMALL = ["--set", "forget_batch_size=2", "--set", "retain_batch_size=2", "--set", "forget_samples_per_prompt=2",
         "--set", "retain_samples_per_prompt=2", "--set", "sample_steps=2", "--set", "eval.forget_samples=2",
         "--set", "eval.retain_samples_per_prompt=1", "--set", "eval.num_inference_steps=2",
         "--set", "saddle.g0_batches=1", "--set", "eval.grid_seeds=2", "--set", "eval.every=0"]

WORDS = ["a", "photo", "of", "cat", "dog", "car", "tree", "house", "painting", "in", "the", "style",
         "van", "gogh", "picasso", "church", "fish", "parachute", "golf", "ball"]


def _tokenizer(max_length: int = 16):
    from .worlds.tokenizer import build_clip_tokenizer

    return build_clip_tokenizer(WORDS, model_max_length=max_length)


def _text_config(vocab_size: int, max_length: int = 16):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                          num_attention_heads=4, max_position_embeddings=max_length, projection_dim=32,
                          bos_token_id=0, eos_token_id=1, pad_token_id=1)


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8, 16),
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         layers_per_block=1, norm_num_groups=8, sample_size=16)


def _scheduler(prediction_type: str):
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                          prediction_type=prediction_type, clip_sample=False, steps_offset=1)
    sched.register_to_config(set_alpha_to_one=False)
    return sched


def tiny_sd_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """An SD 1.x-style `StableDiffusionPipeline`: 16x16 images, 8x8x4 latents, random weights."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    tok = _tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8)
    pipe = StableDiffusionPipeline(vae=_vae(), text_encoder=CLIPTextModel(_text_config(len(tok))), tokenizer=tok,
                                   unet=unet, scheduler=_scheduler(prediction_type), safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_pipeline(prediction_type: str = "epsilon", seed: int = 0):
    """An SDXL-style `StableDiffusionXLPipeline`: two text encoders, `text_time` added conditioning."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    tok, tok2 = _tokenizer(), _tokenizer()
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
        cross_attention_dim=64, norm_num_groups=8)
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=CLIPTextModel(_text_config(len(tok))),
        text_encoder_2=CLIPTextModelWithProjection(_text_config(len(tok2))), tokenizer=tok, tokenizer_2=tok2,
        unet=unet, scheduler=_scheduler(prediction_type))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_clip(path, words=("a", "photo", "of", "cat", "dog", "car")):
    """A tiny random CLIP folder (model, processor, tokenizer over `words`) that transformers loads offline."""
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPProcessor

    from .worlds.tokenizer import build_clip_tokenizer

    tok = build_clip_tokenizer(list(words), model_max_length=16)
    cfg = CLIPConfig(text_config=dict(vocab_size=len(tok), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                      num_attention_heads=4, max_position_embeddings=16, bos_token_id=0, eos_token_id=1),
                     vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
                                        image_size=32, patch_size=8), projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(cfg).save_pretrained(path)
    CLIPProcessor(image_processor=CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}),
                  tokenizer=tok).save_pretrained(path)
    return path
