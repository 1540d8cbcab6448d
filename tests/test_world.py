import json
import subprocess
import sys

import pytest
import torch

from fastunlearn.errors import FastUnlearnError
from fastunlearn.worlds.digits import (
    FAST_RECIPE,
    digit_of_prompt,
    digit_prompts,
    ensure_world,
    load_world,
    prompt_words,
    world_problem,
)
from fastunlearn.worlds.tokenizer import build_clip_tokenizer, check_tokenizer


def test_tokenizer_distinguishes_every_prompt_word(tmp_path):
    from transformers import CLIPTokenizer

    words = prompt_words()
    tok = build_clip_tokenizer(words)
    assert len(tok) > 2 + len(words)  # not the 2-token fallback
    ids = {w: tok(w, add_special_tokens=False).input_ids for w in words}
    assert all(len(v) == 1 for v in ids.values())
    assert len({v[0] for v in ids.values()}) == len(words)
    assert tok.eos_token_id not in {v[0] for v in ids.values()}
    prompts = [p for d in range(10) for p in digit_prompts(d)]
    encoded = {tuple(tok(p).input_ids) for p in prompts}
    assert len(encoded) == len(prompts)
    tok.save_pretrained(tmp_path)
    back = CLIPTokenizer.from_pretrained(tmp_path)
    assert [back(p).input_ids for p in prompts] == [tok(p).input_ids for p in prompts]
    assert back.model_max_length == tok.model_max_length


def test_tokenizer_without_vocabulary_is_refused():
    from transformers import CLIPTokenizer

    with pytest.raises(FastUnlearnError, match="no vocabulary"):
        check_tokenizer(CLIPTokenizer())


def test_digit_of_prompt():
    for d in range(10):
        assert all(digit_of_prompt(p) == d for p in digit_prompts(d))
    assert digit_of_prompt("") is None


def test_world_build_save_load_round_trip(tmp_path):
    from diffusers import StableDiffusionPipeline

    world = load_world(tmp_path, recipe=FAST_RECIPE, progress=False)
    assert world_problem(world.path, FAST_RECIPE) is None
    info = json.loads((world.path / "world.json").read_text())
    assert {"classifier_heldout_accuracy", "base_accuracy", "files"} <= info.keys()
    pipe = StableDiffusionPipeline.from_pretrained(world.pipeline_path)
    assert len(pipe.tokenizer) == len(world.pipeline.tokenizer) > 2
    for name in ("unet", "vae", "text_encoder"):
        a, b = getattr(pipe, name).state_dict(), getattr(world.pipeline, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    # a second load finds the cache complete and does not rebuild
    mtime = (world.path / "world.json").stat().st_mtime_ns
    ensure_world(tmp_path, recipe=FAST_RECIPE, progress=False)
    assert (world.path / "world.json").stat().st_mtime_ns == mtime


@pytest.mark.parametrize("damage", ["truncate-weights", "drop-manifest", "delete-file"])
def test_corrupt_or_partial_cache_is_rebuilt(tmp_path, damage, capsys):
    path = ensure_world(tmp_path, recipe=FAST_RECIPE, progress=False)
    weights = path / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"
    if damage == "truncate-weights":
        weights.write_bytes(weights.read_bytes()[:1000])
    elif damage == "drop-manifest":
        (path / "world.json").unlink()
    else:
        (path / "pipeline" / "tokenizer" / "tokenizer.json").unlink()
    assert world_problem(path, FAST_RECIPE) is not None
    ensure_world(tmp_path, recipe=FAST_RECIPE, progress=False)
    assert "rebuilding" in capsys.readouterr().err
    assert world_problem(path, FAST_RECIPE) is None
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no half-written build left behind


def test_unwritable_cache_dir_is_one_line_error(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(FastUnlearnError, match="not writable"):
        ensure_world(blocker / "cache", recipe=FAST_RECIPE, progress=False)
    proc = subprocess.run([sys.executable, "-m", "fastunlearn.worlds.digits", "--cache-dir", str(blocker / "cache")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "not writable" in err[0] and "--cache-dir" in err[0], proc.stderr


@pytest.mark.slow
def test_base_world_draws_the_prompted_digit(digits_world):
    from fastunlearn.worlds.digits import score_pipeline

    assert digits_world.info["classifier_heldout_accuracy"] >= 0.95
    per_digit, _, _ = score_pipeline(digits_world.pipeline, digits_world.classifier, per_digit=20,
                                     sampler=digits_world.sampler, progress=False)
    accuracy = sum(per_digit.values()) / 10
    print(f"base accuracy {accuracy:.3f}; held-out classifier accuracy "
          f"{digits_world.info['classifier_heldout_accuracy']:.3f}")
    assert accuracy >= 0.90
    assert accuracy == pytest.approx(digits_world.info["base_accuracy"])  # the saved figure is reproducible


@pytest.mark.slow
def test_digits_clip_reads_real_and_generated_digits(digits_world):
    """The world's CLIP (built on first use): zero-shot accuracy >= 0.90 on the held-out real digits, recomputed
    through the saved folder; on the base pipeline's samples the clip judge agrees with the digit classifier."""
    from fastunlearn.judges import CLIPJudge
    from fastunlearn.worlds.digits import World, digit_prompts, eval_pairs, heldout_split, load_digit_images
    from fastunlearn.worlds.digits.clip import clip_problem, zero_shot_accuracy

    folder = World(str(digits_world.path.parent)).clip_path()
    assert clip_problem(folder) is None
    info = json.loads((folder / "clip.json").read_text())
    images, labels = load_digit_images()
    held = heldout_split(len(labels), 0)[1]
    acc = zero_shot_accuracy(folder, images[held], labels[held])
    print(f"digits CLIP zero-shot accuracy on {len(held)} held-out real digits: {acc:.3f}")
    assert acc >= 0.90 and acc == pytest.approx(info["zero_shot_heldout_accuracy"], abs=1e-6)
    from fastunlearn.sampling import sample

    prompts, seeds, truth = eval_pairs(range(10), 6)
    imgs = sample(digits_world.pipeline, prompts, seeds, digits_world.sampler, batch_size=60, progress=False)
    classifier = (digits_world.classifier.predict(imgs * 2 - 1) == torch.tensor(truth)).float()
    judge = CLIPJudge(str(folder))
    clip = torch.zeros(len(imgs))
    for d in range(10):  # the judge's rule: the prompt's concept against every other digit's phrasings and ""
        idx = [i for i, t in enumerate(truth) if t == d]
        contrast = [q for k in range(10) if k != d for q in digit_prompts(k)] + [""]
        clip[idx] = judge.rates(imgs[idx], digit_prompts(d)[0], contrast).float()
    print(f"base samples: classifier {classifier.mean():.3f}, clip judge {clip.mean():.3f}")
    assert abs(float(clip.mean() - classifier.mean())) <= 0.05


@pytest.mark.slow
def test_digits_main_job_writes_grid_and_json(digits_world, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fastunlearn.worlds.digits", "--out", str(out), "--samples-per-digit", "4",
                           "--cache-dir", str(digits_world.path.parent)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    result = json.loads((out / "samples.json").read_text())
    assert set(result["accuracy_per_digit"]) == {str(d) for d in range(10)}
    from PIL import Image

    assert Image.open(out / "grid.png").size[1] > 300
