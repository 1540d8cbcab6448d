#!/usr/bin/env python
"""Training throughput on the CPU: one process versus `deepspeed --num_gpus 2` ZeRO-2, digits world.

    python benchmarks/bench_zero_cpu.py                 # 60 steps each, Saddle, batch 16+16 per process

Both runs use the shipped default config (configs/digits.yaml) without in-training evaluation; the
throughput is taken from train.log between the first and the last logged step (so start-up, teacher
sampling and the final evaluation are excluded), in training rows per second (forget + retain rows
over all processes). Rows go to benchmarks/results/zero_cpu.csv.
"""
from __future__ import annotations

import argparse
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "fastunlearn" / "train.py"


def throughput(log: Path, rows_per_step: int) -> tuple[float, int]:
    stamps = []
    for line in log.read_text().splitlines():
        m = re.match(r"(\S+ \S+) step (\d+) ", line)
        if m:
            stamps.append((dt.datetime.strptime(m.group(1), "%Y-%m-%d %H:%M:%S"), int(m.group(2))))
    (t0, s0), (t1, s1) = stamps[0], stamps[-1]
    return (s1 - s0) * rows_per_step / max((t1 - t0).total_seconds(), 1e-9), s1 - s0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "zero_cpu.csv"))
    args = p.parse_args()
    common = ["--config", str(ROOT / "configs" / "digits.yaml"), "--max-steps", str(args.steps), "--set", "eval.every=0",
              "--set", "eval.forget_samples=4", "--set", "eval.retain_samples_per_prompt=1", "--set", "log_every=5",
              "--set", "checkpoint_every=0"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    launcher = shutil.which("deepspeed", path=os.path.dirname(sys.executable)) or shutil.which("deepspeed")
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, cmd, procs, extra_env in (
                ("1 process, ZeRO-0", [sys.executable, str(TRAIN)], 1, {}),
                ("1 process, ZeRO-2", [sys.executable, str(TRAIN), "--zero-stage", "2"], 1, {}),
                ("2 processes, ZeRO-2", [launcher, "--num_gpus", "2", str(TRAIN), "--zero-stage", "2"], 2,
                 {"OMP_NUM_THREADS": str(max(1, (os.cpu_count() or 2) // 2))})):
            out = Path(tmp) / name.replace(" ", "_").replace(",", "")
            proc = subprocess.run([*cmd, *common, "--output-dir", str(out)], capture_output=True, text=True,
                                  env=env | extra_env)
            if proc.returncode != 0:
                sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}{proc.stdout[-2000:]}")
            rate, steps = throughput(out / "train.log", 32 * procs)
            results.append({"date": dt.datetime.now().isoformat(timespec="seconds"), "run": name, "processes": procs,
                            "threads_per_process": extra_env.get("OMP_NUM_THREADS", str(os.cpu_count())),
                            "steps_timed": steps, "rows_per_s": rate, "cpus": os.cpu_count()})
            print(f"{name}: {rate:.1f} training rows/s over {steps} steps", flush=True)
    base = results[0]["rows_per_s"]
    for r in results:
        r["ratio_to_1proc_zero0"] = r["rows_per_s"] / base
    sys.path.insert(0, str(ROOT))
    from benchmarks.bench_common import append_csv

    path = append_csv(args.csv, results)
    print(f"appended to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
