"""The styles world: the digits world's recipe on the sklearn digits drawn in 8 ink styles (4 colours x 2
strokes), prompted by digit and style. Built, cached and checksummed like the digits world (whose building
blocks it uses), so erasure has neighbours on two axes: a style (other styles, same digits) and a digit
(other digits, same styles).

    python -m fastunlearn.worlds.styles [--cache-dir DIR] [--out DIR]

writes a grid of samples (one row per style) and the judges' accuracy on them.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ...errors import cli_errors
from ...paths import ensure_writable_dir
from ...sampling import SamplerConfig, sample
from .. import cache
from ..build import TrainerRecipe, assemble_pipeline, save_world
from ..cache import BuiltWorld
from ..cli import save_digit_grid, world_command
from ..digits import build as digits
from ..digits import data as digits_data
from .judge import AxisClassifier, InkDigitClassifier, train_ink_classifier
from .prompts import COMBINATIONS, combo_prompts, prompt_words
from .render import STYLES, render_styles

WORLD_VERSION = "styles-v1"


@dataclass
class Recipe(TrainerRecipe):
    """How the world is trained (the fields that the trainers read, TrainerRecipe, with more VAE and UNet steps;
    and the evaluation). Provisional defaults: the full build and its timing on 2 CPU cores are not measured yet."""

    vae_steps: int = 800  # TrainerRecipe's field, in its place: world.json lists the recipe in the same order
    unet_steps: int = 3000
    eval_per_combination: int = 20
    digits_per_style: int = 0  # 0: all 1,797 sklearn digits in every style; k: the first k (reduced recipes)
    sampler: dict = field(
        default_factory=lambda: SamplerConfig(num_inference_steps=25, guidance_scale=4.0).to_dict())


FAST_RECIPE = Recipe(classifier_steps=30, vae_steps=10, unet_steps=10, eval_per_combination=1,
                     digits_per_style=200,
                     sampler=SamplerConfig(num_inference_steps=2, guidance_scale=4.0).to_dict())


@lru_cache(maxsize=1)
def _styled():
    from sklearn.datasets import load_digits

    data = load_digits()
    images, styles = render_styles(torch.tensor(data.images, dtype=torch.float32).unsqueeze(1))
    digits_ = torch.tensor(data.target, dtype=torch.long).repeat(len(STYLES))
    return images, digits_, styles


def load_styled_images():
    """Every sklearn digit in every style: (1797 * 8, 3, 32, 32) fp32 in [-1, 1], digit labels and style
    indices (N,) int64, style-major (image i is digit i % 1797 in style i // 1797). Rendered once per
    process."""
    images, digits_, styles = _styled()
    return images.clone(), digits_.clone(), styles.clone()


def heldout_split(seed: int = 0, digits_per_style: int = 0):
    """(train, held-out) indices into load_styled_images() (or, with `digits_per_style` k, into its first k
    digits of every style, style-major): the digits world's split of the digits, in every style (a held-out
    digit is held out in all its styles)."""
    n = digits_per_style or len(_styled()[0]) // len(STYLES)
    train, held = digits_data.heldout_split(n, seed)
    return tuple(torch.cat([idx + s * n for s in range(len(STYLES))]) for idx in (train, held))


def score_pipeline(pipe, classifier, per_combination: int = 20, sampler: SamplerConfig | None = None,
                   seed_offset: int = 0, progress=True):
    """Sample `per_combination` images of each (digit, style) in its canonical prompt, from seeds
    seed_offset + 0, 1, ...; returns (scores, images, digits, styles); scores: digit_accuracy (the
    classifier), style_accuracy (the exact style rules), both_accuracy, and per digit / per style."""
    prompts, seeds, labels, styles = [], [], [], []
    for d, s in COMBINATIONS:
        for i in range(per_combination):
            prompts.append(combo_prompts(d, s)[0])
            seeds.append(seed_offset + i)
            labels.append(d)
            styles.append(s)
    images = sample(pipe, prompts, seeds, sampler or SamplerConfig(), batch_size=200,
                    progress="scoring" if progress else False)
    labels, styles = torch.tensor(labels), torch.tensor(styles)
    digit_ok = (classifier.predict(images * 2 - 1).cpu() == labels).float()
    style_ok = (AxisClassifier("style").predict(images * 2 - 1) == styles).float()
    def per_style(ok):
        return {name: float(ok[styles == s].mean()) for s, name in enumerate(STYLES)}

    scores = {"digit_accuracy": float(digit_ok.mean()), "style_accuracy": float(style_ok.mean()),
              "both_accuracy": float((digit_ok * style_ok).mean()),
              "digit_accuracy_per_digit": {d: float(digit_ok[labels == d].mean()) for d in range(10)},
              "style_accuracy_per_style": per_style(style_ok),
              "digit_accuracy_per_style": per_style(digit_ok)}
    return scores, images, labels, styles


def build_world(dest: Path, recipe: Recipe = Recipe(), progress: bool = True) -> dict:
    """Train every part of the world and save it into `dest` (which must not exist). Returns world.json's
    dict."""
    from ..tokenizer import build_clip_tokenizer

    t0 = time.time()
    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    images, labels, styles = load_styled_images()
    if recipe.digits_per_style:
        n = len(images) // len(STYLES)
        used = torch.cat([torch.arange(recipe.digits_per_style) + s * n for s in range(len(STYLES))])
        images, labels, styles = images[used], labels[used], styles[used]
    train_idx, held_idx = heldout_split(recipe.seed, recipe.digits_per_style)
    total = recipe.classifier_steps + recipe.vae_steps + recipe.unet_steps
    with tqdm(total=total, desc="building styles world", unit="step", disable=not progress) as bar:
        bar.set_postfix(stage="classifier")
        classifier = train_ink_classifier(images[train_idx], labels[train_idx], recipe.classifier_steps,
                                          recipe.seed, progress=bar)
        heldout_acc = float((classifier.predict(images[held_idx]) == labels[held_idx]).float().mean())
        style_acc = float((AxisClassifier("style").predict(images) == styles).float().mean())
        tokenizer = build_clip_tokenizer(prompt_words())
        vae, text_encoder, unet, scheduler = digits._make_components(tokenizer)
        lat_mean, lat_std = digits._train_vae(vae, images, recipe, gen, bar)
        combo = styles * 10 + labels  # index of COMBINATIONS: (digit, style) = (combo % 10, combo // 10)
        phrasings = [combo_prompts(d, s) for d, s in COMBINATIONS]
        unet, text_encoder = digits._train_unet(unet, text_encoder, tokenizer, scheduler, lat_mean, lat_std,
                                                combo, recipe, gen, bar, phrasings=phrasings)
    pipe = assemble_pipeline(vae, text_encoder, tokenizer, unet, scheduler)
    scores, _, _, _ = score_pipeline(pipe, classifier, recipe.eval_per_combination,
                                     SamplerConfig(**recipe.sampler), progress=progress)
    return save_world(dest, pipe, classifier, {
        "version": WORLD_VERSION,
        "recipe": asdict(recipe),
        "styles": STYLES,
        "classifier_heldout_accuracy": heldout_acc,
        "classifier_heldout_size": len(held_idx),
        "style_judge_accuracy_on_renders": style_acc,
        "base_digit_accuracy": scores["digit_accuracy"],
        "base_style_accuracy": scores["style_accuracy"],
        "base_both_accuracy": scores["both_accuracy"],
        "base_scores": scores,
        "base_samples_per_combination": recipe.eval_per_combination,
    }, recipe, t0)


# ---------------------------------------------------------------------------------------------------------
# Loading and the cache


@dataclass
class StylesWorld(BuiltWorld):
    classifier: InkDigitClassifier


def world_path(cache_dir=None, recipe: Recipe = Recipe()) -> Path:
    return cache.world_path(cache_dir, recipe, WORLD_VERSION)


def world_problem(path: Path, recipe: Recipe | None = None) -> str | None:
    """Why the world at `path` cannot be used (missing, partial, corrupt, stale), or None if complete."""
    return cache.world_problem(path, recipe, WORLD_VERSION)


def _summary(info: dict) -> str:
    return (f"classifier held-out accuracy {info['classifier_heldout_accuracy']:.3f}; the base pipeline "
            f"draws the prompted digit {info['base_digit_accuracy']:.3f} and the prompted style "
            f"{info['base_style_accuracy']:.3f} of the time ({info['base_samples_per_combination']} samples "
            "per combination)")


def ensure_world(cache_dir=None, recipe: Recipe = Recipe(), progress: bool = True,
                 rebuild: bool = False) -> Path:
    """Path of a complete world, building it (atomically, under a lock) when missing, partial or corrupt."""
    return cache.ensure_built(world_path(cache_dir, recipe), recipe, build_world, WORLD_VERSION, "styles",
                              _summary, progress, rebuild)


def load_world(cache_dir=None, recipe: Recipe = Recipe(), progress: bool = True, device="cpu") -> StylesWorld:
    return cache.load_built(ensure_world(cache_dir, recipe, progress), StylesWorld, InkDigitClassifier, device)


# ---------------------------------------------------------------------------------------------------------
# The CLI


@cli_errors
def main(argv=None) -> int:
    args, world = world_command(argv, "python -m fastunlearn.worlds.styles", (
        "Build (or load) the embedded styles world, then write a grid of its samples (a row per style) and "
        "the judges' accuracy on them (digit classifier and exact style rules)."), "outputs/styles",
        ("--samples-per-combination", "samples per (digit, style)"), ensure_world, load_world)
    scores, images, labels, styles = score_pipeline(world.pipeline, world.classifier,
                                                    args.samples_per_combination, world.sampler)
    out = ensure_writable_dir(Path(args.out), "output directory")
    first = [i for i in range(len(labels)) if i % args.samples_per_combination == 0]  # one per combination
    save_digit_grid(images[first], styles[first], out / "grid.png", row_names=STYLES,
                    title=f"styles world: digit {scores['digit_accuracy']:.1%}, style "
                          f"{scores['style_accuracy']:.1%} as prompted")
    result = {"world": str(world.path), **scores, "samples_per_combination": args.samples_per_combination,
              "sampler": world.sampler.to_dict(),
              "classifier_heldout_accuracy": world.info["classifier_heldout_accuracy"]}
    (out / "samples.json").write_text(json.dumps(result, indent=2))
    print(f"base pipeline draws the prompted digit {scores['digit_accuracy']:.3f}, the prompted style "
          f"{scores['style_accuracy']:.3f}, both {scores['both_accuracy']:.3f} "
          f"({args.samples_per_combination} samples per combination); wrote {out / 'grid.png'} and "
          f"{out / 'samples.json'}")
    return 0
