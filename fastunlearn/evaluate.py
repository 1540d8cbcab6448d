"""`python -m fastunlearn.evaluate` (console script `fastunlearn-evaluate`): integrity I between an original and
an unlearned pipeline, kept apart from forgotten, with the world's or a judge's accuracies beside it; writes
report.json and grid.png. The library it runs on is fastunlearn/evaluation.py; its names stay importable from
here.
"""
from __future__ import annotations

import torch

from .evaluation import (  # noqa: F401  (re-exported: the library's names, importable from here as before)
    Evaluator,
    _compatible,
    comparison_rows,
    save_comparison_grid,
    training_evaluator,
    training_metrics,
)
from .sampling import with_unet  # noqa: F401  (re-exported)


def _forget_prompts_of_run(unlearned: str) -> list[str] | None:
    """The forget prompts an unlearned run's report.json names (key `forget_prompts`), or None."""
    import json
    from pathlib import Path

    report = Path(unlearned).expanduser() / "report.json"
    if not report.is_file():
        return None
    try:
        prompts = json.loads(report.read_text()).get("forget_prompts")
    except (ValueError, OSError, AttributeError):
        return None
    return [str(q) for q in prompts] if isinstance(prompts, list) and prompts else None


def _world_judge(world, prompts):
    """An embedded world's judge for `prompts`: (classifier, the label of every prompt the world knows), read
    from the world's own evaluation sets (every phrasing of every concept), or None outside a world."""
    if world is None:
        return None
    info = next((i for q in prompts for i in [world.prompts([q], None, None)[2]] if i is not None), None)
    if info is None:
        return None
    sets = world.evaluation(info, 12, 12)
    labels = {q: sets["forget_label"] for q in sets["forget"][0]}
    labels.update(zip(sets["retain"][0], (int(x) for x in sets["retain_labels"])))
    return sets["classifier"], labels


def _judged(judge, prompts, images):
    """The share of `images` the judge classifies as the concept of their prompt (None: no prompt it knows)."""
    classifier, labels = judge
    idx = [i for i, q in enumerate(prompts) if q in labels]
    if not idx:
        return None
    pred = classifier.predict(images[idx] * 2 - 1).cpu()
    return float((pred == torch.tensor([labels[prompts[i]] for i in idx])).float().mean())


def main(argv=None) -> int:
    import argparse
    import math
    from pathlib import Path

    from . import worlds
    from .errors import FastUnlearnError, cli_errors
    from .export import load_run
    from .judges import add_judge_args, judge_from_args
    from .metrics import LPIPS, integrity, mean_ci95
    from .models import load_pipeline
    from .sampling import SamplerConfig

    @cli_errors
    def run():
        p = argparse.ArgumentParser(prog="python -m fastunlearn.evaluate", description=(
            "Integrity I between an original and an unlearned diffusers pipeline: LPIPS between the images both "
            "draw from the same prompts and the same initial noise, separately for what was kept (I_retain) and "
            "what was forgotten (I_forget). Writes report.json and grid.png."))
        p.add_argument("--original", required=True, help="the original pipeline (folder, cached hub id, or 'digits')")
        p.add_argument("--unlearned", required=True, help="the unlearned pipeline (folder or cached hub id), or a run "
                                                           "folder saved with --save-format unet|trained")
        p.add_argument("--base", default=None, help="the base model a unet/trained export applies to (default: the "
                                                    "model its report.json names)")
        p.add_argument("--prompts", action="append", default=None,
                       help="a prompt file (one per line) or a prompt; repeatable (default: digits world prompts); "
                            "prompts of the forgotten concept are measured as I_forget, not I_retain")
        p.add_argument("--forget-prompts", action="append", default=None,
                       help="the forgotten concept's prompts: a file or a prompt; repeatable (default: forget_prompts "
                            "of the unlearned run's report.json; none: only I_retain)")
        p.add_argument("--seeds", type=int, default=4, help="seeds per prompt (default: %(default)s)")
        p.add_argument("--steps", type=int, default=25, help="DDIM steps (default: %(default)s)")
        p.add_argument("--guidance-scale", type=float, default=None, help="default: 4.0 (digits), 7.5 (others)")
        p.add_argument("--perceptual", default=None, help="alex | vgg | squeeze | digits (default: digits for the "
                                                           "digits world, else alex)")
        p.add_argument("--backbone-weights", "--lpips-weights", default=None, metavar="PATH",
                       help="torchvision backbone weights file for LPIPS (default: the torch hub cache, downloaded "
                            "there when online)")
        p.add_argument("--fid-weights", default=None, metavar="PATH",
                       help="torch-fidelity's InceptionV3 weights file: also report Inception FID/KID of the retain "
                            "images, unlearned vs original (default: not computed)")
        p.add_argument("--clip-model", default=None, help="a local CLIP model folder for CLIPScore (default: none, "
                                                          "not computed)")
        add_judge_args(p, "--clip-model", "the forget and retain samples (forget_rate, retain_rate)")
        p.add_argument("--out", default="outputs/evaluate", help="output folder (default: %(default)s)")
        p.add_argument("--cache-dir", default=None, help="cache directory (default: $FASTUNLEARN_CACHE)")
        args = p.parse_args(argv)
        from .config import read_prompts
        from .outputs import check_output_path, strict_json

        for flag, value in (("--seeds", args.seeds), ("--steps", args.steps)):
            if value < 1:
                raise FastUnlearnError(f"{flag} must be at least 1, got {value}")
        if args.guidance_scale is not None and not (math.isfinite(args.guidance_scale) and args.guidance_scale >= 0):
            raise FastUnlearnError(f"--guidance-scale must be a finite number >= 0, got {args.guidance_scale}")
        out = Path(args.out)
        check_output_path(out, "--out")  # before any sampling
        forget = [q for item in (args.forget_prompts or []) for q in read_prompts(item, "forget prompt")]
        forget_from = "--forget-prompts" if forget else None
        if not forget:
            forget = _forget_prompts_of_run(args.unlearned) or []
            forget_from = f"{Path(args.unlearned) / 'report.json'}" if forget else None
        original = load_pipeline(args.original, cache_dir=args.cache_dir)
        unlearned = load_run(args.unlearned, args.base, cache_dir=args.cache_dir)
        _compatible(original, unlearned)
        world = worlds.of_pipeline(args.original, args.cache_dir)  # an embedded world gives the defaults
        prompts = [q for item in (args.prompts or []) for q in read_prompts(item, "prompt")]
        if not prompts:
            if world is None:
                raise FastUnlearnError("give --prompts FILE (one prompt per line)")
            prompts = world.eval_prompts()
        judge = _world_judge(world, forget + prompts)
        rater = judge_from_args(args, world)  # a forget judge (clip / classifier): forget_rate and retain_rate
        # what was kept: the prompts that are not of the forgotten concept (in a world: not of its label)
        forgotten = {judge[1][q] for q in forget if q in judge[1]} if judge else set()
        retain = [q for q in dict.fromkeys(prompts)
                  if q not in forget and not (judge and judge[1].get(q, -1) in forgotten)]
        forget = list(dict.fromkeys(forget))
        if not retain:
            raise FastUnlearnError("every prompt is of the forgotten concept: give retain prompts with --prompts")
        kind = args.perceptual or (world.name if world is not None else "alex")
        if kind in worlds.WORLDS:  # a world's own perceptual network (digits: lpips-digits)
            perceptual = (world if world is not None and world.name == kind else worlds.get(kind, args.cache_dir)).perceptual()
        else:
            perceptual = LPIPS(kind, backbone_weights=args.backbone_weights)
        fid = None
        if args.fid_weights is not None:  # built before any sampling: a bad file fails first
            from .metrics import InceptionFID

            fid = InceptionFID(args.fid_weights)
        clip = None
        if args.clip_model:
            from .metrics import CLIPScore

            clip = CLIPScore(args.clip_model)
        guidance = args.guidance_scale if args.guidance_scale is not None else (
            world.guidance_scale if world is not None else 7.5)
        sampler = SamplerConfig(args.steps, guidance)
        groups = {"forget": forget, "retain": retain}
        pairs = [(g, q, s) for g in ("forget", "retain") for q in groups[g] for s in range(args.seeds)]
        all_prompts = [q for _, q, _ in pairs]
        res = integrity(original, unlearned, all_prompts, [s for _, _, s in pairs], sampler, perceptual,
                        cache_dir=args.cache_dir)
        out.mkdir(parents=True, exist_ok=True)
        at = {g: [i for i, (h, _, _) in enumerate(pairs) if h == g] for g in groups}
        per_prompt = {q: float(res["values"][[i for i, (_, r, _) in enumerate(pairs) if r == q]].mean())
                      for g in ("forget", "retain") for q in groups[g]}
        report = {"original": args.original, "unlearned": args.unlearned}
        if args.base:
            report["base"] = args.base
        notes = []
        if fid is None:
            notes.append("FID (Inception) not computed: no --fid-weights given")
        elif len(at["retain"]) < 2:
            notes.append("FID (Inception) not computed: it needs at least 2 retain samples")
        else:
            got = fid.compare(res["teacher_images"][at["retain"]], res["student_images"][at["retain"]])
            report.update(fid_retain=got["fid"], kid_retain=got["kid"], kid_retain_std=got["kid_std"],
                          fid_network=fid.name)
        for g in ("retain", "forget"):
            mean, half = mean_ci95(res["values"][at[g]]) if at[g] else (None, None)
            report[f"integrity_{g}"], report[f"integrity_{g}_ci95"] = mean, half
            report[f"integrity_{g}_by_prompt"] = {q: per_prompt[q] for q in groups[g]}
            report[f"samples_{g}"] = len(at[g])
        if not forget:
            notes.append(f"I_forget not computed: no forget prompts ({args.unlearned} has no report.json naming "
                         "them; give --forget-prompts)")
        report.update({"integrity": report["integrity_retain"], "integrity_ci95": report["integrity_retain_ci95"],
                       "forget_prompts": forget, "forget_prompts_from": forget_from, "retain_prompts": retain,
                       "perceptual_network": res["perceptual"], "samples": len(pairs), "sampler": sampler.to_dict(),
                       "integrity_per_prompt": per_prompt})
        if judge is not None:
            for who, key in (("", "student_images"), ("base_", "teacher_images")):
                for g in ("forget", "retain"):
                    report[f"{who}{g}_accuracy"] = (_judged(judge, [all_prompts[i] for i in at[g]], res[key][at[g]])
                                                    if at[g] else None)
            report["judge"] = f"{world.name} world classifier: the share of images drawn as their prompt's concept"
        if rater is not None and forget:
            sets = {g: ([all_prompts[i] for i in at[g]], [pairs[i][2] for i in at[g]]) for g in ("forget", "retain")}
            rates = Evaluator(None, sets["forget"], sets["retain"], sampler, judge=rater)
            for who, key in (("", "student_images"), ("base_", "teacher_images")):
                got = rates.judged(res[key][at["forget"]], res[key][at["retain"]])
                report[f"{who}forget_rate"], report[f"{who}retain_rate"] = got["forget_rate"], got["retain_rate"]
            report["judge"] = rater.name
        elif rater is not None:
            notes.append("forget rate not measured: no forget prompts")
        if clip is not None:
            for who, key in (("original", "teacher_images"), ("unlearned", "student_images")):
                report[f"clip_score_{who}"] = float(clip(res[key], all_prompts).mean())
        else:
            notes.append("CLIPScore not computed: no --clip-model given")
        report["notes"] = notes
        (out / "report.json").write_text(strict_json(report))
        shown = forget[:2] + retain[:6 - len(forget[:2])]
        rows = [(f"{'forget' if q in forget else 'retain'}: {q}",
                 res["teacher_images"][[i for i, (_, r, _) in enumerate(pairs) if r == q]][:6],
                 res["student_images"][[i for i, (_, r, _) in enumerate(pairs) if r == q]][:6]) for q in shown]

        def fmt(g):
            mean, half = report[f"integrity_{g}"], report[f"integrity_{g}_ci95"]
            return "not computed" if mean is None else f"{mean:.4f} ± {half:.4f}" if half == half else f"{mean:.4f}"

        summary = f"I_retain = {fmt('retain')}, I_forget = {fmt('forget')}"
        save_comparison_grid(out / "grid.png", rows, f"{summary} ({res['perceptual']})")
        accs = " ".join(f"{k}={report[k]:.4g}" for k in ("forget_accuracy", "retain_accuracy", "base_forget_accuracy",
                                                         "base_retain_accuracy", "forget_rate", "retain_rate",
                                                         "base_forget_rate", "base_retain_rate")
                        if report.get(k) is not None)
        print(f"{summary} ({res['perceptual']}, {len(at['retain'])} retain + {len(at['forget'])} forget samples)"
              f"{'; ' + accs if accs else ''}; wrote {out}")
        return 0

    return run()


if __name__ == "__main__":
    import sys

    sys.exit(main())
