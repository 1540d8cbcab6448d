"""benchmarks/compare_methods.py's tables and interval logic, and the comparison grid's rows, on made-up reports
(the runs themselves are benchmarks, not tests)."""
import importlib.util
import math
import random
import types
from pathlib import Path

import pytest
import torch

from fastunlearn.evaluate import comparison_rows, save_comparison_grid

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compare():
    import sys

    sys.path.insert(0, str(ROOT / "benchmarks"))  # as when run as a script: compare_attack sits beside it
    spec = importlib.util.spec_from_file_location("compare_methods", ROOT / "benchmarks" / "compare_methods.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def styles_report(label, task, ua, ira, cra, i_retain, rng):
    groups = ["green thin", "blue bold"] if task == "style" else ["0", "1"]
    key = "style" if task == "style" else "digit"
    r = {"label": label, "method": label, "seed": 0, "task": task, "eval": {"forget_samples": 100, "retain_samples": 120},
         "unlearning_accuracy": ua, "forget_accuracy": 1 - ua, "in_domain_retain_accuracy": ira, "retain_accuracy": ira,
         "cross_domain_retain_accuracy": cra, "cross_domain_forget_accuracy": 0.9,
         "integrity_retain": i_retain, "integrity_retain_ci95": 0.02, "integrity_forget": rng.random(),
         "base_forget_accuracy": 1.0, "base_retain_accuracy": 1.0, "base_cross_domain_retain_accuracy": 0.96,
         "fid_retain": 3.0, "steps_to_converge": None, "wall_time_s": 100.0, "history": [],
         f"integrity_retain_by_{key}": {g: rng.random() for g in groups},
         f"retain_accuracy_by_{key}": {g: 1.0 for g in groups},
         f"cross_domain_retain_accuracy_by_{key}": {g: 0.9 for g in groups}}
    r.update({"forget_style": "red"} if task == "style" else {"forget_digit": 3})
    return r


def test_wilson_interval_contains_the_share_and_is_not_degenerate(compare):
    for p, n in ((0.0, 100), (1.0, 100), (0.37, 120), (0.5, 7)):
        lo, hi = compare.wilson(p, n)
        assert 0.0 <= lo <= p <= hi <= 1.0 and hi - lo > 0
    lo, hi = compare.wilson(0.5, 100)
    assert abs((hi - lo) / 2 - 0.0961) < 0.002  # ≈ 1.96·√(0.25/100) at p = 0.5
    assert compare.wilson(None, 10) is None


def test_styles_tables_and_separated_pairs(compare, tmp_path):
    rng = random.Random(0)
    reports = [styles_report("saddle", "style", 0.95, 1.0, 0.90, 0.20, rng),
               styles_report("ga", "style", 0.97, 0.99, 0.30, 0.60, rng),
               styles_report("ovw", "style", 0.93, 1.0, 0.88, 0.21, rng),
               styles_report("saddle", "digit", 0.98, 0.93, 1.0, 0.25, rng)]
    md = compare.table_styles(reports)
    assert md.count("\n") == len(reports) + 1 and "| ga | red | 0 |" in md and "| saddle | 3 | 0 |" in md
    groups = compare.table_by_group(reports)
    assert "Task red: per neighbour style" in groups and "Task 3: per neighbour digit" in groups
    sep = compare.separated(reports)
    # GA's cross-domain retain accuracy (0.30 of 120) and I_retain are apart from Saddle's and OVW's; the
    # digit task is never compared with the style task; Saddle and OVW overlap everywhere
    assert "| red | 0 | cross_domain_retain_accuracy | ga 0.300 < saddle 0.900 |" in sep
    assert "| red | 0 | integrity_retain | ovw 0.210 < ga 0.600 |" in sep
    assert not [s for s in sep if "saddle" in s and "ovw" in s] and not [s for s in sep if s.startswith("| 3 |")]
    assert compare.task_name(("style", "red bold")) == "red-bold" and compare.task_name(("digit", 3)) == "d3"
    reports[0]["seconds_to_converge"], reports[1]["seconds_to_converge"] = 12.34, None
    md = compare.table_styles(reports)  # seconds to converge: a number, never met (—), or a report from before it (n/a)
    assert "| 12.3 | 100 |" in md and "| — | 100 |" in md and "| n/a | 100 |" in md
    compare.plot(reports[:3], tmp_path / "curves.png", "styles")  # no history: an empty figure, no error
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_robust_table_pools_each_label_and_pairs_robust_runs_with_their_plain_twins(compare):
    import compare_attack

    rng = random.Random(1)
    reports = []
    for seed in (0, 1):
        for name, wall, under in (("saddle", 200.0, 0.5), ("saddle-robust", 300.0, 0.1)):
            r = styles_report(name, "digit", 1.0, 1.0, 1.0, 0.03, rng)
            r.update(seed=seed, forget_accuracy=0.0, wall_time_s=wall + seed,
                     attack={"forget_accuracy": under, "search": 0.02, "retained": under / 2, "samples": 100,
                             "wall_time_s": 50.0, "search_wall_time_s": 20.0, "retained_wall_time_s": 40.0})
            reports.append(r)
    md = compare_attack.robust_table(reports, compare.label, compare.task_of)
    rows = {line.split(" | ")[0][2:]: line for line in md.splitlines()[2:]}
    assert set(rows) == {"saddle", "saddle-robust"}
    lo, hi = compare.wilson(0.1, 200)  # two runs of 100 judged samples each, pooled
    assert f"0.10 [{lo:.2f}, {hi:.2f}]" in rows["saddle-robust"] and "| 2 (3 × 2) |" in rows["saddle"]
    assert "1.50 (1.50–1.50)" in rows["saddle-robust"] and rows["saddle"].endswith("| — |")
    assert f"0.030 ± {math.sqrt(2 * 0.02 ** 2) / 2:.3f}" in rows["saddle"]
    assert compare_attack.attack_cells(reports[1]) == "0.10 / 0.02 / 0.05 | 110 |"
    assert compare_attack.attack_cells({}) == "— | — |"
    assert compare_attack.retained_word(("digit", 3)) == "4" and compare_attack.retained_word(("digit", 9)) == "0"
    assert compare_attack.retained_word(("style", "red")) != "red"


def test_attack_reads_back_the_reports_kept_in_the_run_folder(compare, tmp_path):
    import json

    import compare_attack

    def rep(under, init, search=None):
        r = {"concept_rate_under_attack": {"inversion@1000": under}, "config": {"init_word": init, "eval_samples": 100},
             "no_attack": {"unlearned": {"concept_rate": 0.01}}, "inversion": {"unlearned": {"wall_time_s": 55.0}}}
        if search is not None:
            r["concept_rate_under_attack"]["search"] = search
            r["search"] = {"unlearned": {"best": [{"prefix": "six of"}], "wall_time_s": 30.0}}
        return r

    for folder, r in (("attack", rep(0.15, "a", 0.04)), ("attack-retained", rep(0.2, "4"))):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "report.json").write_text(json.dumps(r))
    a = compare_attack.attack(tmp_path, ("digit", 3), "digits", 1000, reuse=True)  # nothing is attacked again
    assert (a["forget_accuracy"], a["search"], a["retained"], a["retained_init_word"]) == (0.15, 0.04, 0.2, "4")
    assert a["search_prefix"] == "six of" and a["wall_time_s"] + a["search_wall_time_s"] + a["retained_wall_time_s"] == 140


def test_grid_rows_group_samples_when_every_prompt_has_one_sample(tmp_path):
    """The styles world spreads its samples over many prompts: a row is then a retain group (a style), not a prompt."""
    styles = ["green thin", "green bold", "blue thin", "blue bold", "yellow thin", "yellow bold"]
    ev = types.SimpleNamespace(
        forget=([f"digit {i} in red ink" for i in range(20)], None), retain=([f"r{i}" for i in range(60)], None),
        retain_groups=[s for s in styles for _ in range(10)], forget_groups=None, group_key="style")
    imgs = {"forget": torch.rand(20, 3, 9, 9), "retain": torch.rand(60, 3, 9, 9)}
    rows = comparison_rows(ev, imgs, imgs, 8)
    assert [label for label, _, _ in rows] == ["forget: 8 prompts, first: digit 0 in red ink", "retain: style green thin",
                                               "retain: style blue thin", "retain: style yellow thin"]
    assert all(len(t) == len(s) == 8 for _, t, s in rows)
    assert torch.equal(rows[2][1], imgs["retain"][20:28])
    save_comparison_grid(tmp_path / "grid.png", rows, "title")
    # a prompt with several seeds (the digits world) keeps one row per prompt
    ev.forget, ev.retain = (["a 3"] * 8, None), (["a 1"] * 4 + ["a 2"] * 4, None)
    rows = comparison_rows(ev, {"forget": imgs["forget"][:8], "retain": imgs["retain"][:8]},
                           {"forget": imgs["forget"][:8], "retain": imgs["retain"][:8]}, 4)
    assert [label for label, _, _ in rows] == ["forget: a 3", "retain: a 1", "retain: a 2"]


def test_rows_from_different_originals_are_named_apart(compare):
    def r(lbl, fp, seed):
        out = {"label": lbl, "method": lbl, "forget_digit": 5, "seed": seed}
        if fp is not None:
            out["original_fingerprint"] = fp
        return out

    same = [r("saddle", "aaaa", 0), r("saddle-robust", "aaaa", 0)]
    assert compare.originals_note(same) == ""
    assert compare.originals_note([r("saddle", None, 0), r("ovw", None, 1)]) == ""  # all predate it: nothing to say
    note = compare.originals_note(same + [r("saddle", "bbbb", 1), r("ovw", None, 0)])
    assert note.startswith("**These rows start from 2 different originals**")
    assert "* `aaaa`: saddle 5/s0, saddle-robust 5/s0" in note and "* `bbbb`: saddle 5/s1" in note
    assert "* not recorded (older reports): ovw 5/s0" in note
    assert compare.originals_note(same + [r("ovw", None, 0)]).startswith("**Not every row is known to start from")
