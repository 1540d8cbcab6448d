"""The embedded default world: a tiny but real Stable Diffusion pipeline trained on sklearn's digits.

`load_world()` returns the cached world, building it first when it is missing, partial or
corrupt. The build trains, on the CPU: a digit classifier (the judge), an `AutoencoderKL`,
and a `CLIPTextModel` + `UNet2DConditionModel` jointly, then saves a `StableDiffusionPipeline`
with `save_pretrained`, so it loads through exactly the code path that loads SD 1.5.

    python -m fastunlearn.worlds.digits [--cache-dir DIR] [--out DIR]

writes a labelled grid of samples for every digit and a JSON with the classifier's accuracy.
"""
from __future__ import annotations

import argparse
import copy
import fcntl
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ...errors import FastUnlearnError, cli_errors
from ...paths import cache_root, ensure_writable_dir
from ...sampling import SamplerConfig, sample
from .classifier import DigitClassifier, train_classifier

WORLD_VERSION = "digits-v1"
DIGIT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
TEMPLATES = [
    "a handwritten digit {word}",
    "the number {digit}",
    "a drawing of the digit {digit}",
    "handwritten {word}",
    "an image of the number {word}",
    "digit {digit}",
]
IMAGE_SIZE = 32


def digit_prompts(digit: int) -> list[str]:
    """The six phrasings of one digit; the first is the canonical prompt."""
    return [t.format(word=DIGIT_WORDS[digit], digit=digit) for t in TEMPLATES]


def digit_of_prompt(prompt: str) -> int | None:
    """The digit a digits-world prompt names, or None."""
    words = prompt.lower().split()
    for d, w in enumerate(DIGIT_WORDS):
        if w in words or str(d) in words:
            return d
    return None


def prompt_words() -> list[str]:
    return sorted({w for d in range(10) for p in digit_prompts(d) for w in p.split()})


def eval_pairs(digits, per_digit: int, seed_offset: int = 0):
    """(prompts, seeds, labels) for `per_digit` samples of each digit, cycling through the phrasings."""
    prompts, seeds, labels = [], [], []
    for d in digits:
        phrasings = digit_prompts(d)
        for i in range(per_digit):
            prompts.append(phrasings[i % len(phrasings)])
            seeds.append(seed_offset + i)
            labels.append(d)
    return prompts, seeds, labels


@dataclass
class Recipe:
    """How the world is trained. The default fits in a few minutes on 2 CPU cores."""

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
    eval_per_digit: int = 20
    sampler: dict = field(default_factory=lambda: SamplerConfig(num_inference_steps=25, guidance_scale=4.0).to_dict())


FAST_RECIPE = Recipe(classifier_steps=30, vae_steps=20, unet_steps=20, eval_per_digit=2,
                     sampler=SamplerConfig(num_inference_steps=3, guidance_scale=4.0).to_dict())


def load_digit_images():
    """All 1,797 sklearn digits as (N, 1, 32, 32) fp32 in [-1, 1], with labels (N,) int64."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    return x * 2 - 1, torch.tensor(data.target, dtype=torch.long)


def heldout_split(n: int, seed: int = 0, frac: float = 0.2):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    k = int(n * frac)
    return perm[k:], perm[:k]


# ---------------------------------------------------------------------------------------------------------
# Building


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
        bar.update(1)
        bar.set_postfix(stage="vae", loss=f"{loss.item():.4f}")
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
        bar.update(1)
        bar.set_postfix(stage="unet", loss=f"{loss.item():.4f}")
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


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _files_problem(root: Path, files: dict[str, str]) -> str | None:
    """Why the files a manifest lists under `root` ({relative path: sha256}) are unusable, or None."""
    for rel, digest in files.items():
        if not (root / rel).is_file():
            return f"partial ({rel} missing)"
        if _sha256(root / rel) != digest:
            return f"corrupt ({rel} does not match its checksum)"
    return None


def _file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "world.json"}


def build_world(dest: Path, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    """Train every part of the world and save it into `dest` (which must not exist). Returns world.json's dict."""
    from diffusers import StableDiffusionPipeline

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
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    sampler = SamplerConfig(**recipe.sampler)
    per_digit, _, _ = score_pipeline(pipe, classifier, per_digit=recipe.eval_per_digit, sampler=sampler,
                                     progress=progress)
    pipe.save_pretrained(dest / "pipeline", safe_serialization=True)
    classifier.save(dest / "classifier")
    info = {
        "version": WORLD_VERSION,
        "recipe": asdict(recipe),
        "classifier_heldout_accuracy": heldout_acc,
        "classifier_heldout_size": len(held_idx),
        "base_accuracy": sum(per_digit.values()) / len(per_digit),
        "base_accuracy_per_digit": per_digit,
        "base_accuracy_samples_per_digit": recipe.eval_per_digit,
        "sampler": recipe.sampler,
        "build_seconds": round(time.time() - t0, 1),
        "torch": torch.__version__,
        "files": _file_hashes(dest),
    }
    (dest / "world.json").write_text(json.dumps(info, indent=2))  # written last: marks the build complete
    return info


# ---------------------------------------------------------------------------------------------------------
# Loading and the cache


@dataclass
class DigitsWorld:
    path: Path
    info: dict
    pipeline: object
    classifier: DigitClassifier

    @property
    def pipeline_path(self) -> Path:
        return self.path / "pipeline"

    @property
    def sampler(self) -> SamplerConfig:
        return SamplerConfig(**self.info["sampler"])


def world_problem(path: Path, recipe: Recipe | None = None, version: str = WORLD_VERSION) -> str | None:
    """Why the world at `path` cannot be used (missing, partial, corrupt, stale), or None if it is complete."""
    manifest = path / "world.json"
    if not path.exists():
        return "missing"
    if not manifest.is_file():
        return "partial (no world.json)"
    try:
        info = json.loads(manifest.read_text())
        files = info["files"]
    except (OSError, ValueError, KeyError):
        return "corrupt world.json"
    if info.get("version") != version:
        return f"built by another version ({info.get('version')})"
    if recipe is not None and info.get("recipe") != asdict(recipe):
        return "built with another recipe"
    return _files_problem(path, files)


@contextmanager
def _lock(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def world_path(cache_dir=None, recipe: Recipe = Recipe(), version: str = WORLD_VERSION) -> Path:
    """The cache folder of a world: named by its version, plus a hash of the recipe when not the default one."""
    name = version if recipe == type(recipe)() else f"{version}-{hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode()).hexdigest()[:10]}"
    return cache_root(cache_dir) / name


def ensure_built(path: Path, recipe, build, version: str, name: str, summary, progress: bool = True,
                 rebuild: bool = False) -> Path:
    """`path` once it holds a complete world: built by `build(tmp, recipe, progress)` into a temporary folder and
    moved into place (atomically, under a lock) when missing, partial or corrupt. `summary(info)`: what to print."""
    root = ensure_writable_dir(path.parent)
    with _lock(root / f".{path.name}.lock"):
        problem = "rebuild requested" if rebuild else world_problem(path, recipe, version)
        if problem is None:
            return path
        if problem != "missing":
            print(f"fastunlearn: {name} world at {path} is {problem}; rebuilding", file=sys.stderr)
        tmp = root / f".{path.name}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            info = build(tmp, recipe, progress)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            print(f"fastunlearn: built the {name} world in {info['build_seconds']:.0f} s at {path}: {summary(info)}",
                  file=sys.stderr)
    return path


def ensure_world(cache_dir=None, recipe: Recipe = Recipe(), progress: bool = True, rebuild: bool = False) -> Path:
    """Path of a complete world, building it (atomically, under a lock) when missing, partial or corrupt."""
    return ensure_built(world_path(cache_dir, recipe), recipe, build_world, WORLD_VERSION, "digits",
                        lambda info: f"classifier held-out accuracy {info['classifier_heldout_accuracy']:.3f}, base "
                                     f"pipeline draws the prompted digit {info['base_accuracy']:.3f} of the time",
                        progress, rebuild)


def load_world(cache_dir=None, recipe: Recipe = Recipe(), progress: bool = True, device="cpu") -> DigitsWorld:
    from diffusers import StableDiffusionPipeline

    path = ensure_world(cache_dir, recipe, progress)
    pipe = StableDiffusionPipeline.from_pretrained(path / "pipeline", safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    info = json.loads((path / "world.json").read_text())
    return DigitsWorld(path, info, pipe, DigitClassifier.load(path / "classifier").to(device))


# ---------------------------------------------------------------------------------------------------------
# Pictures and the CLI


def save_digit_grid(images: torch.Tensor, labels, path: Path, title: str | None = None, row_names=None) -> None:
    """One row per digit (labelled), samples along the row. images: (N, 3, H, W) in [0, 1]."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(int(x) for x in labels)
    rows = sorted(set(labels))
    cols = max(labels.count(r) for r in rows)
    fig, axes = plt.subplots(len(rows), cols, figsize=(0.6 * cols + 1.2, 0.62 * len(rows) + 0.4), squeeze=False)
    for r, d in enumerate(rows):
        idx = [i for i, lab in enumerate(labels) if lab == d]
        for c in range(cols):
            ax = axes[r][c]
            ax.set_xticks([])
            ax.set_yticks([])
            for s in ax.spines.values():
                s.set_visible(False)
            if c < len(idx):
                ax.imshow(images[idx[c]].permute(1, 2, 0).clamp(0, 1).numpy(), interpolation="nearest")
        axes[r][0].set_ylabel(row_names[r] if row_names else f'"{d}"', rotation=0, ha="right", va="center",
                              fontsize=10)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@cli_errors
def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fastunlearn.worlds.digits", description=(
        "Build (or load) the embedded digits world, then write a labelled grid of its samples and the "
        "classifier's accuracy on them."))
    p.add_argument("--cache-dir", default=None, help="cache directory (default: $FASTUNLEARN_CACHE or ~/.cache/fastunlearn)")
    p.add_argument("--out", default="outputs/digits", help="where to write grid.png and samples.json (default: %(default)s)")
    p.add_argument("--samples-per-digit", type=int, default=20, help="samples per digit (default: %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=None, help="guidance scale (default: the world's, 4.0)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the world's, 25)")
    p.add_argument("--rebuild", action="store_true", help="rebuild the world even if a complete one is cached")
    args = p.parse_args(argv)
    if args.samples_per_digit < 1:
        raise FastUnlearnError("--samples-per-digit must be at least 1")
    if args.rebuild:
        ensure_world(args.cache_dir, rebuild=True)
    world = load_world(args.cache_dir)
    from .clip import ensure_clip

    clip_info = json.loads((ensure_clip(world.path) / "clip.json").read_text())
    sampler = world.sampler
    sampler = SamplerConfig(args.steps or sampler.num_inference_steps,
                            sampler.guidance_scale if args.guidance_scale is None else args.guidance_scale)
    per_digit, images, labels = score_pipeline(world.pipeline, world.classifier, per_digit=args.samples_per_digit,
                                               sampler=sampler)
    out = ensure_writable_dir(Path(args.out), "output directory")
    accuracy = sum(per_digit.values()) / len(per_digit)
    shown = [i for i, lab in enumerate(labels.tolist()) if sum(1 for x in labels[:i].tolist() if x == lab) < 10]
    save_digit_grid(images[shown], labels[shown], out / "grid.png",
                    title=f"digits world base pipeline: {accuracy:.1%} drawn as the prompted digit "
                          f"(guidance {sampler.guidance_scale}, {sampler.num_inference_steps} DDIM steps)")
    result = {"world": str(world.path), "accuracy": accuracy, "accuracy_per_digit": per_digit,
              "samples_per_digit": args.samples_per_digit, "sampler": sampler.to_dict(),
              "classifier_heldout_accuracy": world.info["classifier_heldout_accuracy"],
              "clip_zero_shot_heldout_accuracy": clip_info["zero_shot_heldout_accuracy"]}
    (out / "samples.json").write_text(json.dumps(result, indent=2))
    print(f"classifier held-out accuracy: {result['classifier_heldout_accuracy']:.3f}; the world's CLIP, zero-shot: "
          f"{result['clip_zero_shot_heldout_accuracy']:.3f}")
    print(f"base pipeline draws the prompted digit: {accuracy:.3f} "
          f"({args.samples_per_digit} samples per digit); per digit: "
          + " ".join(f"{d}:{a:.2f}" for d, a in per_digit.items()))
    print(f"wrote {out / 'grid.png'} and {out / 'samples.json'}")
    return 0
