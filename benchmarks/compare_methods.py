#!/usr/bin/env python
"""Every method on an embedded world with the same seed, data and step budget.

    python benchmarks/compare_methods.py                       # all methods, 400 steps (~28 min for the trained ones, 2 cores; uce, rece: their evaluation)
    python benchmarks/compare_methods.py --methods saddle,ovw --max-steps 200
    python benchmarks/compare_methods.py --run saddle-ga=saddle,saddle.dual=ga,saddle.lambda_init=1 \
        --run saddle --run ovw --seeds 0,1 --forget-digits 3,5   # variants, seeds and digits
    python benchmarks/compare_methods.py --world styles        # styles world: erase red ink, and the 3
    python benchmarks/compare_methods.py --world styles --forget-styles red,bold --forget-digits ""

Each run is `fastunlearn/train.py` in its own process; the tables (Markdown) and plots go to --out:
I_retain against forget accuracy and against the step, and Saddle's λ beside I_retain, one
figure per (task, seed). In the styles world (docs/worlds-styles.md) a task is a style (`--forget-styles`)
or a digit in every style (`--forget-digits`), and the table has unlearning accuracy and in- and cross-domain
retain accuracy with their 95 % intervals, I_retain per neighbour group, and the pairs of methods whose 95 %
intervals on a metric do not overlap. Every table has `steps_to_converge` and the seconds to converge (training
seconds, or a closed-form solve's, up to the first evaluation that met the forget criterion). With --reuse, a run
whose report.json exists is read, not rerun. Runs that started from different originals (two builds of a
world: `original_fingerprint` in report.json) are named in a paragraph under the tables.

With --attack every unlearned pipeline is also attacked three ways (benchmarks/compare_attack.py: Concept
Inversion at the attack command's defaults, the prefix search, and Concept Inversion started from a retained
word; docs/attacks.md), and a second table pools every run label over its tasks and seeds: forget accuracy
without and under each attack with 95 % intervals, I_retain, and `X-robust`'s wall time against `X`'s:

    python benchmarks/compare_methods.py --attack --run saddle --run saddle-robust=saddle,robust.enabled=true \
        --seeds 0,1 --forget-digits 3,5
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from compare_attack import attack, attack_cells, robust_table

from fastunlearn.card import wilson  # the Wilson interval of the model cards

ROOT = Path(__file__).resolve().parents[1]
METHODS = ["saddle", "ovw", "esd", "ga", "erasediff", "salun", "ca", "uce", "rece"]  # uce, rece: no steps (closed form)


def fmt(x, digits=3):
    return "—" if x is None else f"{x:.{digits}f}"


def parse_run(text: str) -> tuple[str, str, list[str]]:
    """`LABEL=METHOD,KEY=VALUE,...` or `METHOD` -> (label, method, ["--set", "KEY=VALUE", ...])."""
    label, _, rest = text.partition("=")
    if not rest:
        return label, label, []
    method, *sets = rest.split(",")
    return label, method, [a for kv in sets for a in ("--set", kv)]


def task_name(task: tuple[str, object]) -> str:
    """("digit", 3) -> "d3"; ("style", "red bold") -> "red-bold" (the run folder's middle part)."""
    kind, value = task
    return f"d{value}" if kind == "digit" else str(value).replace(" ", "-")


def task_of(r: dict) -> str:
    """The task of a report, as in the tables: "3" (a digit), or a style name."""
    return str(r["forget_style"]) if r.get("task") == "style" else str(r.get("forget_digit", "—"))


def run_method(label: str, method: str, sets: list[str], task: tuple[str, object], seed: int, args) -> dict:
    out = Path(args.out) / f"{label}-{task_name(task)}-s{seed}"
    report_file = out / "report.json"
    if args.reuse and report_file.is_file():
        report = json.loads(report_file.read_text())
        report.update(label=label, seed=seed, settings=sets[1::2])
        print(f"compare: reusing {report_file}", flush=True)
        if args.attack:
            report["attack"] = attack(out, task, args.world, args.attack_steps, reuse=True)
        return report
    kind, value = task
    cmd = [sys.executable, str(ROOT / "fastunlearn" / "train.py"), "--model", args.world, "--method", method,
           "--max-steps", str(args.max_steps), "--seed", str(seed),
           "--forget-digit" if kind == "digit" else "--forget-style", str(value),
           "--output-dir", str(out), "--overwrite", *sets, *args.extra]
    if args.eval_every is not None:
        cmd += ["--set", f"eval.every={args.eval_every}"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
    t0 = time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"compare: {label} failed:\n{proc.stderr[-3000:]}")
    report = json.loads(report_file.read_text())
    report.update(label=label, seed=seed, settings=sets[1::2], process_wall_s=round(time.time() - t0, 1))
    if args.attack:
        report["attack"] = attack(out, task, args.world, args.attack_steps, reuse=False)
    return report


def at_step(report: dict, step) -> float | None:
    """I_retain of the first in-training evaluation at or after `step` (None if training ended first)."""
    if step is None:
        return None
    return next((h.get("integrity_retain") for h in report["history"] if h["step"] >= step and not h.get("final")), None)


def label(r: dict) -> str:
    return r.get("label", r["method"])


def same_run_of(reports: list[dict], r: dict, name: str) -> dict | None:
    """The run labelled `name` with r's task and seed."""
    return next((o for o in reports if label(o) == name and task_of(o) == task_of(r)
                 and o.get("seed") == r.get("seed")), None)


def intervals(r: dict) -> dict[str, tuple[float, float, float]]:
    """Metric -> (value, low, high) of a styles-world report: accuracies with Wilson intervals over the evaluation's
    samples, I_retain with the report's normal half-width."""
    n_forget = r["eval"]["forget_samples"]
    n_retain = r["eval"]["retain_samples"]
    out = {}
    for key, n in (("unlearning_accuracy", n_forget), ("in_domain_retain_accuracy", n_retain),
                   ("cross_domain_retain_accuracy", n_retain), ("cross_domain_forget_accuracy", n_forget)):
        if r.get(key) is not None:
            out[key] = (r[key], *wilson(r[key], n))
    if r.get("integrity_retain") is not None:
        h = r.get("integrity_retain_ci95") or 0.0
        out["integrity_retain"] = (r["integrity_retain"], r["integrity_retain"] - h, r["integrity_retain"] + h)
    return out


def separated(reports: list[dict]) -> list[str]:
    """For every task, metric and pair of runs (same seed): the pairs whose 95 % intervals do not overlap."""
    lines = []
    ivs = [intervals(r) for r in reports]
    for i, a in enumerate(reports):
        for j in range(i + 1, len(reports)):
            b = reports[j]
            if task_of(a) != task_of(b) or a.get("seed") != b.get("seed"):
                continue
            ia, ib = ivs[i], ivs[j]
            for key in ia.keys() & ib.keys():
                (va, la, ha), (vb, lb, hb) = ia[key], ib[key]
                if ha < lb or hb < la:
                    lo, hi = (a, b) if va < vb else (b, a)
                    lines.append(f"| {task_of(a)} | {a.get('seed', '—')} | {key} | {label(lo)} {fmt(min(va, vb))} < "
                                 f"{label(hi)} {fmt(max(va, vb))} |")
    return sorted(lines)


def originals_note(reports: list[dict]) -> str:
    """"" when every report started from the same original (report.json's `original_fingerprint`), else a paragraph
    naming the groups: two builds of a world are not bit-identical (torch version, thread count), and the same
    command then gives other numbers, so rows are compared only within a group. Reports that predate the
    fingerprint make a group of their own ("not recorded")."""
    groups: dict[str, list[str]] = {}
    for r in reports:
        groups.setdefault(r.get("original_fingerprint") or "", []).append(f"{label(r)} {task_of(r)}/s{r.get('seed', '—')}")
    if len(groups) < 2:
        return ""
    known = [k for k in groups if k]
    head = (f"**These rows start from {len(known)} different originals**" if len(known) > 1 else
            "**Not every row is known to start from the same original**")
    lines = [f"* `{k}`: {', '.join(v)}" if k else f"* not recorded (older reports): {', '.join(v)}"
             for k, v in groups.items()]
    return head + " (`original_fingerprint`): compare a row only with rows of its own group.\n\n" + "\n".join(lines)


def converge_seconds(r: dict) -> str:
    """Wall seconds from the first training step (or the start of a closed-form solve) to the first evaluation at
    which the forget criterion held (`seconds_to_converge`); "—" if it never held, "n/a" for a report from before
    the field existed."""
    if "seconds_to_converge" not in r:
        return "n/a"
    return fmt(r["seconds_to_converge"], 1)


def ci_cell(r: dict, key: str) -> str:
    v = intervals(r).get(key)
    return "—" if v is None else f"{fmt(v[0], 2)} [{fmt(v[1], 2)}, {fmt(v[2], 2)}]"


def table_styles(reports: list[dict]) -> str:
    """The styles world's table: UnlearnCanvas' metrics (unlearning accuracy, in-domain and cross-domain retain
    accuracy) with Wilson 95 % intervals, I_retain with its normal 95 % half-width, then per neighbour group."""
    lines = ["| run | task | seed | unlearning acc (base) | in-domain retain acc (base) | cross-domain retain acc (base) | "
             "cross-domain forget acc | I_retain ± 95 % | I_forget | FID (fid-styles, retain) | steps_to_converge | "
             "seconds to converge | wall time (s) | forget acc under attack (inversion / search / from a retained word) | "
             "attacks' wall time (s) |",
             "|---" * 15 + "|"]
    for r in reports:
        base_ua = 1 - r["base_forget_accuracy"] if r.get("base_forget_accuracy") is not None else None
        conv = r.get("steps_to_converge")
        lines.append(
            f"| {label(r)} | {task_of(r)} | {r.get('seed', '—')} | {ci_cell(r, 'unlearning_accuracy')} ({fmt(base_ua, 2)}) | "
            f"{ci_cell(r, 'in_domain_retain_accuracy')} ({fmt(r.get('base_retain_accuracy'), 2)}) | "
            f"{ci_cell(r, 'cross_domain_retain_accuracy')} ({fmt(r.get('base_cross_domain_retain_accuracy'), 2)}) | "
            f"{ci_cell(r, 'cross_domain_forget_accuracy')} | {fmt(r['integrity_retain'])} ± {fmt(r['integrity_retain_ci95'])} | "
            f"{fmt(r['integrity_forget'])} | {fmt(r.get('fid_retain'), 2)} | {conv if conv is not None else '—'} | "
            f"{converge_seconds(r)} | {r['wall_time_s']:.0f} | {attack_cells(r)}")
    return "\n".join(lines)


def table_by_group(reports: list[dict]) -> str:
    """Styles world, per task: I_retain / in-domain retain acc / cross-domain retain acc of every neighbour group."""
    blocks = []
    for task in dict.fromkeys(task_of(r) for r in reports):
        rs = [r for r in reports if task_of(r) == task]
        key = "style" if rs[0].get("task") == "style" else "digit"
        groups = list(rs[0].get(f"integrity_retain_by_{key}") or {})
        lines = [f"Task {task}: per neighbour {key}, I_retain / in-domain retain acc / cross-domain retain acc\n",
                 "| run | seed | " + " | ".join(groups) + " |", "|---" * (2 + len(groups)) + "|"]
        for r in rs:
            i, a, c = (r.get(f"{m}_by_{key}") or {} for m in ("integrity_retain", "retain_accuracy", "cross_domain_retain_accuracy"))
            cells = [f"{fmt(i.get(g))} / {fmt(a.get(g), 2)} / {fmt(c.get(g), 2)}" for g in groups]
            lines.append(f"| {label(r)} | {r.get('seed', '—')} | " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def table(reports: list[dict]) -> str:
    lines = ["| run | digit | seed | forget acc (seen / unseen phrasings) | retain acc (base) | I_retain ± 95 % | "
             "I_forget | FID (fid-digits, retain) | steps_to_converge | constraint_met_step | peak λ | "
             "I_retain at constraint_met_step (OVW there) | I_retain at convergence | I_retain at 3× convergence | "
             "seconds to converge | wall time (s) | forget acc under attack (inversion / search / from a retained word) | "
             "attacks' wall time (s) |",
             "|---" * 18 + "|"]
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
            f"{fmt(r.get('peak_lambda'), 2)} | {at_cms} | {fmt(at_step(r, conv))} | {fmt(at_3x)} | {converge_seconds(r)} | "
            f"{r['wall_time_s']:.0f} | "
            f"{attack_cells(r)}")
    return "\n".join(lines)


def table_by_digit(reports: list[dict]) -> str:
    """Final I_retain and retain accuracy of every retained digit (confusable digits stay visible)."""
    lines = ["| run | digit | seed | " + " | ".join(f"{d}: I_retain / acc" for d in range(10)) + " |", "|---" * 13 + "|"]
    for r in reports:
        by_i, by_a = r.get("integrity_retain_by_digit") or {}, r.get("retain_accuracy_by_digit") or {}
        cells = [f"{fmt(by_i.get(str(d)))} / {fmt(by_a.get(str(d)), 2)}" if str(d) in by_i else "—" for d in range(10)]
        lines.append(f"| {label(r)} | {r.get('forget_digit', '—')} | {r.get('seed', '—')} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(reports: list[dict], path: Path, world: str = "digits") -> None:
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
        a_.set_ylabel(f"I_retain (lpips-{world}, in-training set; lower = integrity kept)")
        a_.legend(fontsize=8)
        a_.grid(alpha=0.3, which="both")
    ax.set_xlabel("forget accuracy (share of forget samples judged as the concept; lower = forgotten)")
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
    what = f"the {task_of(r0)}" if r0.get("task") != "style" else f"{task_of(r0)} (every digit)"
    if world == "styles" and r0.get("task") != "style":
        what += " (every style)"
    fig.suptitle(f"{world} world, forget {what}, seed {r0.get('seed', 0)}: same data and step budget for every run",
                 fontsize=10)
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
    p.add_argument("--world", choices=("digits", "styles"), default="digits", help="the embedded world (default digits)")
    p.add_argument("--forget-digits", default=None,
                   help="comma-separated digits (default 3; in the styles world a digit in every style, \"\" for none)")
    p.add_argument("--forget-styles", default=None,
                   help="styles world: comma-separated styles to erase in every digit (default red; \"\" for none)")
    p.add_argument("--out", default=None, help="runs, table.md and curves.png go here (default outputs/compare[-styles])")
    p.add_argument("--replot", action="store_true", help="redraw table.md and curves.png from --out/reports.json")
    p.add_argument("--reuse", action="store_true", help="read a run whose report.json exists in --out instead of rerunning it")
    p.add_argument("--attack", action="store_true", help="also attack every unlearned pipeline (inversion, prefix search, "
                   "inversion from a retained word; benchmarks/compare_attack.py) and report forget accuracy under attack")
    p.add_argument("--attack-steps", type=int, default=1000)
    p.add_argument("extra", nargs="*", help="extra train.py arguments after --, e.g. -- --set lr=1e-4")
    args = p.parse_args()
    styles = args.world == "styles"
    if args.forget_styles is not None and not styles:
        sys.exit("compare: --forget-styles needs --world styles")
    args.out = args.out or ("outputs/compare-styles" if styles else "outputs/compare")
    runs = [parse_run(r) for r in args.run] or [(m.strip(), m.strip(), []) for m in args.methods.split(",") if m.strip()]
    unknown = sorted({m for _, m, _ in runs} - set(METHODS))
    if unknown:
        sys.exit(f"compare: unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHODS)}")
    seeds = [int(x) for x in args.seeds.split(",")]
    try:
        digits = [int(x) for x in (args.forget_digits if args.forget_digits is not None else "3").split(",") if x.strip()]
    except ValueError:
        sys.exit(f"compare: --forget-digits must be comma-separated digits, got {args.forget_digits!r}")
    tasks = [("digit", d) for d in digits]
    if styles:
        from fastunlearn.errors import FastUnlearnError
        from fastunlearn.worlds.styles import parse_style, style_name

        names = (args.forget_styles if args.forget_styles is not None else "red").split(",")
        try:
            tasks = [("style", style_name(*parse_style(x.strip()))) for x in names if x.strip()] + tasks
        except FastUnlearnError as e:
            sys.exit(f"compare: {e}")
    if not tasks:
        sys.exit("compare: nothing to forget (no --forget-digits and no --forget-styles)")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reports = json.loads((out / "reports.json").read_text()) if args.replot else []
    for task in [] if args.replot else tasks:
        for seed in seeds:
            for lbl, method, sets in runs:
                print(f"compare: running {lbl} ({task[0]} {task[1]}, seed {seed}) ...", flush=True)
                reports.append(run_method(lbl, method, sets, task, seed, args))
                (out / "reports.json").write_text(json.dumps(reports, indent=2))  # a cut-off sweep keeps its runs
    styles = styles or any(r.get("task") for r in reports)
    if styles:
        sep = separated(reports)
        md = (table_styles(reports) + "\n\n" + table_by_group(reports) +
              "\n\nPairs of runs (same task and seed) whose 95 % intervals do not overlap:\n\n| task | seed | metric | runs |\n"
              "|---|---|---|---|\n" + ("\n".join(sep) if sep else "| — | — | — | none |"))
    else:
        md = table(reports) + "\n\nPer retained digit (final evaluation): I_retain / retain accuracy\n\n" + table_by_digit(reports)
    if any(r.get("attack") for r in reports):
        md += ("\n\nUnder attack, per run label over its tasks and seeds (forget accuracy: Wilson 95 % over every judged "
               "sample; I_retain: mean ± 1.96 SE):\n\n" + robust_table(reports, label, task_of))
    mixed = originals_note(reports)
    if mixed:
        md += "\n\n" + mixed
        print("compare: warning: the runs start from different originals (see the end of table.md)", file=sys.stderr)
    (out / "table.md").write_text(md + "\n")
    (out / "reports.json").write_text(json.dumps(reports, indent=2))
    groups = list(dict.fromkeys((task_of(r), r.get("seed")) for r in reports))
    for i, (t, sd) in enumerate(groups):
        name = "curves.png" if i == 0 else f"curves-{'d' + t if t.isdigit() else t.replace(' ', '-')}-s{sd}.png"
        plot([r for r in reports if (task_of(r), r.get("seed")) == (t, sd)], out / name, "styles" if styles else "digits")
    print(md)
    print(f"wrote {out / 'table.md'} and {len(groups)} figure(s) in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
