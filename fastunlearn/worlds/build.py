"""What the build of every embedded world shares: the trainers' part of its recipe (`TrainerRecipe`), its
trained parts assembled into a `StableDiffusionPipeline` (`assemble_pipeline`), and the world saved with its
world.json, written last (`save_world`). The trainers themselves are the digits world's
(fastunlearn/worlds/digits/build.py)."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import file_hashes


@dataclass
class TrainerRecipe:
    """The fields of a world's recipe that the trainers read (defaults: the digits world's). A world's `Recipe`
    adds its evaluation and sampler (and may change a default), after these fields: world.json keeps this order."""

    seed: int = 0
    classifier_steps: int = 1500
    vae_steps: int = 500
    vae_lr: float = 2e-3
    unet_steps: int = 2000
    unet_lr: float = 1e-3
    batch_size: int = 64
    warmup_steps: int = 100
    ema_decay: float = 0.998
    uncond_prob: float = 0.1
    min_snr_gamma: float = 5.0


def assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler):
    """The trained parts as a StableDiffusionPipeline (no safety checker), its progress bars off."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_world(dest: Path, pipe, classifier, info: dict, recipe, t0: float) -> dict:
    """Save the pipeline and the classifier into `dest`, then world.json: `info`, then the recipe's sampler, the
    seconds since `t0`, the torch version and the SHA-256 of every file. Returns world.json's dict."""
    pipe.save_pretrained(dest / "pipeline", safe_serialization=True)
    classifier.save(dest / "classifier")
    info = {
        **info,
        "sampler": recipe.sampler,
        "build_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
        "files": file_hashes(dest),
    }
    (dest / "world.json").write_text(json.dumps(info, indent=2))  # written last: marks the build complete
    return info
