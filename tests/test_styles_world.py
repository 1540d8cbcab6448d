"""The styles world (digits x ink styles): rendering, the exact style judge, prompts, the reduced-recipe build
and the World interface for both tasks. Everything here uses FAST_RECIPE (seconds); the full build and its
base-pipeline figures are not tested here."""
import json

import pytest
import torch
import torch.nn.functional as F

from fastunlearn.errors import FastUnlearnError
from fastunlearn.judges import Judge
from fastunlearn.worlds.styles import (
    COLOUR_NAMES,
    COMBINATIONS,
    FAST_RECIPE,
    STROKE_NAMES,
    STYLES,
    AxisClassifier,
    StyleJudge,
    World,
    combo_prompts,
    ensure_world,
    load_styled_images,
    load_world,
    parse_prompt,
    parse_style,
    prompt_words,
    task_of_prompts,
    world_problem,
)
from fastunlearn.worlds.styles import render as R


@pytest.fixture(scope="module")
def renders():
    images, digits, styles = load_styled_images()
    return (images + 1) / 2, digits, styles  # [0, 1], as the judges take them


@pytest.fixture(scope="module")
def fast_world(tmp_path_factory):
    cache = tmp_path_factory.mktemp("styles-cache")
    return cache, load_world(cache, FAST_RECIPE, progress=False)


def _gaussian_blur(x, sigma):
    r = torch.arange(-2, 3).float()
    k = torch.exp(-r ** 2 / (2 * sigma ** 2))
    k = k / k.sum()
    return F.conv2d(F.pad(x, (2,) * 4, mode="replicate"), (k[:, None] * k[None]).expand(3, 1, 5, 5), groups=3)


def test_renders_are_deterministic_in_range_and_style_major(renders):
    images, digits, styles = renders
    n = len(images) // len(STYLES)
    assert images.shape == (n * len(STYLES), 3, 32, 32) and n == 1797
    assert images.min() >= 0 and images.max() <= 1
    assert torch.equal(styles, torch.arange(len(STYLES)).repeat_interleave(n))
    assert torch.equal(digits[:n], digits[n:2 * n])
    from sklearn.datasets import load_digits

    again, again_styles = R.render_styles(torch.tensor(load_digits().images[:50]).unsqueeze(1))
    same = torch.cat([torch.arange(50) + s * n for s in range(len(STYLES))])
    assert torch.equal((again + 1) / 2, images[same]) and torch.equal(again_styles, styles[same])
    # the ink map is the same in every colour (palette max channel 1): the digit classifier is colour-blind
    ink = R.ink_map(images)
    assert torch.allclose(ink[:n], ink[2 * n:3 * n]) and torch.allclose(ink[:n], ink[6 * n:7 * n])


def test_style_judge_is_exact_on_the_renders(renders):
    images, _, styles = renders
    colour, stroke = styles // len(STROKE_NAMES), styles % len(STROKE_NAMES)
    assert float((R.colour_of(images) == colour).float().mean()) >= 0.99
    assert float((R.stroke_of(images) == stroke).float().mean()) >= 0.99
    assert float((R.style_of(images) == styles).float().mean()) >= 0.99
    depth = R.stroke_depth(images)
    # the stroke threshold separates the two strokes with a margin on every render
    assert depth[stroke == 0].max() < R.STROKE_THRESHOLD - 0.1
    assert depth[stroke == 1].min() > R.STROKE_THRESHOLD + 0.1


@pytest.mark.parametrize("damage", ["noise 0.1", "noise 0.15", "blur 0.8", "blur 1.0", "down-up 16px"])
def test_style_judge_is_robust_to_mild_noise_and_blur(renders, damage):
    images, _, styles = renders
    if damage.startswith("noise"):
        noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))
        x = images + float(damage.split()[1]) * noise
    elif damage.startswith("blur"):
        x = _gaussian_blur(images, float(damage.split()[1]))
    else:
        small = F.interpolate(images, size=16, mode="bilinear", antialias=True)
        x = F.interpolate(small, size=32, mode="bilinear")
    assert float((R.style_of(x.clamp(0, 1)) == styles).float().mean()) >= 0.98


def test_style_judge_behind_the_judge_interface(renders):
    images, _, styles = renders
    judge = StyleJudge()
    assert isinstance(judge, Judge)
    n = len(images) // len(STYLES)
    red_bold = images[STYLES.index("red bold") * n:][:20]
    green_thin = images[STYLES.index("green thin") * n:][:20]
    x = torch.cat([red_bold, green_thin])
    prompt = combo_prompts(3, STYLES.index("red bold"))[0]
    assert judge.rates(x, prompt).tolist() == [True] * 20 + [False] * 20
    assert judge.rates(x, "red").tolist() == [True] * 20 + [False] * 20  # a colour concept: any stroke
    assert judge.rates(x, "thin").tolist() == [False] * 20 + [True] * 20
    assert not judge.rates(torch.zeros(2, 3, 32, 32), "red").any()  # no ink: no style
    with pytest.raises(FastUnlearnError, match="names no colour"):
        judge.rates(x, "a handwritten digit three")
    assert AxisClassifier("colour").predict(x * 2 - 1).tolist() == [0] * 20 + [1] * 20


def test_prompts_name_digit_and_style_and_tokenise_apart():
    from fastunlearn.worlds.tokenizer import build_clip_tokenizer

    canonical = combo_prompts(3, STYLES.index("red bold"))[0]
    assert canonical == "a handwritten digit three in red ink, bold strokes"
    prompts = [q for d, s in COMBINATIONS for q in combo_prompts(d, s)]
    assert len(set(prompts)) == len(prompts) == 10 * len(STYLES) * 6
    for d, s in COMBINATIONS:
        assert all(parse_prompt(q) == (d, s // 2, s % 2) for q in combo_prompts(d, s))
    tok = build_clip_tokenizer(prompt_words())
    assert len({tuple(tok(q).input_ids) for q in prompts}) == len(prompts)
    assert parse_style("bold red") == (0, 1) and parse_style("blue") == (2, None)
    assert parse_style("thin") == (None, 0)
    for bad in ("purple", "red blue", "", "red ink"):
        with pytest.raises(FastUnlearnError, match="not a style of the styles world"):
            parse_style(bad)


def test_task_of_user_prompts():
    red = STYLES.index("red thin")
    assert task_of_prompts([combo_prompts(d, red)[0] for d in range(10)]) == {"task": "style",
                                                                              "forget_style": "red thin"}
    two = [combo_prompts(d, s)[1] for d in (1, 2) for s in (0, 1)]
    assert task_of_prompts(two) == {"task": "style", "forget_style": "red"}
    assert task_of_prompts([combo_prompts(3, s)[0] for s in range(8)]) == {"task": "digit", "forget_digit": 3}
    assert task_of_prompts([combo_prompts(3, 0)[0]]) is None  # one combination: which axis is ambiguous
    assert task_of_prompts(["a photo of a cat"]) is None
    assert task_of_prompts([combo_prompts(1, 0)[0], combo_prompts(2, 3)[0]]) is None  # nothing shared


def test_style_anchors_name_another_colour_and_keep_digit_and_stroke():
    """The styles world's default anchors: each forget prompt with the forgotten colour renamed (the next palette
    colour), a forgotten stroke alone renamed, or the forgotten digit as the next; the user's anchors win
    (resolve_prompts); the digits world keeps the empty prompt."""
    from fastunlearn.config import TrainConfig
    from fastunlearn.data import resolve_prompts
    from fastunlearn.worlds.styles import ANCHOR_COLOUR

    assert ANCHOR_COLOUR == {"red": "green", "green": "blue", "blue": "yellow", "yellow": "red"}
    world = World()
    for style, swap in (("red", ("red", "green")), ("red bold", ("red", "green")), ("bold", ("bold", "thin")),
                        ("yellow", ("yellow", "red"))):
        info = {"task": "style", "forget_style": style}
        forget = world.forget_prompts(info)
        anchors = world.anchor_prompts(info, forget)
        assert len(anchors) == len(forget) and all(swap[0] not in a.split() for a in anchors)
        for q, a in zip(forget, anchors):
            assert a == q.replace(swap[0], swap[1])
            assert parse_prompt(a)[0] == parse_prompt(q)[0]  # the same digit
    info = {"task": "digit", "forget_digit": 9}
    forget = world.forget_prompts(info)
    anchors = world.anchor_prompts(info, forget)
    assert [parse_prompt(a) for a in anchors] == [(0,) + parse_prompt(q)[1:] for q in forget]  # 9 -> 0, style kept
    assert anchors[0] == forget[0].replace("nine", "zero")
    forget, _, anchors, info, _ = resolve_prompts(TrainConfig(model="styles", forget_style="green", method="ca"))
    assert info["forget_style"] == "green" and anchors == [q.replace("green", "blue") for q in forget]
    forget, _, anchors, _, _ = resolve_prompts(TrainConfig(model="styles", forget_digit=3, method="ca"))
    assert anchors == [q.replace("three", "four").replace("3", "4") for q in forget]
    *_, anchors, _, _ = resolve_prompts(TrainConfig(model="styles", forget_style="red", method="ca",
                                                    anchor_prompts=["a drawing"]))
    assert set(anchors) == {"a drawing"}
    *_, anchors, _, _ = resolve_prompts(TrainConfig(model="digits", method="ca"))
    assert set(anchors) == {""}


def test_fast_build_is_checksummed_and_loads_back(fast_world):
    from diffusers import StableDiffusionPipeline

    cache, world = fast_world
    assert world.path.name.startswith("styles-v1-") and world_problem(world.path, FAST_RECIPE) is None
    info = json.loads((world.path / "world.json").read_text())
    assert info["version"] == "styles-v1" and info["recipe"]["unet_steps"] == FAST_RECIPE.unet_steps
    assert info["styles"] == STYLES and info["style_judge_accuracy_on_renders"] >= 0.99
    assert {"classifier_heldout_accuracy", "base_digit_accuracy", "base_style_accuracy", "base_scores",
            "build_seconds"} <= info.keys()
    assert info["files"] and all((world.path / rel).is_file() for rel in info["files"])
    pipe = StableDiffusionPipeline.from_pretrained(world.pipeline_path)
    assert all(len(pipe.tokenizer(w, add_special_tokens=False).input_ids) == 1 for w in prompt_words())
    mtime = (world.path / "world.json").stat().st_mtime_ns
    assert ensure_world(cache, FAST_RECIPE, progress=False) == world.path  # complete: not rebuilt
    assert (world.path / "world.json").stat().st_mtime_ns == mtime
    weights = world.path / "classifier" / "model.safetensors"
    saved = weights.read_bytes()
    weights.write_bytes(saved[:100])
    assert "corrupt" in world_problem(world.path, FAST_RECIPE)
    weights.write_bytes(saved)
    assert world_problem(world.path, FAST_RECIPE) is None


def test_digits_world_cache_name_and_recipe_unchanged():
    from dataclasses import asdict

    from fastunlearn.worlds.digits import Recipe, world_path

    assert world_path("/x").name == "digits-v1"  # the default digits world keeps its cache folder
    assert asdict(Recipe())["unet_steps"] == 2000 and "eval_per_combination" not in asdict(Recipe())


class _Cfg:
    forget_digit = 3
    forget_style = None


@pytest.mark.parametrize("task", ["red", "red bold", "bold", 3])
def test_world_sets_are_consistent_for_both_tasks(fast_world, renders, task):
    from fastunlearn.evaluate import Evaluator
    from fastunlearn.sampling import SamplerConfig

    cache, _ = fast_world
    world = World(cache, FAST_RECIPE)
    cfg = _Cfg()
    if isinstance(task, str):
        cfg.forget_style = task
    else:
        cfg.forget_digit = task
    forget, retain, info = world.prompts(None, None, cfg)
    assert not set(forget) & set(retain) and info is not None
    assert world.prompts(forget, None, None)[2] == info  # the same task read back from its own prompts
    colour, stroke = parse_style(task) if isinstance(task, str) else (None, None)

    def of_concept(d, s):
        return d == task if info["task"] == "digit" else (
            (colour is None or s // 2 == colour) and (stroke is None or s % 2 == stroke))

    def combo(q):
        d, c, k = parse_prompt(q)
        return d, c * len(STROKE_NAMES) + k

    assert all(of_concept(*combo(q)) for q in forget)
    assert not any(of_concept(*combo(q)) for q in retain)
    assert len(forget) + 3 * len(retain) == 3 * len(COMBINATIONS)  # 3 phrasings per forgotten combination

    sets = world.sets(info, 24, 4)
    fp, fs, fd, fst = sets["forget"]
    rp, rs, rd, rst = sets["retain"]
    assert len(fp) == 24 and all(of_concept(d, s) for d, s in zip(fd, fst))
    assert not any(of_concept(d, s) for d, s in zip(rd, rst))
    assert all(parse_prompt(q) == (d, s // 2, s % 2) for q, d, s in zip(fp + rp, fd + rd, fst + rst))
    groups = list(dict.fromkeys(sets["groups"]))
    assert len(rp) == 4 * len(groups) and len(groups) == (9 if info["task"] == "digit" else 8 - len(
        {s for _, s in COMBINATIONS if of_concept(0, s)}))

    ev = world.evaluation(info, 24, 4)
    assert ev["forget"] == (fp, fs) and ev["retain"] == (rp, rs) and len(ev["retain_labels"]) == len(rp)
    assert ev["perceptual"].name == "lpips-styles" and ev["real_retain"].shape[1:] == (3, 32, 32)
    # the evaluator on real renders of the very (digit, style) of each sample: the exact style rules score 1
    images, digits, styles = renders
    n = len(images) // len(STYLES)

    def real(ds, ss):
        return torch.stack([images[s * n + int(torch.nonzero(digits[:n] == d)[0])] for d, s in zip(ds, ss)])

    evaluator = Evaluator(None, sampler=SamplerConfig(2, 4.0), **ev)
    acc = evaluator.accuracy(real(fd, fst), real(rd, rst))
    assert acc["unlearning_accuracy"] == pytest.approx(1 - acc["forget_accuracy"])
    assert acc["in_domain_retain_accuracy"] == acc["retain_accuracy"]
    key = "retain_accuracy_by_" + sets["group_key"]
    assert set(acc[key]) == {str(g) for g in groups}
    if info["task"] == "style":  # in-domain is the exact style axis
        assert acc["forget_accuracy"] == 1.0 and acc["retain_accuracy"] == 1.0
    else:  # cross-domain is the exact style axis
        assert acc["cross_domain_retain_accuracy"] == 1.0 and acc["cross_domain_forget_accuracy"] == 1.0
    fields = world.report_fields(info)
    assert fields["task"] == info["task"] and "unlearning_accuracy" in fields["metric_definitions"]


def test_styles_is_a_registered_world_with_a_forget_style_flag():
    from fastunlearn import worlds
    from fastunlearn.config import TrainConfig
    from fastunlearn.train import build_parser

    assert isinstance(worlds.get("styles"), World) and "styles" in worlds.WORLDS
    assert build_parser().parse_args(["--forget-style", "red bold"]).forget_style == "red bold"
    assert TrainConfig(model="styles", forget_style="red").forget_style == "red"
    with pytest.raises(FastUnlearnError, match="not a style"):
        World().prompts(None, None, type("C", (), {"forget_style": "purple", "forget_digit": 3})())
    assert len(World().eval_prompts()) == 10 * len(STYLES) and COLOUR_NAMES[0] == "red"


@pytest.mark.parametrize("task", [["--forget-style", "red"], ["--forget-digit", "3"]])
def test_trainer_reports_the_two_axis_metrics(fast_world, tmp_path, monkeypatch, task):
    """`--model styles` through the trainer on the reduced world: the report carries unlearning accuracy,
    in-domain and cross-domain retain accuracy, and I_retain per neighbour group (the figures of a 2-step
    run on the FAST world mean nothing; their presence and ranges are what is checked)."""
    from fastunlearn.testing import SMALL
    from fastunlearn.train import main

    cache, _ = fast_world
    monkeypatch.setattr(World, "default_recipe", FAST_RECIPE)
    out = tmp_path / "out"
    main(["--model", "styles", *task, *SMALL, "--method", "saddle", "--output-dir", str(out),
          "--max-steps", "2", "--set", f"cache_dir={cache}", "--set", "eval.forget_samples=8",
          "--set", "forget_samples_per_prompt=1", "--set", "retain_samples_per_prompt=1"])
    report = json.loads((out / "report.json").read_text())
    group = "style" if task[0] == "--forget-style" else "digit"
    assert report["task"] == group and report["world"].startswith("styles")
    for key in ("unlearning_accuracy", "in_domain_retain_accuracy", "cross_domain_retain_accuracy",
                "cross_domain_forget_accuracy", "base_cross_domain_retain_accuracy", "forget_accuracy"):
        assert 0 <= report[key] <= 1, key
    assert report["unlearning_accuracy"] == pytest.approx(1 - report["forget_accuracy"])
    groups = set(report[f"integrity_retain_by_{group}"])
    assert groups == set(report[f"cross_domain_retain_accuracy_by_{group}"])
    assert len(groups) == (6 if group == "style" else 9)
    assert report["perceptual_network"] == "lpips-styles" and report["fid_network"] == "fid-styles"
