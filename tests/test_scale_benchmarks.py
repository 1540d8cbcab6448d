"""Smoke runs of the scale benchmarks on the CPU with small architectures (no timing asserted)."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_train_step_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_train_step.py"), "--arch", "tiny-sd",
                           "--methods", "finetune,saddle", "--params", "attn2", "--teacher", "copy,shared",
                           "--steps", "1", "--warmup", "0", "--no-csv"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| finetune") or ln.startswith("| saddle")]
    assert len(rows) == 3 and all(ln.rstrip().endswith("| ok |") for ln in rows)
    shared = next(ln for ln in rows if "| shared |" in ln)
    copy = next(ln for ln in rows if "| copy |" in ln)
    extra = lambda ln: float(ln.split("|")[10])  # noqa: E731  teacher_extra_mb
    assert 0 < extra(shared) < extra(copy) / 5


@pytest.mark.slow
def test_bench_integrity_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_integrity.py"), "--pairs", "2", "--steps",
                           "2", "--reps", "1", "--no-csv"], capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert "repeated evaluation: naive" in proc.stdout and "equal" in proc.stdout


def test_real_architecture_configs_have_the_published_parameter_counts():
    import json

    import torch
    from diffusers import UNet2DConditionModel

    for name, count in (("sd15", 859_520_964), ("sdxl", 2_567_463_684)):
        with torch.device("meta"):
            unet = UNet2DConditionModel(**json.loads((ROOT / "configs" / "arch" / f"{name}_unet.json").read_text()))
        assert sum(p.numel() for p in unet.parameters()) == count
