"""Data mode: image folders with captions, laid out as diffusers' ImageFolder expects
(`metadata.jsonl` lines `{"file_name": "a.png", "text": "a caption"}` beside the images).
The images are encoded once with the pipeline's VAE into x_0 latents.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .errors import FastUnlearnError


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
