"""The command line: python -m fastunlearn.attack and fastunlearn-attack."""
from __future__ import annotations

import argparse
from pathlib import Path

from ..card import add_attack
from ..errors import FastUnlearnError, cli_errors
from .concepts import ATTACKS, AttackConfig
from .run import run_attack


def _budgets(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise FastUnlearnError(f"--budgets must be comma-separated step counts like 100,300,1000, got {text!r}") from None


@cli_errors
def main(argv=None) -> int:
    from .. import worlds
    from ..config import read_prompts
    from ..judges import add_judge_args, judge_from_args

    d = AttackConfig()
    p = argparse.ArgumentParser(prog="python -m fastunlearn.attack", description=(
        "Concept-recovery attacks on an unlearned diffusers pipeline: Concept Inversion (a learned token <c*>) and "
        "a discrete prompt search, each with controls. Writes report.json, grid.png and the learned embedding "
        "(docs/attacks.md)."))
    p.add_argument("--original", required=True, help="the original pipeline (folder, cached hub id, 'digits' or "
                                                     "'styles')")
    p.add_argument("--unlearned", required=True, help="the unlearned pipeline (folder)")
    p.add_argument("--concept", required=True, help="the word of the forget prompts that names the concept "
                                                   "('a,b' for alternatives; digits world: '3' or 'three'; "
                                                   "styles world: a colour 'red', a stroke 'bold' or a digit)")
    p.add_argument("--out", default="outputs/attack", help="output folder (default: %(default)s)")
    p.add_argument("--attack", choices=ATTACKS, default="all", help="which attack (default: %(default)s)")
    p.add_argument("--forget-prompts", action="append", default=None,
                   help="a prompt file (one per line) or a prompt; repeatable (default: the embedded world's "
                        "prompts of the concept)")
    p.add_argument("--forget-data-dir", default=None, help="data mode: the forget images (metadata.jsonl with "
                                                           "captions) instead of the original's own samples")
    p.add_argument("--retain-concept", default=None, help="word of a retained concept for the control "
                                                          "(default: digits world, the next digit; styles world, "
                                                          "the next colour, the other stroke or the next digit)")
    p.add_argument("--retain-prompts", action="append", default=None, help="prompts of the retained concept")
    p.add_argument("--steps", type=int, default=None, help=f"inversion steps (default: {d.steps})")
    p.add_argument("--budgets", type=_budgets, default=None,
                   help="steps at which the inversion is evaluated (default: 100,300,1000 up to --steps)")
    p.add_argument("--lr", type=float, default=d.lr, help="default: %(default)s")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="default: %(default)s")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="default: %(default)s")
    p.add_argument("--init-word", default=d.init_word, help="<c*> starts as this word (default: %(default)r)")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples, help="judged samples per evaluation "
                                                                           "(default: %(default)s)")
    p.add_argument("--search-k", type=int, default=d.search_k, help="prefix words (default: %(default)s)")
    p.add_argument("--guidance-scale", type=float, default=None, help="default: 4.0 (digits, styles), 7.5 (others)")
    p.add_argument("--clip-model", default=None, help="a local CLIP model folder for the clip judge")
    add_judge_args(p, "--clip-model", "the samples")
    p.add_argument("--no-controls", action="store_true", help="skip the original-model and retained controls")
    p.add_argument("--seed", type=int, default=0, help="default: %(default)s")
    p.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    p.add_argument("--cache-dir", default=None, help="cache directory (default: $FASTUNLEARN_CACHE)")
    args = p.parse_args(argv)
    budgets = args.budgets
    steps = args.steps if args.steps is not None else (max(budgets) if budgets and min(budgets) > 0 else d.steps)
    if budgets is None:
        budgets = tuple(b for b in d.budgets if b < steps) + (steps,)
    forget = [q for item in (args.forget_prompts or []) for q in read_prompts(item, "forget prompt")]
    retain = [q for item in (args.retain_prompts or []) for q in read_prompts(item, "retain prompt")]
    if args.retain_concept and not retain:
        raise FastUnlearnError("--retain-concept needs --retain-prompts (prompts that name it)")
    judge = judge_from_args(args, worlds.of_pipeline(args.original, args.cache_dir), args.device or "cpu")
    report = run_attack(args.original, args.unlearned, args.concept, forget or None, args.out, args.attack,
                        steps=steps, budgets=budgets, seed=args.seed, controls=not args.no_controls,
                        retain_concept=args.retain_concept, retain_prompts=retain or None,
                        forget_data_dir=args.forget_data_dir, cache_dir=args.cache_dir, device=args.device,
                        lr=args.lr, weight_decay=args.weight_decay, batch_size=args.batch_size,
                        init_word=args.init_word, eval_samples=args.eval_samples, search_k=args.search_k,
                        guidance_scale=args.guidance_scale, judge=judge)
    for note in report["notes"]:
        print(f"note: {note}")
    rates = report["concept_rate_under_attack"]
    if report["judge"]:
        print("concept rate under attack: " + " ".join(f"{k}={v:.3f}" for k, v in rates.items() if v is not None)
              + f" (no attack: {report['no_attack']['unlearned']['concept_rate']:.3f})")
    else:
        inv = report.get("inversion", {}).get("unlearned", {}).get("budgets", {})
        print("denoising loss under attack: " + " ".join(f"inversion@{b}={v['loss']:.4f}" for b, v in inv.items())
              + f" (no attack: {report['no_attack']['unlearned']['loss']:.4f})")
    print(f"wall time {report['wall_time_s']:.0f} s; wrote {args.out}")
    if report["judge"] and args.out:  # the unlearned run's model card gets the figures under attack
        card = add_attack(Path(args.unlearned), report, str(Path(args.out) / "report.json"))
        if card is not None:
            print(f"added the figures under attack to {card}")
    return 0
