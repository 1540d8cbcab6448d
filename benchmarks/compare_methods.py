#!/usr/bin/env python
"""Every method on the digits world with the same seed, data and step budget.

    python benchmarks/compare_methods.py                       # all methods, 400 steps (~28 min, 2 cores)
    python benchmarks/compare_methods.py --methods saddle,ovw --max-steps 200

Each method runs `fastunlearn/train.py` in its own process; the table (Markdown) and a plot of
I_retain against forget_accuracy over training (one line per method) go to --out.
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


def run_method(method: str, args) -> dict:
    out = Path(args.out) / method
    cmd = [sys.executable, str(ROOT / "fastunlearn" / "train.py"), "--method", method, "--max-steps",
           str(args.max_steps), "--seed", str(args.seed), "--forget-digit", str(args.forget_digit),
           "--output-dir", str(out), "--overwrite", "--set", f"eval.every={args.eval_every}", *args.extra]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"compare: {method} failed:\n{proc.stderr[-3000:]}")
    report = json.loads((out / "report.json").read_text())
    report["process_wall_s"] = round(time.time() - t0, 1)
    return report


def at_step(report: dict, step) -> float | None:
    """I_retain of the first in-training evaluation at or after `step` (None if training ended first)."""
    if step is None:
        return None
    return next((h.get("integrity_retain") for h in report["history"] if h["step"] >= step and not h.get("final")), None)


def table(reports: list[dict]) -> str:
    lines = ["| method | forget acc | retain acc (base) | I_retain ± 95 % | I_forget | FID (fid-digits, retain) | steps_to_converge | "
             "I_retain at convergence | I_retain at 3× convergence | wall time (s) |", "|---" * 10 + "|"]
    for r in reports:
        at_conv = at_step(r, r["steps_to_converge"])
        at_3x = at_step(r, 3 * r["steps_to_converge"]) if r["steps_to_converge"] is not None else None
        lines.append(
            f"| {r['method']} | {fmt(r['forget_accuracy'], 2)} | {fmt(r['retain_accuracy'], 3)} "
            f"({fmt(r['base_retain_accuracy'], 3)}) | {fmt(r['integrity_retain'])} ± {fmt(r['integrity_retain_ci95'])} | "
            f"{fmt(r['integrity_forget'])} | {fmt(r.get('fid_retain'), 2)} | {r['steps_to_converge'] if r['steps_to_converge'] is not None else '—'} | "
            f"{fmt(at_conv)} | {fmt(at_3x)} | {r['wall_time_s']:.0f} |")
    return "\n".join(lines)


def plot(reports: list[dict], path: Path) -> None:
    """Left: I_retain against forget accuracy over training (one line per method, arrow to the end).
    Right: I_retain against the training step. Log scale: GA's I_retain is ~50x Saddle's."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.8))
    for r in reports:
        hist = [h for h in r["history"] if not h.get("final")]
        if not hist:
            continue
        xs, ys, steps = ([h[k] for h in hist] for k in ("forget_accuracy", "integrity_retain", "step"))
        (line,) = ax.plot(xs, ys, marker="o", ms=3, lw=1.2, label=r["method"])
        ax.annotate("", xy=(xs[-1], ys[-1]), xytext=(xs[-2], ys[-2]) if len(xs) > 1 else (xs[-1], ys[-1]),
                    arrowprops=dict(arrowstyle="->", color=line.get_color()))
        bx.plot(steps, ys, marker="o", ms=3, lw=1.2, color=line.get_color(), label=r["method"])
        if r.get("steps_to_converge"):
            bx.axvline(r["steps_to_converge"], color=line.get_color(), lw=0.6, ls=":")
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
    fig.suptitle("digits world, forget the 3, same seed, data and step budget for every method", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=",".join(METHODS), help="comma-separated (default: all)")
    p.add_argument("--max-steps", type=int, default=400)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--forget-digit", type=int, default=3)
    p.add_argument("--out", default="outputs/compare", help="runs, table.md and curves.png go here")
    p.add_argument("--replot", action="store_true", help="redraw table.md and curves.png from --out/reports.json")
    p.add_argument("extra", nargs="*", help="extra train.py arguments after --, e.g. -- --set lr=1e-4")
    args = p.parse_args()
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        sys.exit(f"compare: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports = []
    if args.replot:
        reports = json.loads((out / "reports.json").read_text())
    for m in [] if args.replot else methods:
        print(f"compare: running {m} ...", flush=True)
        reports.append(run_method(m, args))
    md = table(reports)
    (out / "table.md").write_text(md + "\n")
    (out / "reports.json").write_text(json.dumps(reports, indent=2))
    plot(reports, out / "curves.png")
    print(md)
    print(f"wrote {out / 'table.md'} and {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
