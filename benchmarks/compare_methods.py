#!/usr/bin/env python
"""Every method on the digits world with the same seed, data and step budget.

    python benchmarks/compare_methods.py                       # all methods, 400 steps (~28 min, 2 cores)
    python benchmarks/compare_methods.py --methods saddle,ovw --max-steps 200
    python benchmarks/compare_methods.py --run saddle-ga=saddle,saddle.dual=ga,saddle.lambda_init=1 \
        --run saddle --run ovw --seeds 0,1 --forget-digits 3,5   # variants, seeds and digits

Each run is `fastunlearn/train.py` in its own process; the tables (Markdown) and plots go to --out:
I_retain against forget accuracy and against the step, and Saddle's λ beside I_retain, one
figure per (digit, seed). With --attack every unlearned pipeline is also attacked (Concept Inversion,
1,000 steps) and the table gains the forget accuracy under attack; the same attack on the original
pipeline is the control (docs/attacks.md).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["saddle", "ovw", "esd", "ga", "erasediff", "salun", "ca"]


def fmt(x, digits=3):
    return "—" if x is None else f"{x:.{digits}f}"


def parse_run(text: str) -> tuple[str, str, list[str]]:
    """`LABEL=METHOD,KEY=VALUE,...` or `METHOD` -> (label, method, ["--set", "KEY=VALUE", ...])."""
    label, _, rest = text.partition("=")
    if not rest:
        return label, label, []
    method, *sets = rest.split(",")
    return label, method, [a for kv in sets for a in ("--set", kv)]


def run_method(label: str, method: str, sets: list[str], digit: int, seed: int, args) -> dict:
    out = Path(args.out) / f"{label}-d{digit}-s{seed}"
    cmd = [sys.executable, str(ROOT / "fastunlearn" / "train.py"), "--method", method, "--max-steps",
           str(args.max_steps), "--seed", str(seed), "--forget-digit", str(digit),
           "--output-dir", str(out), "--overwrite", *sets, *args.extra]
    if args.eval_every is not None:
        cmd += ["--set", f"eval.every={args.eval_every}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"compare: {label} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    report.update(label=label, seed=seed, settings=sets[1::2], process_wall_s=round(time.time() - t0, 1))
    if args.attack:
        report["attack"] = attack(out, digit, args.attack_steps)
    return report


def attack(pipeline, digit: int, steps: int) -> dict:
    """Concept Inversion (fastunlearn.attack, docs/attacks.md) against `pipeline` at `steps`, no controls."""
    from fastunlearn.attack import run_attack

    rep = run_attack("digits", str(pipeline), str(digit), budgets=(steps,), steps=steps, controls=False, progress=False)
    return {"forget_accuracy": rep["forget_accuracy_under_attack"][f"inversion@{steps}"], "steps": steps,
            "wall_time_s": rep["inversion"]["unlearned"]["wall_time_s"]}


def at_step(report: dict, step) -> float | None:
    """I_retain of the first in-training evaluation at or after `step` (None if training ended first)."""
    if step is None:
        return None
    return next((h.get("integrity_retain") for h in report["history"] if h["step"] >= step and not h.get("final")), None)


def label(r: dict) -> str:
    return r.get("label", r["method"])


def same_run_of(reports: list[dict], r: dict, name: str) -> dict | None:
    """The run labelled `name` with r's digit and seed."""
    return next((o for o in reports if label(o) == name and o.get("forget_digit") == r.get("forget_digit")
                 and o.get("seed") == r.get("seed")), None)


def table(reports: list[dict]) -> str:
    lines = ["| run | digit | seed | forget acc (seen / unseen phrasings) | retain acc (base) | I_retain ± 95 % | "
             "I_forget | FID (fid-digits, retain) | steps_to_converge | constraint_met_step | peak λ | "
             "I_retain at constraint_met_step (OVW there) | I_retain at convergence | I_retain at 3× convergence | "
             "wall time (s) | forget acc under attack (inversion) | attack wall time (s) |", "|---" * 17 + "|"]
    for r in reports:
        conv, cms = r["steps_to_converge"], r.get("constraint_met_step")
        at_3x = at_step(r, 3 * conv) if conv is not None else None
        ovw = same_run_of(reports, r, "ovw")
        at_cms = f"{fmt(at_step(r, cms))} ({fmt(at_step(ovw, cms)) if ovw else '—'})" if cms else "—"
        lines.append(
            f"| {label(r)} | {r.get('forget_digit', '—')} | {r.get('seed', '—')} | {fmt(r['forget_accuracy'], 2)} "
            f"({fmt(r.get('forget_accuracy_seen'), 2)} / {fmt(r.get('forget_accuracy_unseen'), 2)}) | "
            f"{fmt(r['retain_accuracy'], 3)} ({fmt(r['base_retain_accuracy'], 3)}) | "
            f"{fmt(r['integrity_retain'])} ± {fmt(r['integrity_retain_ci95'])} | {fmt(r['integrity_forget'])} | "
            f"{fmt(r.get('fid_retain'), 2)} | {conv if conv is not None else '—'} | {cms or '—'} | "
            f"{fmt(r.get('peak_lambda'), 2)} | {at_cms} | {fmt(at_step(r, conv))} | {fmt(at_3x)} | {r['wall_time_s']:.0f} | "
            f"{fmt(r['attack']['forget_accuracy'], 2) if r.get('attack') else '—'} | "
            f"{fmt(r['attack']['wall_time_s'], 0) if r.get('attack') else '—'} |")
    return "\n".join(lines)


def table_by_digit(reports: list[dict]) -> str:
    """Final I_retain and retain accuracy of every retained digit (confusable digits stay visible)."""
    lines = ["| run | digit | seed | " + " | ".join(f"{d}: I_retain / acc" for d in range(10)) + " |", "|---" * 13 + "|"]
    for r in reports:
        by_i, by_a = r.get("integrity_retain_by_digit") or {}, r.get("retain_accuracy_by_digit") or {}
        cells = [f"{fmt(by_i.get(str(d)))} / {fmt(by_a.get(str(d)), 2)}" if str(d) in by_i else "—" for d in range(10)]
        lines.append(f"| {label(r)} | {r.get('forget_digit', '—')} | {r.get('seed', '—')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(reports: list[dict], path: Path) -> None:
    """Left: I_retain against forget accuracy over training (one line per run, arrow to the end).
    Middle: I_retain against the training step. Log scale: GA's I_retain is ~50x Saddle's.
    Right: λ of every Saddle run over the steps (solid), its in-training I_retain (dashed, right axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx, cx) = plt.subplots(1, 3, figsize=(18, 4.8))
    cx2 = cx.twinx()
    for r in reports:
        hist = [h for h in r["history"] if not h.get("final")]
        if not hist:
            continue
        xs, ys, steps = ([h[k] for h in hist] for k in ("forget_accuracy", "integrity_retain", "step"))
        (line,) = ax.plot(xs, ys, marker="o", ms=3, lw=1.2, label=label(r))
        ax.annotate("", xy=(xs[-1], ys[-1]), xytext=(xs[-2], ys[-2]) if len(xs) > 1 else (xs[-1], ys[-1]),
                    arrowprops=dict(arrowstyle="->", color=line.get_color()))
        bx.plot(steps, ys, marker="o", ms=3, lw=1.2, color=line.get_color(), label=label(r))
        if r.get("steps_to_converge"):
            bx.axvline(r["steps_to_converge"], color=line.get_color(), lw=0.6, ls=":")
        if r.get("lambda_trace"):
            lam = r["lambda_trace"]
            cx.plot(range(1, len(lam) + 1), lam, lw=1.2, color=line.get_color(), label=f"{label(r)}: λ")
            cx2.plot(steps, ys, lw=1.0, ls="--", marker=".", color=line.get_color())
            if r.get("constraint_met_step"):
                cx.axvline(r["constraint_met_step"], color=line.get_color(), lw=0.6, ls=":")
    ax.axvline(0.10, color="grey", lw=0.8, ls="--")
    ax.text(0.102, 0.02, "forget criterion 0.10", fontsize=7, color="grey", rotation=90, transform=ax.get_xaxis_transform())
    for a_ in (ax, bx):
        a_.set_yscale("log")
        a_.set_ylabel("I_retain (lpips-digits, in-training set; lower = integrity kept)")
        a_.legend(fontsize=8)
        a_.grid(alpha=0.3, which="both")
    ax.set_xlabel("forget accuracy (share of forget samples read as the digit; lower = forgotten)")
    ax.set_title("integrity vs forgetting over training (arrow: last evaluation)", fontsize=9)
    bx.set_xlabel("training step (dotted: steps_to_converge)")
    bx.set_title("I_retain over training", fontsize=9)
    cx.set_xlabel("training step (dotted: constraint_met_step)")
    cx.set_ylabel("λ (solid)")
    cx2.set_ylabel("I_retain, in-training set (dashed)")
    cx2.set_yscale("log")
    cx.set_title("Saddle: λ and I_retain over training", fontsize=9)
    cx.grid(alpha=0.3)
    if cx.get_legend_handles_labels()[0]:
        cx.legend(fontsize=8)
    r0 = reports[0]
    fig.suptitle(f"digits world, forget the {r0.get('forget_digit', 3)}, seed {r0.get('seed', 0)}: same data and "
                 "step budget for every run", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all; ignored with --run)")
    p.add_argument("--run", action="append", default=[], metavar="LABEL=METHOD,KEY=VALUE,...",
                   help="a run with its own settings, e.g. saddle-kp1=saddle,saddle.kappa_p=1 (repeatable)")
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=None, help="default: the trainer's (eval.every, eval.early_every)")
    p.add_argument("--seeds", default="0", help="comma-separated seeds")
    p.add_argument("--forget-digits", default="3", help="comma-separated digits")
    p.add_argument("--out", default="outputs/compare", help="runs, table.md and curves.png go here")
    p.add_argument("--replot", action="store_true", help="redraw table.md and curves.png from --out/reports.json")
    p.add_argument("--attack", action="store_true", help="also attack every unlearned pipeline with Concept Inversion "
                                                           "(docs/attacks.md) and report forget accuracy under attack")
    p.add_argument("--attack-steps", type=int, default=1000)
    p.add_argument("extra", nargs="*", help="extra train.py arguments after --, e.g. -- --set lr=1e-4")
    args = p.parse_args()
    runs = [parse_run(r) for r in args.run] or [(m.strip(), m.strip(), []) for m in args.methods.split(",") if m.strip()]
    unknown = sorted({m for _, m, _ in runs} - set(METHODS))
    if unknown:
        sys.exit(f"compare: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    digits = [int(x) for x in args.forget_digits.split(",")]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports = json.loads((out / "reports.json").read_text()) if args.replot else []
    for digit in [] if args.replot else digits:
        for seed in seeds:
            for lbl, method, sets in runs:
                print(f"compare: running {lbl} (digit {digit}, seed {seed}) ...", flush=True)
                reports.append(run_method(lbl, method, sets, digit, seed, args))
                (out / "reports.json").write_text(json.dumps(reports, indent=2))  # a cut-off sweep keeps its runs
    md = table(reports) + "\n\nPer retained digit (final evaluation): I_retain / retain accuracy\n\n" + table_by_digit(reports)
    (out / "table.md").write_text(md + "\n")
    (out / "reports.json").write_text(json.dumps(reports, indent=2))
    groups = list(dict.fromkeys((r.get("forget_digit"), r.get("seed")) for r in reports))
    for i, (d, sd) in enumerate(groups):
        name = "curves.png" if i == 0 else f"curves-d{d}-s{sd}.png"
        plot([r for r in reports if (r.get("forget_digit"), r.get("seed")) == (d, sd)], out / name)
    print(md)
    print(f"wrote {out / 'table.md'} and {len(groups)} figure(s) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
