"""End to end on the real digits world (slow; run in CI): the default command forgets the digit 3
and keeps the other digits, in one process and as 2 DeepSpeed processes with ZeRO-2 and ZeRO-3."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "fastunlearn" / "train.py")


def check_report(out: Path):
    report = json.loads((out / "report.json").read_text())
    print(json.dumps({k: report[k] for k in ("method", "steps", "forget_accuracy", "retain_accuracy",
                                             "base_forget_accuracy", "base_retain_accuracy", "integrity_retain",
                                             "integrity_forget", "steps_to_converge", "wall_time_s",
                                             "world_size", "zero_stage")}))
    assert report["forget_accuracy"] <= 0.10
    assert abs(report["retain_accuracy"] - report["base_retain_accuracy"]) <= 0.05
    assert report["eval"]["forget_samples"] >= 100 and report["eval"]["retain_samples"] >= 9 * 20
    assert report["perceptual_network"] == "lpips-digits"
    from diffusers import DiffusionPipeline

    DiffusionPipeline.from_pretrained(out)
    return report


@pytest.mark.slow
def test_default_command_forgets_three(digits_world, tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, TRAIN], cwd=tmp_path, capture_output=True, text=True, timeout=1800, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = check_report(tmp_path / "outputs" / "digits-saddle")
    assert report["method"] == "saddle" and report["forget_digit"] == 3
    assert report["wall_time_s"] <= 15 * 60
    # the PI multiplier does not overshoot (the previous rule peaked near 3; benchmarks/RESULTS.md)
    assert report["dual"] == "pi" and report["peak_lambda"] <= 1.0 and len(report["lambda_trace"]) == 400
    assert report["constraint_met_step"] is not None and report["constraint_met_step"] % 10 == 0  # a probe step
    # paraphrase hold-out: trained on 3 of the 6 phrasings, forgotten under the 3 it never saw too
    assert len(report["forget_prompts"]) == 3 and report["forget_accuracy_unseen"] <= 0.10
    # the retained digits one by one, confusable ones included
    assert sorted(report["retain_accuracy_by_digit"]) == sorted(report["integrity_retain_by_digit"]) == \
        [str(d) for d in range(10) if d != 3]
    assert [h["step"] for h in report["history"] if not h.get("final")][:7] == [25, 50, 75, 100, 125, 150, 200]


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_two_process_deepspeed_zero(stage, digits_world, tmp_path):
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    assert launcher, "the deepspeed launcher is not installed"
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    env["OMP_NUM_THREADS"] = "1"
    out = tmp_path / "out"
    proc = subprocess.run([launcher, "--num_gpus", "2", "--master_port", str(29500 + stage), TRAIN, "--config",
                           str(ROOT / "configs" / "digits.yaml"), "--zero-stage", str(stage), "--output-dir", str(out),
                           # 2 processes see 64 rows a step: the 3 was gone by step 50 (forget accuracy 0.03 of 30
                           # samples at step 50, 0.01 of 100 at step 100, ZeRO-3, 2026-12-07)
                           "--max-steps", "100",
                           # ZeRO is what this tests, not the evaluation schedule: under ZeRO-3 one evaluation in
                           # training (the weights gathered from their partitions), and the final one
                           "--set", "eval.early_every=0", "--set", f"eval.every={50 if stage == 3 else 0}",
                           "--set", "eval.judge=clip"],  # the world's CLIP as forget judge, beside the classifier
                          cwd=tmp_path, capture_output=True, text=True, timeout=2400, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = check_report(out)
    assert report["world_size"] == 2 and report["zero_stage"] == stage
    # the clip judge agrees with the digit classifier, before and after unlearning
    assert report["judge"].startswith("clip")
    for pre in ("", "base_"):
        assert abs(report[f"{pre}forget_rate"] - report[f"{pre}forget_accuracy"]) <= 0.05, report
    assert report["clip_score_retain"] > 0
