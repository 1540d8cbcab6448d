"""compare_methods.py --attack: three recovery attacks on every unlearned pipeline, and the robustness table.

The attacks (fastunlearn.attack, docs/attacks.md), none of them the inner attack that `--robust` trains against
(docs/methods.md, "Robust unlearning"; the inner one starts its pool at the concept word and at "the"):

* inversion  Concept Inversion at the attack command's defaults: 1,000 steps, seed 0, <c*> starts as "a";
* search     the discrete prefix search (2 words, gradient-guided), its best of 3 prefixes;
* retained   Concept Inversion started from a RETAINED concept's word instead: the next digit (4 for the 3), or
             the next colour / the other stroke in the styles world.

Each is judged on 100 samples by the world's judge (the concept rate, which is the forget accuracy). Each attack's
report, grid and embedding stay in the run folder (`attack/`, `attack-retained/`), and --reuse reads them back.
"""
from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

from fastunlearn.card import wilson

FOLDERS = {"attack": {"attack": "all"}, "attack-retained": {"attack": "inversion"}}


def retained_word(task: tuple[str, object]) -> str:
    """The word the `retained` attack starts from: the next digit, or the next colour / the other stroke."""
    kind, value = task
    if kind == "digit":
        return str((int(value) + 1) % 10)
    from fastunlearn.worlds.styles import COLOUR_NAMES, STROKE_NAMES, parse_style

    colour, stroke = parse_style(str(value))
    if colour is not None:
        return COLOUR_NAMES[(colour + 1) % len(COLOUR_NAMES)]
    return STROKE_NAMES[(stroke + 1) % len(STROKE_NAMES)]


def attack(run_dir: Path, task: tuple[str, object], world: str, steps: int, reuse: bool) -> dict:
    """The three attacks on the pipeline in `run_dir` (reports reused from its attack folders with `reuse`)."""
    from fastunlearn.attack import run_attack

    reports = {}
    for folder, opts in FOLDERS.items():
        out = Path(run_dir) / folder
        if reuse and (out / "report.json").is_file():
            reports[folder] = json.loads((out / "report.json").read_text())
            continue
        shutil.rmtree(out, ignore_errors=True)
        extra = {"init_word": retained_word(task)} if folder == "attack-retained" else {}
        print(f"compare: attacking {run_dir} ({folder}) ...", flush=True)
        reports[folder] = run_attack(world, str(run_dir), str(task[1]), out_dir=out, steps=steps, budgets=(steps,),
                                     controls=False, progress=False, **opts, **extra)
    a, r = reports["attack"], reports["attack-retained"]
    under = a["concept_rate_under_attack"]
    return {"forget_accuracy": under[f"inversion@{steps}"], "search": under.get("search"),
            "retained": r["concept_rate_under_attack"][f"inversion@{steps}"],
            "retained_init_word": r["config"]["init_word"], "search_prefix": a["search"]["unlearned"]["best"][0]["prefix"],
            "no_attack": a["no_attack"]["unlearned"]["concept_rate"], "samples": a["config"]["eval_samples"],
            "steps": steps, "wall_time_s": a["inversion"]["unlearned"]["wall_time_s"],
            "search_wall_time_s": a["search"]["unlearned"]["wall_time_s"],
            "retained_wall_time_s": r["inversion"]["unlearned"]["wall_time_s"]}


def _share(ps, n) -> str:
    """The pooled share of len(ps) evaluations of n samples each, with its Wilson 95 % interval."""
    ps = [p for p in ps if p is not None]
    if not ps:
        return "—"
    p = sum(ps) / len(ps)
    lo, hi = wilson(p, n * len(ps))
    return f"{p:.2f} [{lo:.2f}, {hi:.2f}]"


def _mean_ci(values, halves) -> str:
    """The mean of independent estimates with ± 1.96 SE, the SEs from each estimate's own 95 % half-width."""
    if not values:
        return "—"
    m = sum(values) / len(values)
    h = math.sqrt(sum((x or 0.0) ** 2 for x in halves)) / len(values)
    return f"{m:.3f} ± {h:.3f}"


def robust_table(reports: list[dict], label, task_of) -> str:
    """One row per run label, pooled over its tasks and seeds: forget accuracy without attack and under each attack
    (Wilson 95 % over all judged samples), I_retain (mean ± 95 %), and for `X-robust` the training wall time as a
    multiple of `X`'s on the same task and seed."""
    lines = ["| run | runs (tasks × seeds) | forget acc | under inversion @1000 | under prefix search | "
             "under inversion from a retained word | I_retain ± 95 % | wall time × the run without --robust |",
             "|---" * 8 + "|"]
    for name in dict.fromkeys(label(r) for r in reports):
        rs = [r for r in reports if label(r) == name]
        n_eval = rs[0]["eval"]["forget_samples"] if rs[0].get("eval") else 100
        acc = [r.get("forget_accuracy") for r in rs]
        att = [r["attack"] for r in rs if r.get("attack")]
        n_att = att[0].get("samples", 100) if att else 100
        ratios = []
        if name.endswith("-robust"):
            for r in rs:
                base = next((o for o in reports if label(o) == name[:-len("-robust")] and task_of(o) == task_of(r)
                             and o.get("seed") == r.get("seed")), None)
                if base is not None:
                    ratios.append(r["wall_time_s"] / base["wall_time_s"])
        ratio = "—" if not ratios else (f"{sum(ratios) / len(ratios):.2f} ({min(ratios):.2f}–{max(ratios):.2f})"
                                        if len(ratios) > 1 else f"{ratios[0]:.2f}")
        tasks = sorted({task_of(r) for r in rs})
        lines.append(
            f"| {name} | {len(rs)} ({','.join(tasks)} × {len({r.get('seed') for r in rs})}) | {_share(acc, n_eval)} | "
            f"{_share([a['forget_accuracy'] for a in att], n_att)} | {_share([a.get('search') for a in att], n_att)} | "
            f"{_share([a.get('retained') for a in att], n_att)} | "
            f"{_mean_ci([r['integrity_retain'] for r in rs], [r.get('integrity_retain_ci95') for r in rs])} | {ratio} |")
    return "\n".join(lines)


def attack_cells(r: dict) -> str:
    """The per-run table's attack cells: inversion / search / from a retained word, and the attacks' wall time."""
    a = r.get("attack")
    if not a:
        return "— | — |"
    f = lambda x: "—" if x is None else f"{x:.2f}"  # noqa: E731
    wall = sum(a.get(k) or 0 for k in ("wall_time_s", "search_wall_time_s", "retained_wall_time_s"))
    return f"{f(a['forget_accuracy'])} / {f(a.get('search'))} / {f(a.get('retained'))} | {wall:.0f} |"
