import json
import subprocess
import sys

import pytest
import torch
from diffusers import DiffusionPipeline

from fastunlearn.errors import FastUnlearnError
from fastunlearn.evaluate import _compatible
from fastunlearn.metrics import DigitsPerceptual, integrity
from fastunlearn.sampling import SamplerConfig
from fastunlearn.worlds.digits import DigitClassifier


def _perturbed(path, scale=0.05):
    pipe = DiffusionPipeline.from_pretrained(path)
    with torch.no_grad():
        for p in pipe.unet.parameters():
            p.add_(torch.randn_like(p) * scale)
    return pipe


def test_second_integrity_call_runs_the_teacher_zero_times(tiny_sd_path, tmp_path):
    teacher = DiffusionPipeline.from_pretrained(tiny_sd_path)
    student = _perturbed(tiny_sd_path)
    calls = []
    teacher.unet.register_forward_hook(lambda *a: calls.append(1))
    perceptual = DigitsPerceptual(DigitClassifier())
    prompts, seeds = ["a photo of cat", "a photo of dog", "a photo of cat"], [0, 0, 1]
    cfg = SamplerConfig(3, 3.0)
    first = integrity(teacher, student, prompts, seeds, cfg, perceptual, cache_dir=tmp_path, progress=False)
    assert calls and first["teacher_sampled"] == 3
    calls.clear()
    second = integrity(teacher, student, prompts, seeds, cfg, perceptual, cache_dir=tmp_path, progress=False)
    assert calls == [] and second["teacher_sampled"] == 0
    torch.testing.assert_close(second["values"], first["values"])
    assert first["mean"] > 0 and first["ci95"] > 0
    same = integrity(teacher, teacher, prompts, seeds, cfg, perceptual, cache_dir=tmp_path, progress=False)
    assert same["mean"] < 1e-6  # identical models draw identical images


def test_evaluate_cli_and_incompatible_pipelines(tiny_sd_path, tiny_sdxl_path, tmp_path):
    original = DiffusionPipeline.from_pretrained(tiny_sd_path)
    original.unet.register_to_config(sample_size=32)  # 64 px images: big enough for AlexNet
    original.save_pretrained(tmp_path / "original")
    student = _perturbed(tmp_path / "original")
    student.save_pretrained(tmp_path / "student")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of cat\na photo of dog\n")
    env_free = {"HF_HUB_OFFLINE": "1", "FASTUNLEARN_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    weights = tmp_path / "alex.pth"
    import torchvision

    torch.save(torchvision.models.alexnet(weights=None).state_dict(), weights)
    proc = subprocess.run([sys.executable, "-m", "fastunlearn.evaluate", "--original", str(tmp_path / "original"),
                           "--unlearned", str(tmp_path / "student"), "--prompts", str(prompts), "--seeds", "2",
                           "--steps", "2", "--backbone-weights", str(weights), "--out", str(tmp_path / "ev")],
                          capture_output=True, text=True, env=env_free, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["samples"] == 4 and report["perceptual_network"] == "lpips-alex" and report["integrity"] > 0
    assert (tmp_path / "ev" / "grid.png").is_file()
    # unlike pipelines are refused in one line
    proc = subprocess.run([sys.executable, "-m", "fastunlearn.evaluate", "--original", str(tiny_sd_path),
                           "--unlearned", str(tmp_path / "v"), "--prompts", str(prompts)],
                          capture_output=True, text=True, env=env_free, timeout=300)
    assert proc.returncode == 2 and "does not exist" in proc.stderr


def test_incompatible_schedulers_and_sizes_are_refused(tiny_sd_path):
    from diffusers import DDIMScheduler

    a = DiffusionPipeline.from_pretrained(tiny_sd_path)
    b = DiffusionPipeline.from_pretrained(tiny_sd_path)
    b.scheduler = DDIMScheduler.from_config({**a.scheduler.config, "prediction_type": "v_prediction"})
    with pytest.raises(FastUnlearnError, match="different schedulers"):
        _compatible(a, b)
    b.scheduler = type(a.scheduler).from_config({**a.scheduler.config, "prediction_type": "v_prediction"})
    with pytest.raises(FastUnlearnError, match="prediction_type"):
        _compatible(a, b)
    b.scheduler = a.scheduler
    b.unet.register_to_config(sample_size=16)
    with pytest.raises(FastUnlearnError, match="different image sizes"):
        _compatible(a, b)


def test_evaluator_splits_accuracy_by_retained_group_and_seen_phrasing():
    """Per-group retain accuracy and I_retain (confusable digits stay visible) and forget accuracy on
    the trained phrasings vs the held-out ones, computed from per-sample judgements."""
    from fastunlearn.evaluate import Evaluator

    class Judge:  # "predicts" the label stored in the image's first pixel
        def predict(self, x):
            return ((x[:, 0, 0, 0] + 1) / 2 * 10).round().long()

    class Perceptual:  # distance = |difference| of the second pixel
        name = "fake"

        def features(self, imgs):
            return [imgs[:, :1, 0, 1]]

        def distance(self, f0, f1):
            return (f0[0] - f1[0]).abs().flatten()

    def images(labels, second):
        x = torch.zeros(len(labels), 3, 2, 2)
        x[:, 0, 0, 0] = torch.tensor(labels, dtype=torch.float32) / 10
        x[:, 0, 0, 1] = torch.tensor(second)
        return x

    forget = (["p0", "p1", "p0", "p1"], [0, 1, 2, 3])
    retain = (["five"] * 2 + ["eight"] * 3, list(range(5)))
    ev = Evaluator(None, forget, retain, sampler=None, perceptual=Perceptual(), classifier=Judge(), forget_label=3,
                   retain_labels=[5, 5, 8, 8, 8], retain_groups=[5, 5, 8, 8, 8], group_key="digit",
                   trained_forget=["p0"])
    acc = ev.accuracy(images([3, 3, 1, 1], [0] * 4), images([5, 6, 8, 8, 2], [0] * 5))
    assert acc["forget_accuracy"] == 0.5 and acc["forget_accuracy_seen"] == 0.5 and acc["forget_accuracy_unseen"] == 0.5
    assert acc["retain_accuracy_by_digit"] == {"5": 0.5, "8": pytest.approx(2 / 3, abs=1e-6)}
    ev2 = Evaluator(None, forget, retain, sampler=None, classifier=Judge(), forget_label=3,
                    retain_labels=[5, 5, 8, 8, 8], trained_forget=["p0", "p1"])
    assert ev2.accuracy(images([3, 0, 3, 3], [0] * 4), images([5] * 5, [0] * 5))["forget_accuracy_unseen"] is None
    assert ev.by_group(torch.tensor([0.1, 0.3, 1.0, 2.0, 3.0])) == {"5": 0.2, "8": 2.0}
