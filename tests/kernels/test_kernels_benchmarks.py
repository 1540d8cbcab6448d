"""The benchmark scripts and the GPU check script run on the CPU (smoke; the GPU run is by hand)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"


def run(args, timeout=300, **env):
    env = {**os.environ, "TRITON_INTERPRET": "0", **env}
    return subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=timeout, env=env)


def test_gpu_check_python_part_on_cpu(tmp_path):
    proc = run([sys.executable, str(BENCH / "gpu_check.py"), "--device", "cpu", "--quick",
                "--json", str(tmp_path / "check.json")])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checks passed" in proc.stdout and "copy bandwidth" in proc.stdout
    summary = run([sys.executable, str(BENCH / "gpu_check.py"), "--summary", str(tmp_path / "check.json")])
    assert summary.returncode == 0 and "correctness" in summary.stdout


@pytest.mark.parametrize("script,providers", [("bench_noise_loss.py", "torch,cpu"),
                                              ("bench_lpips.py", "lpips_pkg,torch,cpu")])
def test_benchmark_quick_smoke(script, providers):
    proc = run([sys.executable, str(BENCH / script), "--quick", "--device", "cpu", "--providers", providers,
                "--reps", "2", "--modes", "forward,full", "--no-csv"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "skip" not in proc.stdout, proc.stdout
    lines = [ln for ln in proc.stdout.splitlines() if " cpu " in ln]
    assert len(lines) == 4, proc.stdout  # 2 configs x 2 modes


def test_gpu_check_sh_syntax():
    assert run(["bash", "-n", str(BENCH / "gpu_check.sh")]).returncode == 0


@pytest.mark.slow
def test_gpu_check_sh_dry_run():
    """Every part of the one-call GPU check, in its order, on tiny shapes on the CPU; nothing skipped."""
    proc = run(["bash", str(BENCH / "gpu_check.sh"), "--dry-run"], timeout=1200, PYTHON=sys.executable)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "checks passed" in proc.stdout and "CHECK noise_prediction_loss" in proc.stdout
    parts = ["(a) kernels against the reference", "(b) acceptance ratios", "(b) noise-loss sweep", "(c1) SDXL step",
             "(c2) SDXL step", "(c3) SDXL step: Saddle LoRA r=16", "(d) integrity", "LPIPS sweep"]
    where = [proc.stdout.find(p) for p in parts]
    assert all(w >= 0 for w in where) and where == sorted(where), proc.stdout[-3000:]
    assert "SKIPPED" not in proc.stdout and "stopped early" not in proc.stdout, proc.stdout[-3000:]
    assert "adapters off" in proc.stdout and "attn2" in proc.stdout
