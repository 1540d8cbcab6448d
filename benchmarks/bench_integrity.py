#!/usr/bin/env python
"""Repeated integrity evaluations: fastunlearn.metrics.integrity (teacher images + features cached on
disk, batched LPIPS through fastunlearn.ops) against the naive way (sample the teacher again every
time, `lpips` package distance), same prompts, seeds, sampler and LPIPS network.

    python benchmarks/bench_integrity.py                 # tiny SD pipeline at 64 px (CPU or GPU)
    python benchmarks/bench_integrity.py --pairs 32 --steps 25 --reps 3

The first cached call fills the cache (reported, not part of the ratio); then the two ways alternate
`--reps` times and the ratio is naive median / cached median. Both give the same I (checked).
Rows go to benchmarks/results/integrity.csv.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs", type=int, default=16, help="(prompt, seed) pairs per evaluation")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--csv", default=str(ROOT / "benchmarks" / "results" / "integrity.csv"))
    p.add_argument("--no-csv", action="store_true")
    args = p.parse_args()

    import lpips
    import torch
    import torchvision

    from benchmarks.bench_common import env_fields
    from fastunlearn.evaluate import with_unet
    from fastunlearn.metrics import LPIPS, integrity
    from fastunlearn.sampling import SamplerConfig, sample
    from fastunlearn.testing import tiny_sd_pipeline

    device = "cuda" if torch.cuda.is_available() else "cpu"
    teacher = tiny_sd_pipeline()
    teacher.unet.register_to_config(sample_size=32)  # 64 px images: AlexNet-LPIPS needs at least 32
    teacher.to(device)
    unet = type(teacher.unet).from_config(teacher.unet.config).to(device)
    unet.load_state_dict(teacher.unet.state_dict())
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for q in unet.parameters():
            q.add_(torch.randn(q.shape, generator=g).to(device) * 0.02)
    student = with_unet(teacher, unet)
    words = ["cat", "dog", "car", "tree"]
    prompts = [f"a photo of {words[i % len(words)]}" for i in range(args.pairs)]
    seeds = list(range(args.pairs))
    sampler = SamplerConfig(args.steps, 4.0)
    with tempfile.TemporaryDirectory() as tmp:
        # one random AlexNet for both (timing does not need trained weights): the lpips package's,
        # saved as a torchvision state dict for fastunlearn's LPIPS
        ref = lpips.LPIPS(net="alex", pnet_rand=True, verbose=False).eval()
        tv = torchvision.models.alexnet(weights=None)
        for i in range(1, ref.L + 1):
            for idx, module in getattr(ref.net, f"slice{i}").named_children():
                tv.features[int(idx)].load_state_dict(module.state_dict())
        weights = Path(tmp) / "alexnet.pth"
        torch.save(tv.state_dict(), weights)
        ours = LPIPS("alex", backbone_weights=str(weights)).to(device)
        ref = ref.to(device)

        def cached():
            return integrity(teacher, student, prompts, seeds, sampler, ours, cache_dir=tmp, progress=False)["mean"]

        def naive():
            t = sample(teacher, prompts, seeds, sampler, output_type="pt", progress=False)
            s = sample(student, prompts, seeds, sampler, output_type="pt", progress=False)
            with torch.no_grad():
                return float(ref(t.to(device), s.to(device), normalize=True).mean())

        def timed(fn):
            if device == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            value = fn()
            if device == "cuda":
                torch.cuda.synchronize()
            return time.perf_counter() - t0, value

        first, _ = timed(cached)
        times = {"naive": [], "cached": []}
        values = {}
        for _ in range(args.reps):
            for name, fn in (("naive", naive), ("cached", cached)):
                dt, values[name] = timed(fn)
                times[name].append(dt)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["naive"] / med["cached"]
    agree = abs(values["naive"] - values["cached"]) <= 1e-4 * max(1.0, abs(values["naive"]))
    env = env_fields(device)
    row = {"date": env["date"], "device": env["device"], "torch": env["torch"], "pipeline": "tiny-sd 64px",
           "pairs": args.pairs, "steps": args.steps, "reps": args.reps, "first_cached_s": first,
           "naive_s": med["naive"], "cached_s": med["cached"], "ratio": ratio, "I_naive": values["naive"],
           "I_cached": values["cached"], "same_I": agree}
    print(f"{env['device']}: {args.pairs} pairs x {args.steps} DDIM steps; first cached call (fills the cache) "
          f"{first:.2f} s")
    print(f"repeated evaluation: naive {med['naive']:.2f} s, cached {med['cached']:.2f} s -> {ratio:.2f}x "
          f"(I {values['cached']:.5f} vs {values['naive']:.5f}, {'equal' if agree else 'DIFFERENT'})")
    if not args.no_csv:
        from benchmarks.bench_common import append_csv

        path = append_csv(args.csv, [row])
        print(f"appended to {path}")
    return 0 if agree else 1


if __name__ == "__main__":
    sys.exit(main())
