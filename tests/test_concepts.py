"""Several concepts in one run: `concept: prompt` files, --forget-prompts repeated (one file per concept), the
per-concept report fields, and (slow) forgetting the digits 3 and 7 at once in the digits world."""
import json
from types import SimpleNamespace

import pytest
import torch

from fastunlearn.config import TrainConfig, read_concepts
from fastunlearn.errors import FastUnlearnError
from fastunlearn.testing import tiny_clip


def test_concept_lines_and_mappings(tmp_path):
    f = tmp_path / "concepts.txt"
    f.write_text("cat: a photo of cat\ndog: a photo of dog\ncat: a painting of cat\n\n")
    assert read_concepts(str(f), None) == {"cat": ["a photo of cat", "a painting of cat"], "dog": ["a photo of dog"]}
    plain = tmp_path / "plain.txt"
    plain.write_text("a photo of cat\nstyle: in the style of X\n")  # not every line is `name: prompt`: one concept
    assert read_concepts(str(plain), None) is None
    assert read_concepts("a photo of cat", None) is None
    (tmp_path / "dog.txt").write_text("a photo of dog\n")
    assert read_concepts(None, {"cat": ["a photo of cat"], "dog": str(tmp_path / "dog.txt")}) == \
        {"cat": ["a photo of cat"], "dog": ["a photo of dog"]}
    for args, match in [((None, {"a": ["x"], "b": ["x"]}), "is in two concepts"),
                        ((None, {}), "must map concept names"),
                        ((None, {"a": []}), "list is empty"),
                        (("x", {"a": ["y"]}), "not both")]:
        with pytest.raises(FastUnlearnError, match=match) as exc:
            read_concepts(*args)
        assert "\n" not in str(exc.value)


def test_repeated_forget_prompts_flag_is_one_concept_per_file(tmp_path):
    from fastunlearn.train import config_from_args

    (tmp_path / "cat.txt").write_text("a photo of cat\n")
    (tmp_path / "dog.txt").write_text("a photo of dog\n")
    base = ["--model", "some/sd", "--output-dir", str(tmp_path / "out")]
    cfg = config_from_args([*base, "--forget-prompts", str(tmp_path / "cat.txt"),
                            "--forget-prompts", str(tmp_path / "dog.txt")])
    assert cfg.forget_prompts is None and cfg.forget_concepts == {"cat": str(tmp_path / "cat.txt"),
                                                                  "dog": str(tmp_path / "dog.txt")}
    cfg = config_from_args([*base, "--forget-prompts", "a photo of cat"])  # once: as before
    assert cfg.forget_prompts == "a photo of cat" and cfg.forget_concepts is None
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "cat.txt").write_text("a cat\n")
    for extra, match in [([str(tmp_path / "cat.txt"), "a photo of dog"], "is not a file"),
                         ([str(tmp_path / "cat.txt"), str(tmp_path / "b" / "cat.txt")], "share one")]:
        with pytest.raises(FastUnlearnError, match=match):
            config_from_args([*base, *(a for x in extra for a in ("--forget-prompts", x))])


def test_evaluator_gives_every_figure_per_concept():
    from fastunlearn.evaluate import Evaluator

    calls = []

    class Bright:  # shows the concept iff the image is bright
        def rates(self, images, concept, contrast):
            calls.append((concept, list(contrast)))
            return images.mean(dim=(1, 2, 3)) > 0.5

    class Classifier:  # predicts 3 for bright images, 0 otherwise
        def predict(self, x):
            return torch.where(x.mean(dim=(1, 2, 3)) > 0, 3, 0)

    forget = (["three", "three", "seven", "seven"], [0, 1, 0, 1])
    retain = (["one", "one"], [0, 1])
    ev = Evaluator(None, forget, retain, sampler=None, judge=Bright(), classifier=Classifier(),
                   forget_label=[3, 3, 7, 7], retain_labels=[1, 1], forget_groups=["3", "3", "7", "7"])
    f_imgs = torch.stack([torch.full((3, 4, 4), v) for v in (1.0, 0.0, 1.0, 1.0)])
    r_imgs = torch.zeros(2, 3, 4, 4)
    rates = ev.judged(f_imgs, r_imgs)
    assert rates["forget_rate_by_concept"] == {"3": 0.5, "7": 1.0} and rates["forget_rate"] == 0.75
    # a concept's contrasts include the other concept's forget prompts, never its own
    assert dict(calls)["three"] == ["one", "seven"] and dict(calls)["seven"] == ["one", "three"]
    acc = ev.accuracy(f_imgs, r_imgs)
    assert acc["forget_accuracy_by_concept"] == {"3": 0.5, "7": 0.0} and acc["forget_accuracy"] == 0.25


def test_forgotten_needs_every_concept_under_the_threshold():
    from fastunlearn.report import RunEvaluation

    run = SimpleNamespace(cfg=TrainConfig())
    run.cfg.eval.forget_threshold = 0.1
    assert not RunEvaluation.forgotten(run, {"forget_accuracy": 0.05, "forget_accuracy_by_concept": {"3": 0.0, "7": 0.1 + 1e-6}})
    assert RunEvaluation.forgotten(run, {"forget_accuracy": 0.05, "forget_accuracy_by_concept": {"3": 0.0, "7": 0.1}})
    assert not RunEvaluation.forgotten(run, {"forget_rate": 0.0, "forget_rate_by_concept": {"cat": 0.0, "dog": 0.5}})


def test_training_run_with_two_concepts_reports_each(base_args, tmp_path, monkeypatch):
    from fastunlearn.train import main

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    clip = tiny_clip(tmp_path / "clip")
    (tmp_path / "cat.txt").write_text("a photo of cat\na painting of cat\n")
    (tmp_path / "dog.txt").write_text("a photo of dog\n")
    (tmp_path / "retain2.txt").write_text("a photo of car\n")
    args = list(base_args)
    i = args.index("--forget-prompts")
    del args[i:i + 2]
    args[args.index("--retain-prompts") + 1] = str(tmp_path / "retain2.txt")
    out = tmp_path / "out"
    main([*args, "--forget-prompts", str(tmp_path / "cat.txt"), "--forget-prompts", str(tmp_path / "dog.txt"),
          "--method", "ovw", "--output-dir", str(out), "--max-steps", "2", "--set", f"eval.clip_model={clip}",
          "--set", "eval.forget_samples=6"])
    report = json.loads((out / "report.json").read_text())
    assert report["forget_concepts"] == {"cat": ["a photo of cat", "a painting of cat"], "dog": ["a photo of dog"]}
    assert report["forget_prompts"] == ["a photo of cat", "a painting of cat", "a photo of dog"]
    for key in ("forget_rate_by_concept", "base_forget_rate_by_concept"):
        assert set(report[key]) == {"cat", "dog"} and all(0 <= v <= 1 for v in report[key].values()), key


@pytest.mark.slow
def test_digits_world_forgets_three_and_seven_at_once(digits_world, tmp_path):
    """Forget the 3 and the 7 in one run (one prompt file each): each is forgotten (<= 0.10), the other digits
    kept (retain accuracy within 0.05 of the base), with per-concept fields in the report."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from fastunlearn.worlds.digits import digit_prompts

    for name, d in (("three", 3), ("seven", 7)):
        (tmp_path / f"{name}.txt").write_text("\n".join(digit_prompts(d)[:3]) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    train = str(Path(__file__).resolve().parents[1] / "fastunlearn" / "train.py")
    # 150 steps: both gone by step 100 (the 3 at 1 of 30 samples, the 7 at 0, at steps 100 and 150; 2026-12-07)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, train, "--forget-prompts", str(tmp_path / "three.txt"), "--forget-prompts",
                           str(tmp_path / "seven.txt"), "--output-dir", str(out), "--max-steps", "150",
                           "--set", "eval.early_every=0", "--set", "eval.every=0"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    print(json.dumps({k: report.get(k) for k in ("forget_accuracy_by_concept", "base_forget_accuracy_by_concept",
                                                 "retain_accuracy", "base_retain_accuracy", "integrity_retain",
                                                 "integrity_forget_by_concept", "wall_time_s")}))
    assert report["forget_digits"] == [3, 7] and report["forget_concepts_digits"] == {"three": 3, "seven": 7}
    assert set(report["forget_accuracy_by_concept"]) == {"three", "seven"}
    assert all(v <= 0.10 for v in report["forget_accuracy_by_concept"].values())
    assert all(v >= 0.9 for v in report["base_forget_accuracy_by_concept"].values())
    assert abs(report["retain_accuracy"] - report["base_retain_accuracy"]) <= 0.05
    assert sorted(report["retain_accuracy_by_digit"]) == [str(d) for d in range(10) if d not in (3, 7)]
    assert set(report["integrity_forget_by_concept"]) == {"three", "seven"}
