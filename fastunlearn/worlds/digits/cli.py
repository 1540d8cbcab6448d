"""`python -m fastunlearn.worlds.digits [--cache-dir DIR] [--out DIR]` (console script `fastunlearn-digits`):
builds (or loads) the digits world, then writes a labelled grid of samples for every digit and a JSON with the
classifier's accuracy."""
from __future__ import annotations

import json
from pathlib import Path

from ...errors import cli_errors
from ...paths import ensure_writable_dir
from ...sampling import SamplerConfig
from ..cli import save_digit_grid, world_command
from .build import score_pipeline
from .clip import ensure_clip
from .world import ensure_world, load_world


def _arguments(p) -> None:
    p.add_argument("--guidance-scale", type=float, default=None, help="guidance scale (default: the world's, 4.0)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps (default: the world's, 25)")


@cli_errors
def main(argv=None) -> int:
    args, world = world_command(argv, "python -m fastunlearn.worlds.digits", (
        "Build (or load) the embedded digits world, then write a labelled grid of its samples and the "
        "classifier's accuracy on them."), "outputs/digits", ("--samples-per-digit", "samples per digit"),
        ensure_world, load_world, _arguments)
    clip_info = json.loads((ensure_clip(world.path) / "clip.json").read_text())
    sampler = world.sampler
    sampler = SamplerConfig(args.steps or sampler.num_inference_steps,
                            sampler.guidance_scale if args.guidance_scale is None else args.guidance_scale)
    per_digit, images, labels = score_pipeline(world.pipeline, world.classifier, per_digit=args.samples_per_digit,
                                               sampler=sampler)
    out = ensure_writable_dir(Path(args.out), "output directory")
    accuracy = sum(per_digit.values()) / len(per_digit)
    shown = [i for i, lab in enumerate(labels.tolist()) if sum(1 for x in labels[:i].tolist() if x == lab) < 10]
    save_digit_grid(images[shown], labels[shown], out / "grid.png",
                    title=f"digits world base pipeline: {accuracy:.1%} drawn as the prompted digit "
                          f"(guidance {sampler.guidance_scale}, {sampler.num_inference_steps} DDIM steps)")
    result = {"world": str(world.path), "accuracy": accuracy, "accuracy_per_digit": per_digit,
              "samples_per_digit": args.samples_per_digit, "sampler": sampler.to_dict(),
              "classifier_heldout_accuracy": world.info["classifier_heldout_accuracy"],
              "clip_zero_shot_heldout_accuracy": clip_info["zero_shot_heldout_accuracy"]}
    (out / "samples.json").write_text(json.dumps(result, indent=2))
    print(f"classifier held-out accuracy: {result['classifier_heldout_accuracy']:.3f}; the world's CLIP, zero-shot: "
          f"{result['clip_zero_shot_heldout_accuracy']:.3f}")
    print(f"base pipeline draws the prompted digit: {accuracy:.3f} "
          f"({args.samples_per_digit} samples per digit); per digit: "
          + " ".join(f"{d}:{a:.2f}" for d, a in per_digit.items()))
    print(f"wrote {out / 'grid.png'} and {out / 'samples.json'}")
    return 0
