"""Deterministic sampling: DDIM with eta = 0 from initial latents fixed per (prompt, seed).

The initial latent of (prompt, seed) is drawn on the CPU from a `torch.Generator` seeded with a
stable hash of both, so teacher and student (and any device) start from the same noise, and
the same call gives the same images every time on the same machine.
"""
from __future__ import annotations

import hashlib
import inspect
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
import torch.distributed as dist
from diffusers import DDIMScheduler
from tqdm.auto import tqdm

from .errors import FastUnlearnError


@dataclass(frozen=True)
class SamplerConfig:
    num_inference_steps: int = 25
    guidance_scale: float = 4.0
    height: int | None = None  # None: the pipeline's default size
    width: int | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def latent_seed(prompt: str, seed: int) -> int:
    """A stable 63-bit generator seed for (prompt, seed), the same in every process and on every machine."""
    digest = hashlib.sha256(f"{prompt}\x00{int(seed)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def latent_shape(pipe, height: int | None = None, width: int | None = None) -> tuple[int, int, int]:
    scale = pipe.vae_scale_factor
    height = height or pipe.unet.config.sample_size * scale
    width = width or pipe.unet.config.sample_size * scale
    return (pipe.unet.config.in_channels, height // scale, width // scale)


def initial_latents(prompts, seeds, shape) -> torch.Tensor:
    """(N, *shape) fp32 CPU standard normal latents, one generator per (prompt, seed)."""
    if len(prompts) != len(seeds):
        raise FastUnlearnError(f"got {len(prompts)} prompts but {len(seeds)} seeds")
    out = torch.empty(len(prompts), *shape)
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        out[i] = torch.randn(shape, generator=torch.Generator().manual_seed(latent_seed(p, s)))
    return out


@contextmanager
def ddim_view(pipe):
    """Temporarily give `pipe` a DDIM scheduler built from its own scheduler config, and no progress bar."""
    old_scheduler, old_bar = pipe.scheduler, dict(getattr(pipe, "_progress_bar_config", {}))
    pipe.scheduler = DDIMScheduler.from_config(old_scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    try:
        yield pipe
    finally:
        pipe.scheduler = old_scheduler
        pipe._progress_bar_config = old_bar


@torch.no_grad()
def sample(pipe, prompts, seeds, config: SamplerConfig = SamplerConfig(), batch_size: int = 64,
           output_type: str = "pt", progress: bool | str = True) -> torch.Tensor:
    """Images for each (prompt, seed) pair: (N, 3, H, W) fp32 in [0, 1] on the CPU
    (or the final latents with output_type="latent")."""
    prompts, seeds = list(prompts), list(seeds)
    if not prompts:
        raise FastUnlearnError("no prompts to sample")
    shape = latent_shape(pipe, config.height, config.width)
    latents = initial_latents(prompts, seeds, shape)
    device, dtype = pipe.unet.device, pipe.unet.dtype
    scale = pipe.vae_scale_factor
    outs = []
    desc = progress if isinstance(progress, str) else "sampling"
    with ddim_view(pipe):
        for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=not progress, leave=False):
            out = pipe(prompt=prompts[i:i + batch_size], latents=latents[i:i + batch_size].to(device, dtype),
                       num_inference_steps=config.num_inference_steps, guidance_scale=config.guidance_scale,
                       height=shape[1] * scale, width=shape[2] * scale, eta=0.0, output_type=output_type,
                       return_dict=False)[0]
            outs.append(out.float().cpu())
    return torch.cat(outs)


def with_unet(pipe, unet):
    """The same pipeline with another UNet (no weights copied)."""
    kwargs = dict(pipe.components)
    kwargs["unet"] = unet
    if "requires_safety_checker" in inspect.signature(type(pipe).__init__).parameters:
        kwargs["requires_safety_checker"] = False
    out = type(pipe)(**kwargs)
    out.set_progress_bar_config(disable=True)
    return out


def sample_sharded(pipe, prompts, seeds, sampler: SamplerConfig, progress=False, output_type="pt") -> torch.Tensor:
    """`sample` split across the ranks of a process group (every rank gets all images).
    Each rank runs the same number of UNet calls, so ZeRO-3's collective forwards line up."""
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        return sample(pipe, prompts, seeds, sampler, progress=progress, output_type=output_type)
    rank = dist.get_rank()
    n = len(prompts)
    per = -(-n // world)
    idx = [min(i, n - 1) for i in range(rank * per, (rank + 1) * per)]
    mine = sample(pipe, [prompts[i] for i in idx], [seeds[i] for i in idx], sampler, batch_size=per, progress=False,
                  output_type=output_type)
    gathered = [None] * world
    dist.all_gather_object(gathered, mine)
    return torch.cat(gathered)[:n]
