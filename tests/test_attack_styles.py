"""The attack command in the styles world (docs/attacks.md, "In the styles world"): the concept (a colour, a
stroke or a digit), its prompts, the world's in-domain judge and the retained control, on the reduced
FAST_RECIPE world in a temporary cache; one tiny end-to-end attack checks the mechanics (the FAST world's
pipeline is barely trained, so no figure of it means anything)."""
import json

import pytest
import torch

from fastunlearn.attack import run_attack, world_concept
from fastunlearn.errors import FastUnlearnError
from fastunlearn.worlds.styles import (
    COLOUR_NAMES,
    FAST_RECIPE,
    STYLES,
    World,
    load_styled_images,
    load_world,
    parse_prompt,
)


@pytest.fixture(scope="module")
def fast_world(tmp_path_factory):
    """(cache, the FAST world), with World.default_recipe = FAST_RECIPE: run_attack finds the world from its
    pipeline folder (worlds.of_pipeline), which builds the default recipe."""
    cache = tmp_path_factory.mktemp("styles-attack-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(World, "default_recipe", FAST_RECIPE)
        yield cache, load_world(cache, FAST_RECIPE, progress=False)


@pytest.fixture(scope="module")
def renders():
    """Two real renders of every style, [0, 1] (as the samples the judge gets), and their style indices."""
    images, _, styles = load_styled_images()
    n = len(images) // len(STYLES)
    pick = torch.tensor([s * n + i for s in range(len(STYLES)) for i in (0, 1)])
    return (images[pick] + 1) / 2, styles[pick]


def _words(prompt):
    return prompt.replace(",", " ").split()


def test_a_colour_is_its_word_all_its_phrasings_and_the_exact_colour_judge(fast_world, renders):
    cache, _ = fast_world
    world = World(cache, FAST_RECIPE)
    wc = world_concept(world, "Red", cache)
    assert wc.words == ["red"] and wc.judge_name == "style judge (styles world, colour)"
    assert len(wc.prompts) == 2 * 10 * 6 == len(set(wc.prompts))  # 2 strokes x 10 digits x 6 phrasings
    assert all("red" in _words(q) and parse_prompt(q)[1] == 0 for q in wc.prompts)
    # n samples cycling through them are the world evaluation's n forget samples (prompts and seeds 0..n-1)
    info = {"task": "style", "forget_style": "red"}
    n = 150
    assert [wc.prompts[i % len(wc.prompts)] for i in range(n)] == world.sets(info, n, 1)["forget"][0]
    # the judge is the evaluation's in-domain judge (forget_accuracy), one bool per image
    images, styles = renders
    shows = wc.judge(images, wc.label)
    assert shows.dtype == torch.bool and shows.shape == (len(images),)
    assert shows.tolist() == (styles // 2 == 0).tolist()
    ev = world.evaluation(info, 8, 1)
    assert torch.equal(shows, ev["classifier"].predict(images * 2 - 1) == ev["forget_label"])
    # the retained control: the next colour, same axis
    assert wc.retain_words == [COLOUR_NAMES[1]] and wc.retain_label == 1
    assert all(COLOUR_NAMES[1] in _words(q) and "red" not in _words(q) for q in wc.retain_prompts)
    assert wc.judge(images, wc.retain_label).tolist() == (styles // 2 == 1).tolist()
    assert world_concept(world, COLOUR_NAMES[-1], cache).retain_words == ["red"]  # wraps around


def test_a_stroke_and_a_digit(fast_world, renders):
    cache, _ = fast_world
    world = World(cache, FAST_RECIPE)
    images, styles = renders
    bold = world_concept(world, "bold", cache)
    assert bold.words == ["bold"] and bold.retain_words == ["thin"]
    assert bold.judge_name == "style judge (styles world, stroke)" and len(bold.prompts) == 4 * 10 * 6
    assert all("bold" in _words(q) for q in bold.prompts)
    assert bold.judge(images, bold.label).tolist() == (styles % 2 == 1).tolist()
    for name in ("3", "three"):
        three = world_concept(world, name, cache)
        assert three.words == ["3", "three"] and three.retain_words == ["4", "four"]
        assert (three.label, three.retain_label) == (3, 4)
        assert three.judge_name == "digit classifier (styles world)" and len(three.prompts) == 8 * 6
        assert all(parse_prompt(q)[0] == 3 for q in three.prompts)
        shows = three.judge(images, three.label)
        assert shows.dtype == torch.bool and shows.shape == (len(images),)
    info = {"task": "digit", "forget_digit": 3}
    assert [three.prompts[i % 48] for i in range(60)] == world.sets(info, 60, 1)["forget"][0]


@pytest.mark.parametrize("concept,match", [("purple", "not a concept of the styles world"),
                                           ("red bold", "one-word concept"), ("ink", "not a concept")])
def test_a_concept_outside_the_world_is_a_one_line_error(fast_world, concept, match):
    cache, _ = fast_world
    with pytest.raises(FastUnlearnError, match=match) as err:
        world_concept(World(cache, FAST_RECIPE), concept, cache)
    assert "\n" not in str(err.value)


def test_attack_on_the_styles_world_end_to_end(fast_world, tmp_path):
    """A 2-step attack (inversion and a one-word search) with both controls, the FAST pipeline as original
    and unlearned: the report carries the world's judge, forget accuracy under attack and the controls."""
    cache, world = fast_world
    path = str(world.pipeline_path)
    tiny = dict(steps=2, budgets=(2,), eval_samples=4, samples_per_prompt=1, sample_steps=2,
                num_inference_steps=2, loss_batch=4, batch_size=2, search_k=1, search_batch=2, search_top=1)
    report = run_attack(path, path, "red", out_dir=tmp_path / "attack", attack="all", controls=True,
                        cache_dir=cache, device="cpu", progress=False, **tiny)
    assert report["judge"] == "style judge (styles world, colour)" and report["concept_words"] == ["red"]
    assert report["config"]["guidance_scale"] == 4.0 and len(report["forget_prompts"]) == 120
    assert all("<c*>" in q and "red" not in _words(q) for q in report["attack_prompts"])
    assert set(report["forget_accuracy_under_attack"]) == {"inversion@0", "inversion@2", "search"}
    assert report["forget_accuracy_under_attack"] == report["concept_rate_under_attack"]
    inv = report["inversion"]
    assert set(inv) >= {"unlearned", "original_control", "retained_control"}
    assert inv["retained_control"]["concept"] == "retained" and inv["attack_strong_enough"] in (True, False)
    rates = [b["concept_rate"] for run in ("unlearned", "original_control", "retained_control")
             for b in inv[run]["budgets"].values()]
    rates += [x["concept_rate"] for run in report["search"].values() for x in run["best"]]
    rates += [v["concept_rate"] for v in report["no_attack"].values()]
    assert len(rates) == 3 * 2 + 3 + 2 and all(0 <= r <= 1 for r in rates)
    assert not any("control not run" in note for note in report["notes"])
    assert json.loads((tmp_path / "attack" / "report.json").read_text())["judge"] == report["judge"]
    assert (tmp_path / "attack" / "grid.png").is_file()
    with pytest.raises(FastUnlearnError, match="not a concept of the styles world"):
        run_attack(path, path, "purple", cache_dir=cache, device="cpu", progress=False, **tiny)


@pytest.mark.slow
def test_the_digits_world_concept_is_unchanged(digits_world):
    """The digits world keeps its concept, labels, retained digit, judge and judge name."""
    from fastunlearn import worlds
    from fastunlearn.worlds.digits import digit_prompts

    wc = world_concept(worlds.get("digits"), "three")
    assert (wc.words, wc.prompts, wc.label) == (["3", "three"], digit_prompts(3), 3)
    assert (wc.retain_words, wc.retain_prompts, wc.retain_label) == (["4", "four"], digit_prompts(4), 4)
    assert wc.judge_name == "digit classifier (digits world)"
    assert world_concept(worlds.get("digits"), "cat") is None and world_concept(None, "cat") is None
