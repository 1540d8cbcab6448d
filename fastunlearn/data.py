"""The training data of a run: its prompts, its x_0 latents and its micro-batches.

* Prompts: forget / retain / anchor prompts from files or the command line (the digits world has
  defaults from --forget-digit).
* x_0 latents: data-free mode (default) samples them once from the teacher per prompt and caches
  them on disk; data mode reads image folders with captions, laid out as diffusers' ImageFolder
  expects (`metadata.jsonl` lines `{"file_name": "a.png", "text": "a caption"}` beside the
  images), encoded once with the pipeline's VAE.
* Micro-batches: `Batches.step(step, micro)` is a pure function of (seed, step, micro, rank).
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import numpy as np
import torch

from . import worlds
from .config import TrainConfig, read_concepts, read_prompts
from .errors import FastUnlearnError
from .groups import retain_prompts_of


def read_image_folder(folder: str | Path, what: str) -> tuple[list[Path], list[str]]:
    """(image paths, captions) from `folder/metadata.jsonl`; every image needs a non-empty caption."""
    folder = Path(folder)
    meta = folder / "metadata.jsonl"
    if not folder.is_dir():
        raise FastUnlearnError(f"{what} folder {folder} does not exist")
    if not meta.is_file():
        raise FastUnlearnError(f"{what} folder {folder} has no metadata.jsonl with captions "
                               '(one line per image: {"file_name": ..., "text": ...})')
    paths, captions = [], []
    for n, line in enumerate(meta.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise FastUnlearnError(f"{meta}:{n} is not valid JSON") from None
        name, text = row.get("file_name"), str(row.get("text") or "").strip()
        if not name or not (folder / name).is_file():
            raise FastUnlearnError(f"{meta}:{n}: image {name!r} not found in {folder}")
        if not text:
            raise FastUnlearnError(f"{what} image {name} has no caption (empty 'text' in {meta}:{n})")
        paths.append(folder / name)
        captions.append(text)
    if not paths:
        raise FastUnlearnError(f"{what} folder {folder}: metadata.jsonl lists no images")
    return paths, captions


def load_images(paths: list[Path], size: int) -> torch.Tensor:
    """(N, 3, size, size) fp32 in [-1, 1]. All images must share one size (resized together to `size`)."""
    from PIL import Image

    sizes = {}
    arrays = []
    for p in paths:
        with Image.open(p) as im:
            sizes.setdefault(im.size, p)
            if len(sizes) > 1:
                (a, pa), (b, pb) = list(sizes.items())[:2]
                raise FastUnlearnError(f"images of mixed sizes: {pa.name} is {a[0]}x{a[1]}, {pb.name} is {b[0]}x{b[1]}")
            arrays.append(np.asarray(im.convert("RGB").resize((size, size), Image.BICUBIC), dtype=np.float32))
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1
    return x


@torch.no_grad()
def encode_latents(pipe, images: torch.Tensor, batch_size: int = 16) -> torch.Tensor:
    """x_0 latents in the UNet's space: VAE posterior mean times the scaling factor (CPU, fp32)."""
    vae = pipe.vae
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    out = []
    for i in range(0, len(images), batch_size):
        x = images[i:i + batch_size].to(vae.device, vae.dtype)
        z = vae.encode(x).latent_dist.mean
        out.append(((z - shift) * vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


def resolve_prompts(cfg: TrainConfig):
    """(forget, retain, anchors, world info, concepts). An embedded world gives defaults (digits: from
    --forget-digit) and its info about the run (None when the run is not one of the world's). `concepts`:
    {name: forget prompts} of a run with several concepts (forget is then all their prompts), else None."""
    concepts = read_concepts(cfg.forget_prompts, cfg.forget_concepts)
    forget = ([q for prompts in concepts.values() for q in prompts] if concepts
              else read_prompts(cfg.forget_prompts, "forget prompt"))
    retain = retain_prompts_of(cfg)  # a retain file of `group: prompt` lines (or retain_groups): all their prompts
    for which, folder in (("forget", cfg.forget_data_dir), ("retain", cfg.retain_data_dir)):
        if folder:
            captions = list(dict.fromkeys(read_image_folder(folder, which)[1]))
            if which == "forget":
                if forget is not None:
                    raise FastUnlearnError("give forget prompts or a forget image folder (its captions), not both")
                forget = captions
            else:
                if retain is not None:
                    raise FastUnlearnError("give retain prompts or a retain image folder (its captions), not both")
                retain = captions
    info = None
    world = worlds.get(cfg.model, cfg.cache_dir)
    if world is not None:
        forget, retain, info = world.prompts(forget, retain, cfg, concepts)
    if forget is None:
        raise FastUnlearnError(f"no forget prompts given for model {cfg.model!r}: use --forget-prompts FILE")
    retain = retain or []
    if cfg.method != "esd" and not retain:
        raise FastUnlearnError(f"method {cfg.method} needs retain prompts: use --retain-prompts FILE")
    both = sorted(set(forget) & set(retain))
    if both:
        raise FastUnlearnError(f"prompt {both[0]!r} is in both the forget and the retain set")
    if cfg.anchor_prompts is not None:
        anchors = read_prompts(cfg.anchor_prompts, "anchor prompt")
    else:  # a world's own anchors for its task (styles: another colour), else the empty prompt
        anchors = (world.anchor_prompts(info, forget) if world is not None and info is not None else None) or [""]
    if len(anchors) == 1:
        anchors = anchors * len(forget)
    if len(anchors) != len(forget):
        raise FastUnlearnError(f"got {len(anchors)} anchor prompts for {len(forget)} forget prompts (give one, or one each)")
    return forget, retain, anchors, info, concepts


def concept_pattern(words) -> re.Pattern:
    """Every whole-word occurrence of one of `words` (case-insensitive, the longest first): what an attack on the
    concept, or robust training, puts its learned token in place of."""
    alts = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
    return re.compile(rf"(?<!\w)(?:{alts})(?!\w)", re.IGNORECASE)


def teacher_latents(pipe, prompts, per_prompt, steps, guidance, cache_key, cfg: TrainConfig, rank):
    """Data-free mode: x_0 latents sampled once from the teacher per prompt, cached on disk, reused."""
    from safetensors.torch import load_file, save_file

    from .engine import from_rank0
    from .paths import cache_root, ensure_writable_dir
    from .sampling import SamplerConfig, sample_sharded

    folder = ensure_writable_dir(cache_root(cfg.cache_dir) / "teacher-latents") if rank == 0 else None
    path = cache_root(cfg.cache_dir) / "teacher-latents" / f"{cache_key}.safetensors"
    lat = None
    if rank == 0 and path.is_file():
        try:
            lat = load_file(str(path))["latents"]
        except Exception:  # a partial file from an interrupted run: sample again
            lat = None
    lat = from_rank0(lat)  # rank 0 decides for all: caches may be node-local, and sampling is collective
    if lat is not None:
        return lat
    all_prompts = [p for p in prompts for _ in range(per_prompt)]
    seeds = [10_000 + i for p in prompts for i in range(per_prompt)]
    lat = sample_sharded(pipe, all_prompts, seeds, SamplerConfig(steps, guidance), output_type="latent")
    if rank == 0:
        tmp = folder / f".{path.name}.tmp-{os.getpid()}"
        save_file({"latents": lat.contiguous()}, str(tmp))
        os.replace(tmp, path)
    return lat


def _hash(prompts, n) -> str:
    return hashlib.sha256(json.dumps([prompts, n]).encode()).hexdigest()[:10]


def training_latents(which, prompts, folder, per_prompt, key, pipe, teacher_pipe, cfg: TrainConfig, rank):
    """(x_0 latents (N, C, h, w) fp32 CPU, the prompt of each row) for the forget or retain set: the
    encoded images of `folder` (data mode), else the teacher's cached samples (data-free)."""
    if folder:
        paths, captions = read_image_folder(folder, which)
        size = pipe.unet.config.sample_size * pipe.vae_scale_factor
        return encode_latents(pipe, load_images(paths, size)), captions
    lat = teacher_latents(teacher_pipe, prompts, per_prompt, cfg.sample_steps, cfg.eval.guidance_scale,
                          f"{key}-{which[0]}-{_hash(prompts, per_prompt)}", cfg, rank)
    return lat, [p for p in prompts for _ in range(per_prompt)]


class Batches:
    """Micro-batches over the run's latents. `step(step, micro)` draws rows, noise and timesteps from a
    generator seeded by (seed, step, micro, rank), so a resumed run sees exactly the same data."""

    def __init__(self, cfg: TrainConfig, scheduler, lat_f, ids_f, anchor_ids, lat_r, ids_r, rank, device, dtype,
                 student, teacher, lat_a=None):
        self.cfg, self.scheduler, self.rank, self.device, self.dtype = cfg, scheduler, rank, device, dtype
        self.lat_f, self.ids_f, self.anchor_ids, self.lat_r, self.ids_r = lat_f, ids_f, anchor_ids, lat_r, ids_r
        self.lat_a = lat_a  # forget_x0_anchor: row i is the teacher's sample of row i's anchor prompt (same noise)
        self.student, self.teacher = student, teacher

    def output_target(self, x0, noise, t):
        """What the UNet predicts for x_t = add_noise(x0, noise, t): noise, velocity or the sample."""
        kind = self.scheduler.config.prediction_type
        if kind == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        return x0 if kind == "sample" else noise

    def step(self, step: int, micro: int):
        from .step import Step

        g = torch.Generator().manual_seed(hash((self.cfg.seed, step, micro, self.rank)) & (2 ** 63 - 1))
        cfg, T = self.cfg, self.scheduler.config.num_train_timesteps
        i_f = torch.randint(0, len(self.lat_f), (cfg.forget_batch_size,), generator=g)
        x0_f = self.lat_f[i_f]
        if self.lat_r is not None:
            i_r = torch.randint(0, len(self.lat_r), (cfg.retain_batch_size,), generator=g)
            x0_r, c_r = self.lat_r[i_r], self.ids_r[i_r]
        else:
            x0_r, c_r = x0_f[:0], self.ids_f[:0]
        n_f, n_r, fresh = (torch.randn(x.shape, generator=g) for x in (x0_f, x0_r, x0_f))
        t_f = torch.randint(min(int(cfg.forget_t_min * T), T - 1), T, (len(x0_f),), generator=g)
        t_r = torch.randint(0, T, (len(x0_r),), generator=g)
        alt = (self.ids_r[torch.randint(0, len(self.ids_r), (len(x0_f),), generator=g)]
               if self.ids_r is not None else self.ids_f[i_f])
        if self.lat_a is not None and cfg.forget_x0_anchor > 0:  # drawn last: the draws above stay today's
            from_anchor = torch.rand(len(i_f), generator=g) < cfg.forget_x0_anchor
            x0_f = torch.where(from_anchor.view(-1, *[1] * (x0_f.dim() - 1)), self.lat_a[i_f], x0_f)
        dev = lambda x: x.to(self.device, self.dtype)  # noqa: E731
        return Step(
            x_f=self.scheduler.add_noise(x0_f, n_f, t_f), x_r=self.scheduler.add_noise(x0_r, n_r, t_r), t_f=t_f, t_r=t_r, c_f=self.ids_f[i_f],
            c_r=c_r, a_f=self.anchor_ids[i_f], alt_r=alt, eps_f=dev(self.output_target(x0_f, n_f, t_f)),
            eps_r=dev(self.output_target(x0_r, n_r, t_r)), fresh_f=dev(self.output_target(x0_f, fresh, t_f)),
            student=self.student, teacher=self.teacher)
