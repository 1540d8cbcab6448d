#!/usr/bin/env python
"""The scale of I in an embedded world: I between two *independent* drawings of the same prompt by the original
pipeline (same prompts, seeds s and s + 10,000).
An unlearned model's I_retain near this "chance" level means its retained images are as different from the
original's as a fresh drawing of the same prompt: the identity of the drawing is lost even if the concept is kept.
(The original against itself, same seeds, is 0 by construction.)

    python benchmarks/chance_integrity.py --world styles      # the retain set of the red task (120 samples)
    python benchmarks/chance_integrity.py --world digits      # the retain set of the digit-3 task (180 samples)
"""
from __future__ import annotations

import argparse
import json
import sys

import torch


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--world", choices=("digits", "styles"), default="styles")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--samples", type=int, default=20, help="retain samples per neighbour group (as the trainer)")
    args = p.parse_args()

    from fastunlearn import worlds
    from fastunlearn.config import TrainConfig
    from fastunlearn.models import load_pipeline
    from fastunlearn.sampling import SamplerConfig, sample

    world = worlds.get(args.world, args.cache_dir)
    cfg = TrainConfig(model=args.world)
    if args.world == "styles":
        cfg.forget_style = "red"
    else:
        cfg.forget_digit = 3
    _, _, info = world.prompts(None, None, cfg)
    ev = world.evaluation(info, 100, args.samples)
    prompts, seeds = ev["retain"]
    pipe = load_pipeline(str(world.pipeline_path()))
    sampler = SamplerConfig(25, world.guidance_scale)
    torch.set_grad_enabled(False)
    a = sample(pipe, prompts, seeds, sampler, progress="seeds s")
    b = sample(pipe, prompts, [s + 10_000 for s in seeds], sampler, progress="seeds s + 10,000")
    net = ev["perceptual"]
    d = net.distance(net.features(a), net.features(b)).flatten()
    half = 1.96 * float(d.std()) / len(d) ** 0.5
    out = {"world": args.world, "perceptual_network": net.name, "samples": len(d),
           "integrity_independent_drawings": round(float(d.mean()), 4), "ci95": round(half, 4)}
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
