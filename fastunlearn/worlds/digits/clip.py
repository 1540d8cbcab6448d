"""The digits world's CLIP: a small `transformers.CLIPModel` trained contrastively on the real digits and
the world's prompts, so that the `clip` judge and CLIPScore run in the digits world through exactly the
code path that loads a real CLIP folder (`CLIPModel` + `CLIPProcessor`, safetensors).

Training (docs/metrics.md, "The digits world's CLIP"): image i of a batch is a real digit image (a random shift of
up to 2 px), text i one of its digit's six phrasings. The loss is CLIP's symmetric cross-entropy over the
batch's image-text cosine logits, with every text of the same digit counted as a positive (uniform soft
target over them, as several images of a batch share a digit); the image-to-text direction also sees the
empty prompt and "a photo" as negatives of every image, since the judge uses them as contrast prompts.

Built on first use beside the world (`<world>/clip/`, atomically, under a lock), checked against the
checksums of its `clip.json`. `clip.json` also records the zero-shot accuracy on the held-out real digits
(the classifier's held-out split): an image is read as the digit whose canonical prompt has the highest
logit.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..cache import file_hashes, files_problem, lock, start_rebuild
from .data import TEMPLATES, digit_prompts, heldout_split, load_digit_images, prompt_words

CLIP_VERSION = "digits-clip-v1"
NEGATIVE_PROMPTS = ("", "a photo")


@dataclass
class ClipRecipe:
    seed: int = 0
    steps: int = 400
    batch_size: int = 128
    lr: float = 2e-3
    max_shift: int = 2


def _model(tokenizer):
    from transformers import CLIPConfig, CLIPModel

    cfg = CLIPConfig(
        text_config=dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, max_position_embeddings=tokenizer.model_max_length,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                           image_size=32, patch_size=8, num_channels=3),
        projection_dim=32)
    return CLIPModel(cfg)


def _processor(tokenizer):
    """Images (3, 32, 32) in [0, 1] -> (x - 0.5) / 0.5: no resize, crop or rescale (the world is 32 px)."""
    from transformers import CLIPImageProcessor, CLIPProcessor

    image = CLIPImageProcessor(do_resize=False, do_center_crop=False, do_rescale=False, do_normalize=True,
                               image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5], do_convert_rgb=False)
    return CLIPProcessor(image_processor=image, tokenizer=tokenizer)


def _shift(x, max_shift, gen):
    """Random translation of each image by up to `max_shift` px (background -1 fills the border)."""
    if not max_shift:
        return x
    pad = F.pad(x, (max_shift,) * 4, value=-1.0)
    out = torch.empty_like(x)
    offs = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=gen)
    h, w = x.shape[-2:]
    for i, (dy, dx) in enumerate(offs.tolist()):
        out[i] = pad[i, :, dy:dy + h, dx:dx + w]
    return out


def _features(model, ids, mask, pixels):
    from ...metrics import CLIPScore

    img = CLIPScore._tensor(model.get_image_features(pixel_values=pixels))
    txt = CLIPScore._tensor(model.get_text_features(input_ids=ids, attention_mask=mask))
    return F.normalize(img, dim=-1), F.normalize(txt, dim=-1)


def train_clip(tokenizer, images, labels, recipe: ClipRecipe = ClipRecipe(), progress=True):
    """The trained model. images: (N, 1, 32, 32) in [-1, 1]; labels (N,)."""
    from tqdm.auto import tqdm

    torch.manual_seed(recipe.seed)
    gen = torch.Generator().manual_seed(recipe.seed)
    model = _model(tokenizer)
    prompts = [digit_prompts(d) for d in range(10)]
    negatives = tokenizer(list(NEGATIVE_PROMPTS), padding="max_length", max_length=tokenizer.model_max_length,
                          return_tensors="pt")
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    model.train()
    rgb = images.expand(-1, 3, -1, -1)
    for _ in tqdm(range(recipe.steps), desc="digits CLIP", unit="step", disable=not progress):
        idx = torch.randint(0, len(labels), (recipe.batch_size,), generator=gen)
        lab = labels[idx]
        choice = torch.randint(0, len(TEMPLATES), (len(idx),), generator=gen).tolist()
        text = [prompts[int(d)][c] for d, c in zip(lab.tolist(), choice)]
        tok = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length, return_tensors="pt")
        ids = torch.cat([tok.input_ids, negatives.input_ids])
        mask = torch.cat([tok.attention_mask, negatives.attention_mask])
        img, txt = _features(model, ids, mask, _shift(rgb[idx], recipe.max_shift, gen))
        logits = model.logit_scale.exp() * img @ txt.T  # (B, B + negatives)
        same = (lab[:, None] == lab[None, :]).float()
        target = same / same.sum(1, keepdim=True)
        i2t = -(F.pad(target, (0, len(NEGATIVE_PROMPTS))) * logits.log_softmax(1)).sum(1).mean()
        t2i = -(target * logits[:, :len(idx)].T.log_softmax(1)).sum(1).mean()
        loss = (i2t + t2i) / 2
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, 4.6052)  # CLIP's cap: a temperature of at least 1/100
    return model.eval()


@torch.no_grad()
def zero_shot_accuracy(folder: Path, images, labels) -> float:
    """Accuracy of the saved CLIP folder on `images` ((N, 1|3, 32, 32) in [-1, 1]) read as the digit whose
    canonical prompt scores highest, through fastunlearn's CLIP judge (the same loading and preprocessing)."""
    from ...judges import CLIPJudge

    judge = CLIPJudge(str(folder))
    probs = judge.probs(((images + 1) / 2).expand(-1, 3, -1, -1), [digit_prompts(d)[0] for d in range(10)])
    return float((probs.argmax(1) == labels).float().mean())


def build_clip(dest: Path, recipe: ClipRecipe = ClipRecipe(), progress: bool = True) -> dict:
    """Train the digits CLIP and save it into `dest` (a new folder). Returns clip.json's dict."""
    from ..tokenizer import build_clip_tokenizer

    t0 = time.time()
    images, labels = load_digit_images()
    train_idx, held_idx = heldout_split(len(labels), 0)  # the classifier's split: held-out digits never seen
    tokenizer = build_clip_tokenizer(prompt_words() + ["photo"])
    model = train_clip(tokenizer, images[train_idx], labels[train_idx], recipe, progress)
    model.save_pretrained(dest, safe_serialization=True)
    _processor(tokenizer).save_pretrained(dest)
    info = {"version": CLIP_VERSION, "recipe": asdict(recipe),
            "zero_shot_heldout_accuracy": zero_shot_accuracy(dest, images[held_idx], labels[held_idx]),
            "heldout_size": len(held_idx), "build_seconds": round(time.time() - t0, 1), "files": file_hashes(dest)}
    info["files"].pop("clip.json", None)
    (dest / "clip.json").write_text(json.dumps(info, indent=2))  # written last: marks the build complete
    return info


def clip_problem(path: Path) -> str | None:
    """Why the CLIP folder at `path` cannot be used, or None."""
    manifest = path / "clip.json"
    if not manifest.is_file():
        return "missing" if not path.exists() else "partial (no clip.json)"
    try:
        info = json.loads(manifest.read_text())
        files = info["files"]
    except (OSError, ValueError, KeyError):
        return "corrupt clip.json"
    if info.get("version") != CLIP_VERSION or info.get("recipe") != asdict(ClipRecipe()):
        return "built by another version"
    return files_problem(path, files)


def ensure_clip(world: Path, progress: bool = True) -> Path:
    """`world/clip`, built first when missing, partial or corrupt (atomically, under the world's lock)."""
    path = world / "clip"
    if clip_problem(path) is None:
        return path
    with lock(world.parent / f".{world.name}.clip.lock"):
        problem = clip_problem(path)
        if problem is None:
            return path
        tmp = start_rebuild(path, world / f".clip.tmp-{os.getpid()}", problem, "digits CLIP")
        try:
            info = build_clip(tmp, progress=progress)
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            print(f"fastunlearn: built the digits CLIP in {info['build_seconds']:.0f} s at {path}: zero-shot accuracy "
                  f"on held-out real digits {info['zero_shot_heldout_accuracy']:.3f}", file=sys.stderr)
    return path
