"""Forget judges (fastunlearn.judges): each judge's decision rule, their settings, and a tiny training run
whose report and history carry forget_rate / retain_rate from a tiny local CLIP."""
import json
from types import SimpleNamespace

import pytest
import torch

from fastunlearn.errors import FastUnlearnError
from fastunlearn.judges import ClassifierJudge, CLIPJudge, DigitsJudge, make_judge, parse_classes


def _tiny_clip(path):
    from fastunlearn.testing import tiny_clip

    return tiny_clip(path, ("a", "photo", "painting", "of", "cat", "dog", "car"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return _tiny_clip(tmp_path_factory.mktemp("clip") / "clip")


def _classifier_weights(path, winner: int, num_classes: int = 5, safetensors=False):
    """A tiny torchvision classifier (mobilenet_v3_small) whose last layer always picks class `winner`."""
    import torchvision

    torch.manual_seed(0)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=num_classes)
    last = model.classifier[-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.zero_()
        last.bias[winner] = 1.0
    state = model.state_dict()
    if safetensors:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    else:
        torch.save(state, path)
    return path


# ---- clip ------------------------------------------------------------------------------------------------
def test_clip_judge_probabilities_are_clips_zero_shot_softmax(clip_dir):
    from transformers import CLIPModel

    judge = CLIPJudge(str(clip_dir))
    prompts = judge.prompts("a photo of cat", ["a photo of dog", "a photo of cat", "a photo of dog", "a car"])
    assert prompts == ["a photo of cat", "a photo of dog", "a car", "a photo"]  # concept first, dedup, neutral last
    images = torch.rand(4, 3, 40, 40, generator=torch.Generator().manual_seed(1))
    got = judge.probs(images, prompts)
    model = CLIPModel.from_pretrained(clip_dir).eval()
    inputs = judge.processor(text=prompts, images=list(images), return_tensors="pt", padding=True, do_rescale=False)
    with torch.no_grad():
        want = model(**inputs).logits_per_image.softmax(dim=-1)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    judge.batch_size = 3  # images in chunks: the same probabilities
    torch.testing.assert_close(judge.probs(images, prompts), got, rtol=1e-5, atol=1e-6)
    rates = judge.rates(images, "a photo of cat", ["a photo of dog", "a car"])
    assert rates.dtype == torch.bool and rates.shape == (4,)
    assert torch.equal(rates, want[:, 0] > want[:, 1:].max(dim=1).values)


def test_clip_judge_decision_rule_and_margin(clip_dir):
    judge = CLIPJudge(str(clip_dir))
    probs = torch.tensor([[0.50, 0.30, 0.20],    # concept ahead by 0.20
                          [0.40, 0.40, 0.20],    # a tie is not the concept (strictly greater)
                          [0.20, 0.70, 0.10],    # a contrast wins
                          [0.36, 0.34, 0.30]])   # ahead by 0.02
    assert judge.decide(probs).tolist() == [True, False, False, True]
    judge.margin = 0.1
    assert judge.decide(probs).tolist() == [True, False, False, False]
    judge.margin = 1.0
    assert not judge.decide(probs).any()
    assert judge.rates(torch.zeros(0, 3, 8, 8), "a photo of cat", []).shape == (0,)


# ---- classifier ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("safetensors", [False, True])
def test_classifier_judge_arg_max_in_the_concept_classes(tmp_path, safetensors):
    path = _classifier_weights(tmp_path / ("w.safetensors" if safetensors else "w.pt"), winner=3,
                               safetensors=safetensors)
    images = torch.rand(3, 3, 48, 40, generator=torch.Generator().manual_seed(0))
    yes = ClassifierJudge(str(path), "3", arch="mobilenet_v3_small")
    assert yes.predict(images).tolist() == [3, 3, 3]
    assert yes.rates(images, "ignored", ["prompts"]).tolist() == [True] * 3
    assert ClassifierJudge(str(path), "2,3", arch="mobilenet_v3_small").rates(images).all()
    assert not ClassifierJudge(str(path), [0, 4], arch="mobilenet_v3_small").rates(images).any()


def test_classifier_judge_predicts_with_imagenet_preprocessing(tmp_path):
    import torchvision

    path = tmp_path / "w.pt"
    torch.manual_seed(1)
    model = torchvision.models.mobilenet_v3_small(weights=None, num_classes=4).eval()
    torch.save(model.state_dict(), path)
    images = torch.rand(2, 3, 30, 30, generator=torch.Generator().manual_seed(2))
    judge = ClassifierJudge(str(path), 0, arch="mobilenet_v3_small")
    x = torch.nn.functional.interpolate(images, size=(224, 224), mode="bilinear", antialias=True, align_corners=False)
    x = (x - torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)) / torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    with torch.no_grad():
        want = model(x).argmax(dim=1)
    assert torch.equal(judge.predict(images), want)


def test_classifier_judge_errors_are_one_line(tmp_path):
    path = _classifier_weights(tmp_path / "w.pt", winner=1)
    cases = [
        (dict(weights=str(tmp_path / "none.pt"), classes="1", arch="mobilenet_v3_small"), "is not a file"),
        (dict(weights=str(path), classes="7", arch="mobilenet_v3_small"), "out of range"),
        (dict(weights=str(path), classes="1", arch="resnet18"), "do not fit resnet18"),
        (dict(weights=str(path), classes="1", arch="no_such_net"), "not a torchvision classification model"),
        (dict(weights=str(path), classes="x", arch="mobilenet_v3_small"), "class indices"),
    ]
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    cases.append((dict(weights=str(tmp_path / "bad.pt"), classes="1", arch="mobilenet_v3_small"), "cannot read"))
    torch.save({"model": SimpleNamespace(a=1)}, tmp_path / "pickled.pt")  # needs unpickling: weights_only refuses
    cases.append((dict(weights=str(tmp_path / "pickled.pt"), classes="1", arch="mobilenet_v3_small"), "cannot read"))
    for kwargs, match in cases:
        with pytest.raises(FastUnlearnError, match=match) as exc:
            ClassifierJudge(**kwargs)
        assert "\n" not in str(exc.value)


def test_parse_classes():
    assert parse_classes(954) == [954] and parse_classes("954, 955") == [954, 955]
    assert parse_classes([1, "2"]) == [1, 2] and parse_classes("[3,4]") == [3, 4] and parse_classes(None) == []
    with pytest.raises(FastUnlearnError, match="class indices"):
        parse_classes("-1")


# ---- digits ----------------------------------------------------------------------------------------------
def test_digits_judge_is_the_classifiers_arg_max_against_the_prompts_digit():
    seen = {}

    class Classifier:
        def predict(self, x):
            seen["range"] = (float(x.min()), float(x.max()))
            return torch.tensor([3, 5, 3])

    judge = DigitsJudge(Classifier(), {"a photo of the digit 3": 3, "a photo of the digit 5": 5})
    images = torch.stack([torch.zeros(3, 8, 8), torch.ones(3, 8, 8), torch.full((3, 8, 8), 0.5)])
    assert judge.rates(images, "a photo of the digit 3").tolist() == [True, False, True]
    assert judge.rates(images, "a photo of the digit 5").tolist() == [False, True, False]
    assert judge.rates(images, 3).tolist() == [True, False, True]
    assert seen["range"] == (-1.0, 1.0)  # the classifier sees [-1, 1], as Evaluator.accuracy gives it
    with pytest.raises(FastUnlearnError, match="not a prompt of the digits world"):
        judge.rates(images, "a cat")


# ---- the evaluator's rates -------------------------------------------------------------------------------
def test_evaluator_forget_and_retain_rates_from_a_judge():
    from fastunlearn.evaluate import Evaluator

    calls = []

    class Bright:  # shows the concept iff the image is bright
        def rates(self, images, concept, contrast):
            calls.append((concept, list(contrast)))
            return images.mean(dim=(1, 2, 3)) > 0.5

    forget = (["cat", "cat", "a cat", "a cat"], [0, 1, 0, 1])
    retain = (["dog", "dog", "car", "car"], [0, 1, 0, 1])
    ev = Evaluator(None, forget, retain, sampler=None, judge=Bright(), judge_contrast=["animal", "dog"],
                   retain_groups=retain[0], trained_forget=["cat"])
    f_imgs = torch.stack([torch.full((3, 4, 4), v) for v in (1.0, 0.0, 1.0, 1.0)])
    r_imgs = torch.stack([torch.full((3, 4, 4), v) for v in (0.0, 1.0, 0.0, 0.0)])
    out = ev.judged(f_imgs, r_imgs)
    assert out["forget_rate"] == 0.75 and out["retain_rate"] == 0.75
    assert out["forget_rate_seen"] == 0.5 and out["forget_rate_unseen"] == 1.0
    assert out["retain_rate_by_prompt"] == {"dog": 0.5, "car": 1.0}
    # contrasts: the retain prompts and the anchors, never a forget prompt
    assert {c for _, cs in calls for c in cs} == {"dog", "car", "animal"}
    assert {q for q, _ in calls} == {"cat", "a cat"}


# ---- settings --------------------------------------------------------------------------------------------
def _cfg(tmp_path, *sets):
    from fastunlearn.config import TrainConfig, set_dotted

    cfg = TrainConfig(output_dir=str(tmp_path / "out"))
    for item in sets:
        key, value = item.split("=", 1)
        set_dotted(cfg, key, value)
    from fastunlearn.cli import check_run

    return check_run(cfg)


def test_bad_judge_settings_are_one_line_errors(tmp_path, clip_dir):
    weights = _classifier_weights(tmp_path / "w.pt", winner=1)
    cases = [
        (["eval.judge=nudenet"], "unknown eval.judge 'nudenet'"),
        (["eval.judge=classifier", "eval.judge_classes=1"], "needs a weights file"),
        (["eval.judge=classifier", f"eval.judge_weights={weights}"], "class index"),
        (["eval.judge=classifier", f"eval.judge_weights={tmp_path / 'none.pt'}", "eval.judge_classes=1"],
         "is not a file"),
        (["model=some/sd-folder", "eval.judge=clip"], "needs a local CLIP model folder"),
        ([f"eval.clip_model={tmp_path / 'noclip'}"], "is not a folder"),
        (["eval.judge_margin=1.5"], "judge_margin must be"),
    ]
    for sets, match in cases:
        with pytest.raises(FastUnlearnError, match=match) as exc:
            _cfg(tmp_path, *sets)
        assert "\n" not in str(exc.value)
    assert _cfg(tmp_path, "eval.judge=clip").eval.clip_model is None  # the digits world has its own CLIP
    cfg = _cfg(tmp_path, "eval.judge=classifier", f"eval.judge_weights={weights}", "eval.judge_classes=1,2",
               "eval.judge_arch=mobilenet_v3_small")
    assert isinstance(make_judge(cfg.eval, in_world=False), ClassifierJudge)


def test_make_judge_defaults_and_notes(tmp_path, clip_dir):
    notes = []
    plain = _cfg(tmp_path)
    assert make_judge(plain.eval, in_world=True, note=notes.append) is None and not notes  # digits: its classifier
    assert make_judge(plain.eval, in_world=False, note=notes.append) is None
    assert notes and notes[0].startswith("forget rate not measured")
    with_clip = _cfg(tmp_path, f"eval.clip_model={clip_dir}")
    assert isinstance(make_judge(with_clip.eval, in_world=False), CLIPJudge)
    assert make_judge(with_clip.eval, in_world=True) is None  # the digits world keeps its classifier
    with pytest.raises(FastUnlearnError, match="needs the digits world"):
        make_judge(_cfg(tmp_path, "eval.judge=digits").eval, in_world=False)
    assert make_judge(_cfg(tmp_path, f"eval.clip_model={clip_dir}", "eval.judge=none").eval, in_world=False) is None


def test_forgotten_uses_the_forget_rate_without_forget_accuracy(tmp_path):
    from fastunlearn.report import RunEvaluation

    run = SimpleNamespace(cfg=_cfg(tmp_path, "eval.forget_threshold=0.2"))
    assert RunEvaluation.forgotten(run, {"forget_rate": 0.2})
    assert not RunEvaluation.forgotten(run, {"forget_rate": 0.25})
    assert not RunEvaluation.forgotten(run, {"forget_rate": None})
    assert not RunEvaluation.forgotten(run, {"forget_accuracy": 0.5, "forget_rate": 0.0})  # accuracy decides when present


# ---- end to end ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sdxl_path"])
def test_training_run_reports_judge_rates_with_a_local_clip(fixture, request, base_args, tmp_path, clip_dir,
                                                            monkeypatch):
    from fastunlearn.train import main

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    args = list(base_args)
    args[args.index("--model") + 1] = str(request.getfixturevalue(fixture))
    main([*args, "--method", "ovw", "--output-dir", str(out), "--max-steps", "3", "--set", "eval.every=1",
          "--set", f"eval.clip_model={clip_dir}", "--set", "eval.stop_when_forgotten=true",
          "--set", "eval.forget_threshold=1.0"])
    report = json.loads((out / "report.json").read_text())
    for key in ("forget_rate", "retain_rate", "base_forget_rate", "base_retain_rate"):
        assert 0 <= report[key] <= 1, key
    assert set(report["retain_rate_by_prompt"]) == {"a photo of dog", "a photo of car"}
    # threshold 1.0: forgotten at the first in-training evaluation, which stops the run there
    assert report["steps_to_converge"] == 1 and report["steps"] == 1
    assert 0 < report["seconds_to_converge"] < report["wall_time_s"]  # the training step's, not the evaluations'
    evals = [h for h in report["history"] if "forget_rate" in h]
    assert [h["step"] for h in evals] == [1, 1] and evals[-1].get("final")
    assert all(0 <= h["forget_rate"] <= 1 and 0 <= h["retain_rate"] <= 1 for h in evals)
    assert not any(n.startswith("forget rate not measured") for n in report["notes"])


def test_training_run_without_a_judge_notes_it(base_args, tmp_path, monkeypatch):
    from fastunlearn.train import main

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    main([*base_args, "--method", "ovw", "--output-dir", str(out), "--max-steps", "1"])
    report = json.loads((out / "report.json").read_text())
    assert "forget_rate" not in report and report["steps_to_converge"] is None and report["seconds_to_converge"] is None
    assert any(n.startswith("forget rate not measured") for n in report["notes"])
