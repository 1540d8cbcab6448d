"""Concept-recovery attacks (fastunlearn.attack): the learned token, its file, determinism, the one-line errors,
and on the digits world that Concept Inversion recovers the digit from the original model."""
import json
import subprocess
import sys

import pytest
import torch
from diffusers import DiffusionPipeline

from fastunlearn.attack import (
    TOKEN,
    AttackConfig,
    ConceptData,
    InvertedToken,
    encode,
    encoders,
    invert,
    load_embedding,
    replace_concept,
    run_attack,
    save_embedding,
    search,
)
from fastunlearn.errors import FastUnlearnError

FORGET = ["a photo of cat", "a painting of cat"]
# a few steps and samples: the tiny fixtures have random weights, these tests check the mechanics
TINY = dict(steps=4, budgets=(2, 4), eval_samples=2, samples_per_prompt=2, sample_steps=2, num_inference_steps=2,
            loss_batch=4, batch_size=2, search_k=1, search_batch=2, search_top=1, progress=False)


def _data(pipe, n=4):
    g = torch.Generator().manual_seed(0)
    shape = (pipe.unet.config.in_channels, pipe.unet.config.sample_size, pipe.unet.config.sample_size)
    return ConceptData("forget", torch.randn(n, *shape, generator=g), [FORGET[i % 2] for i in range(n)], FORGET,
                       [replace_concept(p, ["cat"]) for p in FORGET])


def _frozen(path):
    pipe = DiffusionPipeline.from_pretrained(path)
    for _, enc in encoders(pipe):
        enc.requires_grad_(False)
    pipe.unet.requires_grad_(False)
    return pipe


def test_replace_concept_whole_words_only():
    assert replace_concept("a photo of Cat", ["cat"]) == f"a photo of {TOKEN}"
    assert replace_concept("a catalogue", ["cat"]) is None
    assert replace_concept("the number 3", ["three", "3"]) == f"the number {TOKEN}"


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sdxl_path"])
def test_inversion_trains_only_the_new_row_and_round_trips(fixture, request, tmp_path):
    path = request.getfixturevalue(fixture)
    pipe = _frozen(path)
    before = [enc.get_input_embeddings().weight.detach().clone() for _, enc in encoders(pipe)]
    token = InvertedToken(pipe, "dog")
    assert len(token.params) == len(encoders(pipe)) == (2 if fixture == "tiny_sdxl_path" else 1)
    cfg = AttackConfig(steps=3, budgets=(3,), batch_size=2)
    snaps, _ = invert(pipe, token, _data(pipe), cfg, "cpu", progress=False)
    assert set(snaps) == {0, 3} and not torch.equal(snaps[0][0], snaps[3][0])
    for (tok, enc), old in zip(encoders(pipe), before):  # every row but <c*>'s is untouched
        weight = enc.get_input_embeddings().weight
        assert torch.equal(weight[:len(old)], old) and len(weight) == len(old) + 1
    with torch.no_grad():
        want = encode(pipe, ["a photo of <c*>"], "cpu")
    files = save_embedding(snaps[3], tmp_path)
    assert [f.name for f in files][:1] == ["learned_embeds.safetensors"]
    fresh = DiffusionPipeline.from_pretrained(path)
    if fixture == "tiny_sd_path":  # the plain diffusers call loads it
        fresh.load_textual_inversion(str(files[0]), token=TOKEN)
    else:
        load_embedding(fresh, tmp_path)
    with torch.no_grad():
        got = encode(fresh, ["a photo of <c*>"], "cpu")
    for a, b in zip(got, want):
        if a is not None:
            torch.testing.assert_close(a, b)


def test_search_exhaustive_and_gradient_guided(tiny_sd_path):
    pipe = _frozen(tiny_sd_path)
    data = _data(pipe)
    ranked, mode, _ = search(pipe, data, AttackConfig(search_k=1, search_batch=2), "cpu", progress=False)
    words = {p[0] for p, _ in ranked if len(p) == 1}
    assert mode == "exhaustive" and len(ranked) == 1 + len(words) and "cat" in words and () in dict(ranked)
    assert [v for _, v in ranked] == sorted(v for _, v in ranked)
    cfg = AttackConfig(search_k=2, search_batch=2, search_exhaustive_limit=10, search_candidates=3, search_rounds=1)
    ranked, mode, _ = search(pipe, data, cfg, "cpu", progress=False)
    assert mode == "gradient-guided" and all(len(p) in (0, 2) for p, _ in ranked) and len(ranked) <= 2 + 2 * 3


def test_run_attack_is_deterministic_and_writes_its_outputs(tiny_sd_path, tiny_sdxl_path, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    a = run_attack(tiny_sd_path, tiny_sd_path, "cat", FORGET, tmp_path / "a", attack="all", seed=3,
                   retain_concept="dog", retain_prompts=["a photo of dog"], **TINY)
    b = run_attack(tiny_sd_path, tiny_sd_path, "cat", FORGET, None, attack="all", seed=3,
                   retain_concept="dog", retain_prompts=["a photo of dog"], **TINY)
    for r in (a, b):
        r.pop("wall_time_s")
        for attack in ("inversion", "search"):
            for run in r[attack].values():
                if isinstance(run, dict):
                    run.pop("wall_time_s"), run.pop("eval_time_s"), run.pop("embedding", None)
    assert a == b
    assert set(a["inversion"]) == {"unlearned", "original_control", "retained_control", "attack_strong_enough"}
    assert set(a["inversion"]["unlearned"]["budgets"]) == {"0", "2", "4"} and a["judge"] is None
    assert a["attack_prompts"] == ["a photo of <c*>", "a painting of <c*>"]
    on_disk = json.loads((tmp_path / "a" / "report.json").read_text())
    assert on_disk["notes"] and "no judge" in on_disk["notes"][0]
    assert (tmp_path / "a" / "grid.png").is_file() and (tmp_path / "a" / "learned_embeds.safetensors").is_file()
    xl = run_attack(tiny_sdxl_path, tiny_sdxl_path, "cat", FORGET, tmp_path / "xl", attack="inversion",
                    controls=False, **TINY)
    assert set(xl["inversion"]) == {"unlearned", "attack_strong_enough"}
    assert (tmp_path / "xl" / "learned_embeds_2.safetensors").is_file()


def test_attack_with_a_clip_judge_measures_concept_rates(tiny_sd_path, tmp_path, monkeypatch):
    """Outside a world the configured judge scores the attack: concept rates for the plain prompts, every
    budget and the controls (the retained control judged against its own prompt)."""
    from fastunlearn.attack import main
    from fastunlearn.judges import CLIPJudge
    from fastunlearn.testing import tiny_clip

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    clip = tiny_clip(tmp_path / "clip")
    calls = []
    rates = CLIPJudge.rates
    monkeypatch.setattr(CLIPJudge, "rates", lambda self, im, q, c=(): calls.append((q, list(c))) or rates(self, im, q, c))
    r = run_attack(tiny_sd_path, tiny_sd_path, "cat", FORGET, None, attack="inversion", retain_concept="dog",
                   retain_prompts=["a photo of dog"], judge=CLIPJudge(str(clip)), **TINY)
    assert r["judge"].startswith("clip") and not any("no judge" in n for n in r["notes"])
    assert 0 <= r["no_attack"]["unlearned"]["concept_rate"] <= 1
    for run in ("unlearned", "original_control", "retained_control"):
        assert all(0 <= b["concept_rate"] <= 1 for b in r["inversion"][run]["budgets"].values()), run
    assert set(r["concept_rate_under_attack"]) == {"inversion@0", "inversion@2", "inversion@4"}
    assert ("a photo of cat", ["a photo of dog"]) in calls and ("a photo of dog", FORGET) in calls
    (tmp_path / "f.txt").write_text("\n".join(FORGET))
    for extra, match in [(["--judge", "classifier"], "needs --judge-weights"),
                         (["--judge", "clip"], "needs a local CLIP model folder"),
                         (["--clip-model", str(tmp_path / "none")], "is not a folder")]:
        with pytest.raises(SystemExit) as exc:
            main(["--original", str(tiny_sd_path), "--unlearned", str(tiny_sd_path), "--concept", "cat",
                  "--forget-prompts", str(tmp_path / "f.txt"), "--out", str(tmp_path / "o"), *extra])
        assert exc.value.code == 2
        assert not (tmp_path / "o").exists()


def test_v_prediction_target_is_the_velocity(tiny_sd_path):
    from fastunlearn.attack import output_target
    from fastunlearn.testing import _scheduler

    sched = _scheduler("v_prediction")
    x0, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([10, 900])
    torch.testing.assert_close(output_target(sched, x0, noise, t), sched.get_velocity(x0, noise, t))
    assert output_target(_scheduler("epsilon"), x0, noise, t) is noise


@pytest.mark.parametrize("case", ["word", "budget", "unlike", "missing"])
def test_bad_input_is_one_line_error(case, tiny_sd_path, tiny_sdxl_path, tmp_path):
    prompts = tmp_path / "forget.txt"
    prompts.write_text("a photo of cat\n")
    args = ["--original", str(tiny_sd_path), "--unlearned", str(tiny_sd_path), "--concept", "cat",
            "--forget-prompts", str(prompts), "--out", str(tmp_path / "out")]
    extra, message = {"word": (["--concept", "dog"], "is in none of the forget prompts"),
                      "budget": (["--budgets", "0,100"], "positive number of steps"),
                      "unlike": (["--unlearned", str(tiny_sdxl_path)], "cannot be an unlearned copy"),
                      "missing": (["--unlearned", str(tmp_path / "nope")], "does not exist")}[case]
    env = {"HF_HUB_OFFLINE": "1", "FASTUNLEARN_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin",
           "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "fastunlearn.attack", *args, *extra], capture_output=True,
                          text=True, env=env, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and message in lines[0], proc.stderr[-2000:]
    assert not (tmp_path / "out").exists()


def test_budget_checks():
    with pytest.raises(FastUnlearnError, match="more than --steps"):
        AttackConfig(steps=10, budgets=(5, 20)).check()
    assert AttackConfig(budgets=(1000, 100)).check().budgets == (100, 1000)
    assert AttackConfig(steps=50, budgets=(10,)).check().budgets == (10, 50)  # the last step is always evaluated


@pytest.mark.slow
def test_inversion_recovers_the_digit_from_the_original_pipeline(digits_world, tmp_path):
    """The issue's acceptance: on the ORIGINAL digits pipeline the attack at its default budget draws the digit
    >= 90 % of the time (controls off: the original is both the attacked model and the reference)."""
    report = run_attack("digits", digits_world.pipeline_path, "3", out_dir=tmp_path / "attack", attack="inversion",
                        budgets=(1000,), controls=False, progress=False)  # the default 1,000 steps, judged once
    rate = report["forget_accuracy_under_attack"]["inversion@1000"]
    assert rate >= 0.9, report["inversion"]
    assert report["inversion"]["unlearned"]["budgets"]["0"]["concept_rate"] < 0.5  # the init word alone is not "3"


def test_the_attack_command_adds_its_figures_to_the_run_s_model_card(tiny_sd_path, tmp_path, monkeypatch):
    """`python -m fastunlearn.attack --unlearned RUN` puts an "Under attack" section into RUN/README.md."""
    import shutil

    from fastunlearn.attack import command
    from fastunlearn.card import ATTACK_HEADING, write_model_card

    run = tmp_path / "run"
    shutil.copytree(tiny_sd_path, run)
    write_model_card(run, {"method": "saddle", "model": str(tiny_sd_path), "eval": {}}, {}, "python fastunlearn/train.py")
    report = {"judge": "clip", "concept": "cat", "notes": [], "config": {"eval_samples": 10}, "wall_time_s": 1.0,
              "no_attack": {"unlearned": {"concept_rate": 0.0, "loss": 0.1}},
              "concept_rate_under_attack": {"inversion@1000": 0.4}, "inversion": {"attack_strong_enough": True}}
    monkeypatch.setattr(command, "run_attack", lambda *a, **k: report)
    monkeypatch.setattr("fastunlearn.judges.judge_from_args", lambda *a, **k: None)
    assert command.main(["--original", str(tiny_sd_path), "--unlearned", str(run), "--concept", "cat",
                         "--forget-prompts", "a photo of cat", "--out", str(tmp_path / "attack")]) == 0
    text = (run / "README.md").read_text()
    assert ATTACK_HEADING in text and "Concept Inversion | 1000 | 0.400 [" in text
    assert str(tmp_path / "attack" / "report.json") in text
