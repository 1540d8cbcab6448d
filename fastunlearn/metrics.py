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

    @property
    def device(self) -> torch.device:
        return self.classifier.head.weight.device

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: (B, 3, H, W) in [0, 1], on any device (moved to the classifier's)."""
        return self.classifier.features(images.to(self.device) * 2 - 1)

    def distance(self, f0, f1) -> torch.Tensor:
        return lpips_distance(f0, f1, [w.to(f0[0].device) for w in self.lin_weights])

    @torch.no_grad()
    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 64) globally pooled last conv features: the `fid-digits` embedding. images in [0, 1], on any device."""
        return DigitsPerceptual.features(self, images)[-1].mean((2, 3))


TORCHVISION_FILES = {"alex": ("alexnet", "alexnet-owt-7be5be79.pth"), "vgg": ("vgg16", "vgg16-397923af.pth"),
                      "squeeze": ("squeezenet1_1", "squeezenet1_1-b8a52dc0.pth")}
TORCHVISION_URL = "https://download.pytorch.org/models/{}"
# torch-fidelity's InceptionV3 (torch_fidelity.feature_extractor_inceptionv3.URL_INCEPTION_V3), used by torchmetrics
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"
INCEPTION_URL = f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}"
OFFLINE_VARS = ("FASTUNLEARN_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline() -> str | None:
    """The environment variable that makes this process offline (set to 1/true/yes/on), or None."""
    import os

    return next((k for k in OFFLINE_VARS if os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")), None)


def _download(url: str, dst: str, hash_prefix: str | None = None) -> None:
    """Download `url` to `dst` (torch.hub's temp-file-then-rename), giving up on a silent network after 60 s."""
    import socket

    old = socket.getdefaulttimeout()
    socket.setdefaulttimeout(60)
    try:
        torch.hub.download_url_to_file(url, dst, hash_prefix=hash_prefix, progress=False)
    finally:
        socket.setdefaulttimeout(old)


def weights_file(filename: str, url: str, what: str, path=None, flag: str = "", hash_prefix: str | None = None) -> str:
    """The local file of a network's pretrained weights, the way torchvision and torch-fidelity find them:
    `path` when given (it must exist); else `torch.hub.get_dir()/checkpoints/filename`, downloaded from `url`
    when missing unless offline (FASTUNLEARN_OFFLINE, HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE set). When neither
    works: a one-line FastUnlearnError naming the file and the command that fetches it."""
    import os
    import shlex

    if path is not None and str(path).strip():
        path = os.path.expanduser(str(path))
        if not os.path.isfile(path):
            raise FastUnlearnError(f"{what}: weights file {path} does not exist (expected {filename}, from {url})")
        return path
    folder = os.path.join(torch.hub.get_dir(), "checkpoints")
    cache = os.path.join(folder, filename)
    if os.path.isfile(cache):
        return cache
    off = offline()
    if off:
        reason = f"offline ({off}={os.environ[off]})"
    else:
        try:
            os.makedirs(folder, exist_ok=True)
            _download(url, cache, hash_prefix)
        except Exception as exc:  # no network, a proxy, a full disk, a hash mismatch: say so in one line
            reason = "its download failed: " + " ".join(f"{type(exc).__name__}: {exc}".split())[:200]
        else:
            if os.path.isfile(cache):
                return cache
            reason = "its download wrote nothing"
    fetch = f"mkdir -p {shlex.quote(folder)} && curl -fL -o {shlex.quote(cache)} {url}"
    raise FastUnlearnError(f"{what} needs {cache}: not there and {reason}; fetch it with `{fetch}`"
                           + (f" or give its path with {flag}" if flag else ""))


def load_weights(path: str, what: str) -> dict:
    """A state dict from a .safetensors file or a torch.save file (weights_only: no code is unpickled)."""
    try:
        if str(path).endswith(".safetensors"):
            from safetensors.torch import load_file

            return load_file(str(path))
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise FastUnlearnError(f"cannot load {what} from {path}: " + " ".join(str(exc).split())[:200]) from None
    if not isinstance(state, dict):
        raise FastUnlearnError(f"{path} is not a state dict of {what} (a {type(state).__name__})")
    return state


def lpips_backbone_file(net: str = "alex", backbone_weights=None) -> str:
    """The torchvision backbone file of LPIPS-`net` (`weights_file`: the given path, the cache, or a download)."""
    import re

    if net not in TORCHVISION_FILES:
        raise FastUnlearnError(f"unknown LPIPS network {net!r}; choose one of alex, vgg, squeeze")
    arch, filename = TORCHVISION_FILES[net]
    match = re.search(r"-([a-f0-9]+)\.pth$", filename)  # torchvision's files carry a sha256 prefix
    return weights_file(filename, TORCHVISION_URL.format(filename), f"LPIPS-{net} (torchvision's pretrained {arch} "
                        "weights)", backbone_weights, "--lpips-weights PATH (eval.lpips_weights)",
                        match.group(1) if match else None)


class LPIPS(torch.nn.Module):
    """LPIPS v0.1 (the `lpips` package's linear weights) with a cacheable `features` step and a fused
    `distance` step (`fastunlearn.ops.lpips_distance`). Equals `lpips.LPIPS(net=...)` given the same
    backbone weights.

    backbone_weights: a torchvision state dict file of the backbone (alexnet / vgg16 / squeezenet1_1;
    torch.save or .safetensors); default: torchvision's file in the torch hub cache, downloaded there when
    missing and online (`weights_file`), else a one-line error naming the file.
    """

    def __init__(self, net: str = "alex", backbone_weights: str | None = None):
        super().__init__()
        import lpips
        import torchvision

        backbone_weights = lpips_backbone_file(net, backbone_weights)
        arch = TORCHVISION_FILES[net][0]
        self.name = f"lpips-{net}"
        self.net_name = net
        ref = lpips.LPIPS(net=net, pnet_rand=True, verbose=False)  # linear weights from the package, no download
        tv = getattr(torchvision.models, arch)(weights=None)
        try:
            tv.load_state_dict(load_weights(backbone_weights, f"{arch} weights"))
        except RuntimeError as exc:
            raise FastUnlearnError(f"cannot load {arch} weights from {backbone_weights}: "
                                   + " ".join(str(exc).split())[:200]) from None
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
        images = images.to(self.lin_weights[0].device)  # the network's device: samples come back on the CPU
        x = images * 2 - 1 if normalize else images
        return list(self.net(self.scaling_layer(x)))

    def distance(self, f0, f1) -> torch.Tensor:
        return lpips_distance(f0, f1, list(self.lin_weights))

    def forward(self, in0, in1, normalize: bool = False) -> torch.Tensor:
        """(B, 1, 1, 1) like `lpips.LPIPS.forward`; inputs in [-1, 1], or [0, 1] with normalize=True."""
        d = self.distance(self.features(in0, normalize), self.features(in1, normalize))
        return d.view(-1, 1, 1, 1)


def inception_file(weights=None) -> str:
    """torch-fidelity's InceptionV3 weights file (`weights_file`: the given path, the cache, or a download)."""
    return weights_file(INCEPTION_FILE, INCEPTION_URL, "FID (Inception, torch-fidelity's InceptionV3 weights)",
                        weights, "--fid-weights PATH (eval.fid_weights)")


class _Features(torch.nn.Identity):
    """The "network" torchmetrics' FID/KID get: features computed once by `InceptionFID.embed` pass through."""

    num_features = 2048


class InceptionFID:
    """Inception FID and KID through torchmetrics (torch-fidelity's InceptionV3, 2048-d pool features, as
    `FrechetInceptionDistance(feature=2048, normalize=True)`) between two image sets (N, 3, H, W) in [0, 1].
    `weights`: torch-fidelity's weights file (torch.save or .safetensors); default: `inception_file()`. The
    file is read with weights_only (or safetensors) and handed to torch-fidelity as bytes written here."""

    name = "inception"

    def __init__(self, weights=None, device=None):
        import io

        try:
            from torchmetrics.image.fid import FrechetInceptionDistance, NoTrainInceptionV3
            from torchmetrics.image.kid import KernelInceptionDistance
        except (ImportError, ModuleNotFoundError) as exc:
            raise FastUnlearnError(f"eval.fid inception needs torchmetrics and torch-fidelity ({exc}): "
                                   "pip install 'fastunlearn[fid]'") from None
        self.path = inception_file(weights)
        state = load_weights(self.path, "InceptionV3 weights")
        buffer = io.BytesIO()  # torch-fidelity torch.load()s what it is given: only bytes written here
        torch.save(state, buffer)
        buffer.seek(0)
        try:
            self.network = NoTrainInceptionV3(name="inception-v3-compat", features_list=["2048"],
                                              feature_extractor_weights_path=buffer)
        except RuntimeError as exc:  # keys or shapes that are not torch-fidelity's InceptionV3
            raise FastUnlearnError(f"cannot load InceptionV3 weights from {self.path}: "
                                   + " ".join(str(exc).split())[:200]) from None
        self._fid, self._kid = FrechetInceptionDistance, KernelInceptionDistance
        self.device = device  # None: this rank's current CUDA device when embedding, else the CPU

    @torch.no_grad()
    def embed(self, images: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """(N, 2048) fp64 pool features of images (N, 3, H, W) in [0, 1], quantised to uint8 as torchmetrics does."""
        device = torch.device(self.device) if self.device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu"))
        self.network.to(device)
        out = [self.network((images[i:i + batch_size].to(device).float().clamp(0, 1) * 255).byte()).double()
               for i in range(0, len(images), batch_size)]
        return torch.cat(out).cpu()

    @torch.no_grad()
    def compare(self, real: torch.Tensor, fake: torch.Tensor, real_features=None) -> dict:
        """{"fid", "kid", "kid_std"} of `fake` against `real` (torchmetrics' FID and KID: polynomial kernel,
        100 subsets of min(1000, N) images); at least 2 images a side. `real_features`: `embed(real)`, if known."""
        import warnings

        if min(len(real), len(fake)) < 2:
            raise FastUnlearnError(f"Inception FID needs at least 2 images a side, got {len(real)} and {len(fake)}")
        f_real = real_features if real_features is not None else self.embed(real)
        f_fake = self.embed(fake)
        # sync_on_compute=False: every rank holds every image (sample_sharded), nothing to gather
        fid = self._fid(feature=_Features(), sync_on_compute=False)
        with warnings.catch_warnings():  # "KID will save all extracted features": 2048 floats an image, known
            warnings.simplefilter("ignore", UserWarning)
            kid = self._kid(feature=_Features(), subsets=100, subset_size=min(1000, len(real), len(fake)),
                            sync_on_compute=False)
        for features, is_real in ((f_real, True), (f_fake, False)):
            fid.update(features, real=is_real)
            kid.update(features, real=is_real)
        kid_mean, kid_std = kid.compute()
        return {"fid": float(fid.compute()), "kid": float(kid_mean), "kid_std": float(kid_std)}


def paired_distance(perceptual, teacher_images: torch.Tensor, student_images: torch.Tensor, teacher_features=None,
                    batch_size: int = 256) -> dict:
    """Per-sample LPIPS between paired images (N, 3, H, W in [0, 1]); returns mean, ci95 and values."""
    if teacher_images.shape != student_images.shape:
        raise FastUnlearnError(f"paired_distance: teacher images {tuple(teacher_images.shape)} and student images "
                               f"{tuple(student_images.shape)} differ in shape")
    values = []
    for i in range(0, len(student_images), batch_size):
        f1 = perceptual.features(student_images[i:i + batch_size])
        f0 = ([f[i:i + batch_size].to(f1[0].device) for f in teacher_features] if teacher_features is not None
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
            item = {"image": imgs[j].cpu().contiguous(), **{f"f{k}": f[j].cpu().contiguous() for k, f in enumerate(feats)}}
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
