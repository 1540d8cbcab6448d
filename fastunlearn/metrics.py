"""The integrity metric I (docs/metrics.md) and the perceptual networks behind it.

I = mean over (prompt, seed) of LPIPS(teacher image, student image), the two images drawn from
the same initial latent with the same deterministic sampler, reported with a 95 % half-width.
Perceptual networks have a `features(images)` step and a `distance(f0, f1)` step so that the
teacher's features can be computed once and reused.
"""
from __future__ import annotations

import math

import torch

from .errors import FastUnlearnError
from .ops import lpips_distance


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and the 95 % half-width of the mean (normal approximation)."""
    v = values.double().flatten()
    if v.numel() == 0:
        return float("nan"), float("nan")
    half = 1.96 * float(v.std(unbiased=True)) / math.sqrt(v.numel()) if v.numel() > 1 else float("nan")
    return float(v.mean()), half


def frechet_distance(f0: torch.Tensor, f1: torch.Tensor) -> float:
    """FID between two feature sets (N, D): |mu0 - mu1|^2 + Tr(S0 + S1 - 2 (S0 S1)^1/2)."""
    import numpy as np
    from scipy import linalg

    a, b = f0.double().cpu().numpy(), f1.double().cpu().numpy()
    mu0, mu1 = a.mean(0), b.mean(0)
    s0, s1 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean, _ = linalg.sqrtm(s0 @ s1, disp=False)
    if not np.isfinite(covmean).all():  # near-singular product: regularise as pytorch-fid does
        eps = np.eye(s0.shape[0]) * 1e-6
        covmean = linalg.sqrtm((s0 + eps) @ (s1 + eps))
    covmean = covmean.real
    return float(((mu0 - mu1) ** 2).sum() + np.trace(s0) + np.trace(s1) - 2 * np.trace(covmean))


class DigitsPerceptual(torch.nn.Module):
    """`lpips-digits`: the digit classifier's three conv maps with uniform (all-ones) channel weights."""

    name = "lpips-digits"

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.lin_weights = [torch.ones(c) for c in classifier.channels]

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: (B, 3, H, W) in [0, 1]."""
        return self.classifier.features(images * 2 - 1)

    def distance(self, f0, f1) -> torch.Tensor:
        return lpips_distance(f0, f1, [w.to(f0[0].device) for w in self.lin_weights])

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 64) globally pooled last conv features: the `fid-digits` embedding. images in [0, 1]."""
        return self.classifier.features(images * 2 - 1)[-1].mean((2, 3))


TORCHVISION_FILES = {"alex": ("alexnet", "alexnet-owt-7be5be79.pth"), "vgg": ("vgg16", "vgg16-397923af.pth"),
                      "squeeze": ("squeezenet1_1", "squeezenet1_1-b8a52dc0.pth")}


class LPIPS(torch.nn.Module):
    """LPIPS v0.1 (the `lpips` package's linear weights) with a cacheable `features` step and a fused
    `distance` step (`fastunlearn.ops.lpips_distance`). Equals `lpips.LPIPS(net=...)` given the same
    backbone weights.

    backbone_weights: a torchvision state dict file of the backbone (alexnet / vgg16 / squeezenet1_1);
    default: torchvision's file in the local torch hub cache. Nothing is downloaded.
    """

    def __init__(self, net: str = "alex", backbone_weights: str | None = None):
        super().__init__()
        import os

        import lpips
        import torchvision

        if net not in TORCHVISION_FILES:
            raise FastUnlearnError(f"unknown LPIPS network {net!r}; choose one of alex, vgg, squeeze")
        arch, filename = TORCHVISION_FILES[net]
        if backbone_weights is None:
            backbone_weights = os.path.join(torch.hub.get_dir(), "checkpoints", filename)
            if not os.path.isfile(backbone_weights):
                raise FastUnlearnError(
                    f"LPIPS-{net} needs torchvision's pretrained {arch} weights: put {filename} in "
                    f"{os.path.dirname(backbone_weights)} or pass backbone_weights=PATH")
        elif not os.path.isfile(backbone_weights):
            raise FastUnlearnError(f"backbone weights file {backbone_weights} does not exist")
        self.name = f"lpips-{net}"
        self.net_name = net
        ref = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)  # linear weights from the package, no download
        tv = getattr(torchvision.models, arch)(weights=None)
        try:
            tv.load_state_dict(torch.load(backbone_weights, map_location="cpu", weights_only=True))
        except Exception as exc:
            raise FastUnlearnError(f"cannot load {arch} weights from {backbone_weights}: {exc}") from None
        for sl in (getattr(ref.net, f"slice{i}") for i in range(1, ref.L + 1)):
            for idx, module in sl.named_children():  # lpips keeps torchvision's feature indices as names
                module.load_state_dict(tv.features[int(idx)].state_dict())
        self.scaling_layer = ref.scaling_layer
        self.net = ref.net
        self.lin_weights = torch.nn.ParameterList(
            [torch.nn.Parameter(lin.model[-1].weight.detach().flatten().clone(), requires_grad=False) for lin in ref.lins])
        self.eval().requires_grad_(False)

    def features(self, images: torch.Tensor, normalize: bool = True) -> list[torch.Tensor]:
        """Backbone feature maps. images: (B, 3, H, W) in [0, 1] (normalize=True) or [-1, 1]."""
        if min(images.shape[-2:]) < 32:
            raise FastUnlearnError(f"images of {images.shape[-2]}x{images.shape[-1]} px are too small for "
                                   f"{self.name} (at least 32 px a side)")
        x = images * 2 - 1 if normalize else images
        return list(self.net(self.scaling_layer(x)))

    def distance(self, f0, f1) -> torch.Tensor:
        return lpips_distance(f0, f1, list(self.lin_weights))

    def forward(self, in0, in1, normalize: bool = False) -> torch.Tensor:
        """(B, 1, 1, 1) like `lpips.LPIPS.forward`; inputs in [-1, 1], or [0, 1] with normalize=True."""
        d = self.distance(self.features(in0, normalize), self.features(in1, normalize))
        return d.view(-1, 1, 1, 1)


def paired_distance(perceptual, teacher_images: torch.Tensor, student_images: torch.Tensor, teacher_features=None,
                    batch_size: int = 256) -> dict:
    """Per-sample LPIPS between paired images (N, 3, H, W in [0, 1]); returns mean, ci95 and values."""
    if teacher_images.shape != student_images.shape:
        raise FastUnlearnError(f"paired_distance: teacher images {tuple(teacher_images.shape)} and student images "
                               f"{tuple(student_images.shape)} differ in shape")
    values = []
    for i in range(0, len(student_images), batch_size):
        f1 = perceptual.features(student_images[i:i + batch_size])
        f0 = ([f[i:i + batch_size] for f in teacher_features] if teacher_features is not None
              else perceptual.features(teacher_images[i:i + batch_size]))
        values.append(perceptual.distance(f0, f1).float().cpu())
    values = torch.cat(values)
    mean, half = mean_ci95(values)
    return {"mean": mean, "ci95": half, "values": values}


def _pipeline_fingerprint(pipe) -> str:
    from .models import fingerprint

    mods = [pipe.unet, pipe.vae, pipe.text_encoder, getattr(pipe, "text_encoder_2", None)]
    return fingerprint(mods, {"scheduler": dict(pipe.scheduler.config), "class": type(pipe).__name__})


def integrity(teacher, student, prompts, seeds, sampler=None, perceptual=None, cache_dir=None, batch_size: int = 64,
              progress: bool = True) -> dict:
    """The integrity metric I (docs/metrics.md) between two diffusers pipelines, for each (prompts[i], seeds[i]).

    Both pipelines sample with DDIM (eta = 0) from the same CPU-drawn initial latent per (prompt, seed).
    The teacher's images and perceptual features are cached on disk, keyed by a fingerprint of the
    teacher's weights and scheduler, the prompt, the seed, the sampler config and the perceptual network:
    a repeated call samples only the student. Returns {"mean", "ci95", "values", "perceptual"}.
    """
    import hashlib
    import json
    import os

    from safetensors.torch import load_file, save_file

    from .paths import cache_root, ensure_writable_dir
    from .sampling import SamplerConfig, sample

    sampler = sampler or SamplerConfig()
    perceptual = perceptual or LPIPS("alex")
    prompts, seeds = list(prompts), list(seeds)
    if not prompts or len(prompts) != len(seeds):
        raise FastUnlearnError(f"integrity needs one seed per prompt and at least one pair, got {len(prompts)} "
                               f"prompts and {len(seeds)} seeds")
    base = json.dumps([_pipeline_fingerprint(teacher), sampler.to_dict(), perceptual.name], sort_keys=True)
    folder = ensure_writable_dir(cache_root(cache_dir) / "teacher-samples" / hashlib.sha256(base.encode()).hexdigest()[:20])

    def entry(p, s):
        return folder / (hashlib.sha256(f"{p}\x00{s}".encode()).hexdigest()[:24] + ".safetensors")

    cached = {}
    for i, (p, s) in enumerate(zip(prompts, seeds)):
        try:
            cached[i] = load_file(str(entry(p, s)))
        except Exception:  # missing or partial: sample it again
            pass
    missing = [i for i in range(len(prompts)) if i not in cached]
    if missing:
        imgs = sample(teacher, [prompts[i] for i in missing], [seeds[i] for i in missing], sampler, batch_size,
                      progress="teacher" if progress else False)
        feats = perceptual.features(imgs)
        for j, i in enumerate(missing):
            item = {"image": imgs[j].contiguous(), **{f"f{k}": f[j].contiguous() for k, f in enumerate(feats)}}
            tmp = entry(prompts[i], seeds[i]).with_suffix(f".tmp-{os.getpid()}")
            save_file(item, str(tmp))
            os.replace(tmp, entry(prompts[i], seeds[i]))
            cached[i] = item
    t_imgs = torch.stack([cached[i]["image"] for i in range(len(prompts))])
    n_layers = sum(1 for k in cached[0] if k.startswith("f"))
    t_feats = [torch.stack([cached[i][f"f{k}"] for i in range(len(prompts))]) for k in range(n_layers)]
    s_imgs = sample(student, prompts, seeds, sampler, batch_size, progress="student" if progress else False)
    if s_imgs.shape != t_imgs.shape:
        raise FastUnlearnError(f"the two pipelines draw images of different sizes: {tuple(t_imgs.shape[1:])} and "
                               f"{tuple(s_imgs.shape[1:])}")
    out = paired_distance(perceptual, t_imgs, s_imgs, t_feats)
    out["perceptual"] = perceptual.name
    out["teacher_images"], out["student_images"] = t_imgs, s_imgs
    out["teacher_sampled"] = len(missing)
    return out


class CLIPScore:
    """CLIPScore (Hessel et al., 2021): 100 * max(cos(image embedding, prompt embedding), 0), per image,
    with a CLIP model from a local folder (transformers `CLIPModel` + `CLIPProcessor`, safetensors)."""

    def __init__(self, path: str, device="cpu"):
        from pathlib import Path

        from transformers import CLIPModel, CLIPProcessor

        if not Path(path).is_dir():
            raise FastUnlearnError(f"CLIP model folder {path} does not exist")
        try:
            self.model = CLIPModel.from_pretrained(path, local_files_only=True, use_safetensors=True).eval().to(device)
            self.processor = CLIPProcessor.from_pretrained(path, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise FastUnlearnError(f"cannot load a CLIP model from {path}: {str(exc).splitlines()[0]}") from None
        self.device = device
        self.name = f"clip:{Path(path).name}"

    @staticmethod
    def _tensor(out):
        return out if isinstance(out, torch.Tensor) else out.pooler_output

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        """images (N, 3, H, W) in [0, 1], one prompt each -> (N,) scores."""
        if len(prompts) != len(images):
            raise FastUnlearnError(f"CLIPScore: {len(images)} images but {len(prompts)} prompts")
        inputs = self.processor(text=list(prompts), images=[im.float().clamp(0, 1) for im in images],
                                return_tensors="pt", padding=True, truncation=True, do_rescale=False)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        img = self._tensor(self.model.get_image_features(pixel_values=inputs["pixel_values"]))
        txt = self._tensor(self.model.get_text_features(input_ids=inputs["input_ids"],
                                                        attention_mask=inputs.get("attention_mask")))
        return 100 * torch.nn.functional.cosine_similarity(img.float(), txt.float()).clamp(min=0).cpu()
