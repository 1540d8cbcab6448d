"""Saddle with neighbour groups (issue 26): the vectorised multiplier, the group objectives against their formulas
(docs/methods.md, "Saddle with neighbour groups"), where groups come from, their errors, checkpoint/resume, and the
default `saddle.retain: mean` left exactly as it was. Fake UNets (test_methods_formula) and the tiny SD fixture."""
from __future__ import annotations

import json
import math
import random
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import test_methods_formula as F
import torch

from fastunlearn import methods as M
from fastunlearn.dual import PIDual, PIDualVec
from fastunlearn.errors import FastUnlearnError
from fastunlearn.groups import GroupIndex, read_retain_groups, resolve_groups
from fastunlearn.testing import SMALL

TRAIN = str(Path(__file__).resolve().parents[1] / "fastunlearn" / "train.py")


# ---- the vectorised PI controller --------------------------------------------------------------------------------
def test_pidualvec_against_a_hand_computed_sequence():
    # two groups: scale D = (2, 4), level ρ = (0.4, 0.2), start R(θ0) = (0, 0); κ_p 0.5, κ_i 0.1, ν 0.5, max 1
    d = PIDualVec([2.0, 4.0], [0.4, 0.2], [0.0, 0.0], kappa_p=0.5, kappa_i=0.1, nu=0.5, lambda_init=0.0,
                  lambda_max=1.0)
    assert d.xi == pytest.approx([-0.2, -0.05]) and d.lam == [0.0, 0.0]   # clip(0 + 0.5·ξ_{-1}) = 0
    # x = (1.4, 0.2): e = (0.5, 0); ξ = (0.15, -0.025); I = (0.05, 0); μ = (0.05 + 0.075, clip(-0.0125)) = (0.125, 0)
    assert d.update([1.4, 0.2]) == pytest.approx([0.125, 0.0])
    # x = (4.4, 0.0): e = (2, -0.05); ξ = (1.075, -0.0375); I = (0.25, clip(-0.005) = 0); μ = (0.7875, 0)
    assert d.update([4.4, 0.0]) == pytest.approx([0.7875, 0.0]) and d.integral == pytest.approx([0.25, 0.0])
    # x = (10.4, 4.2): e = (5, 1); ξ = (3.0375, 0.48125); I = (0.75, 0.1); μ = (clip(2.26875) = 1, 0.340625)
    assert d.update([10.4, 4.2]) == pytest.approx([1.0, 0.340625])
    assert d.parts()["lam_I"] == pytest.approx([0.75, 0.1])


def test_pidualvec_of_one_is_pidual_bit_for_bit():
    rng = random.Random(3)
    gs = [rng.uniform(0, 3) for _ in range(400)]
    a = PIDual(1.7, 0.34, 0.5, 0.01, 0.9, 0.0, 10.0)
    b = PIDualVec([1.7], [0.34], [1.7], 0.5, 0.01, 0.9, 0.0, 10.0)
    assert b.lam == [a.lam]
    assert [[a.update(g)] for g in gs] == [b.update([g]) for g in gs]   # ==: the same floats, not approximately


# ---- the objectives on fake UNets --------------------------------------------------------------------------------
OF_ID = torch.tensor([-1, -1, -1, 0, 0, 1, -1, -1])   # retain prompt ids 3, 4 -> group "a", 5 -> group "b"


def setup_groups(retain="constraints", retain_target="teacher", accumulation=1, **saddle):
    s, te, sc, tc = F.models()
    args = dict(dual="pi", tau=0.3, g0_batches=2, probe_every=0, retain=retain, retain_weight=0.2, rho=0.05,
                mu_kappa_p=0.7, mu_kappa_i=0.1, dro_eta=2.0, group_ema=0.8) | saddle
    cfg = types.SimpleNamespace(method="saddle", forget_target="esd", forget_eta=0.8, retain_target=retain_target,
                                gradient_accumulation_steps=accumulation, retain_batch_size=4,
                                saddle=M.SaddleConfig(**args))
    method = M.make_method(cfg)
    steps, make = F.step_maker(sc, tc)
    sums = []
    ctx = M.Context(module=s, make_step=make, call=None, teacher=tc, all_reduce=lambda v, op: v,
                    all_reduce_sum_=sums.append, retain_groups=GroupIndex(["a", "b"], OF_ID))
    method.setup(ctx)
    return method, cfg, steps, sums, s, te, sc, tc


def per_row(u, v):
    return (u - v).pow(2).flatten(1).mean(1)


def group_means(st, s, te, retain_target="teacher"):
    """R_g over the micro-batch's rows of each group (None: no rows), from the docs' formula."""
    y = st.eps_r if retain_target == "noise" else F.T(te, st.x_r, st.t_r, st.c_r)
    per, g = per_row(F.S(s, st.x_r, st.t_r, st.c_r), y), OF_ID[st.c_r]
    return [per[g == k].mean() if (g == k).any() else None for k in range(2)]


def test_reference_and_bounds_are_measured_on_the_teacher():
    """D_g = ‖ε_θ0(x, c_r) − ε_θ0(x, ∅)‖² over the group's rows of the reference batches (steps -1000, -1001, …, at
    least g0_batches, until every group has retain_batch_size rows); R_g(θ0) = 0 against the teacher;
    ρ_g = R_g(θ0) + rho·D_g; μ starts at 0."""
    method, cfg, steps, sums, s, te, *_ = setup_groups()
    ref = sorted((k for k in steps if k <= -1000), reverse=True)
    assert ref == list(range(-1000, -1000 - len(ref), -1)) and len(ref) >= 2
    counts, d = torch.zeros(2), torch.zeros(2, dtype=torch.float64)
    for k in ref:
        st = steps[k]
        g = OF_ID[st.c_r]
        row = per_row(F.T(te, st.x_r, st.t_r, st.c_r), F.T(te, st.x_r, st.t_r, F.null(st.x_r)))
        for j in range(2):
            counts[j] += (g == j).sum()
            d[j] += row[g == j].sum()
    assert (counts >= 4).all()
    groups = method.groups
    assert groups.d == pytest.approx((d / counts).tolist(), rel=1e-5) and groups.r0 == [0.0, 0.0]
    assert groups.rho == pytest.approx([0.05 * x for x in groups.d]) and groups.values == [0.0, 0.0]
    assert len(sums) == len(ref)  # the reference sums are all-reduced over ranks
    noisy = setup_groups(retain_target="noise")[0].groups
    assert all(r > 0 for r in noisy.r0)  # against the true noise the original model has its own error


@pytest.mark.parametrize("absent", [False, True])
@pytest.mark.parametrize("retain_target", ["teacher", "noise"])
def test_constraints_objective(absent, retain_target):
    """L = κ_R·R + λ(G − τ) + Σ_{g in the micro-batch} μ_g (R_g − ρ_g), with one student and one teacher call."""
    method, cfg, steps, sums, s, te, sc, tc = setup_groups(retain_target=retain_target)
    method.lam, method.tau = 0.6, 0.02
    method.groups.dual.lam, method.groups.rho = [0.3, 0.7], [1e-3, 2e-3]
    st = F.make_step(0, sc, tc)
    # both groups, or group b without a row in this micro-batch: then it adds nothing
    st.c_r = torch.tensor([3, 4, 3, 4] if absent else [3, 5, 4, 5])
    sc.calls = tc.calls = 0
    loss, logs = method.loss(st)
    assert (sc.calls, tc.calls) == (1, 1)
    r, g = F.R(st, s, te, retain_target), F.G(st, s, te)
    means = group_means(st, s, te, retain_target)
    assert (means[1] is None) == absent
    penalty = sum(mu * (m - rho) for mu, m, rho in zip([0.3, 0.7], means, [1e-3, 2e-3]) if m is not None)
    F.check(loss, 0.2 * r + 0.6 * (g - 0.02) + penalty, s)
    assert set(logs) == {"R", "G"}


@pytest.mark.parametrize("absent", [False, True])
def test_dro_objective(absent):
    """L = Σ_{g in the micro-batch} w_g R_g / Σ_{g in the micro-batch} w_g + U + λ(G − τ), U: R's unconditional line."""
    method, cfg, steps, sums, s, te, sc, tc = setup_groups(retain="dro")
    method.lam, method.tau = 0.6, 0.02
    method.groups.w = [0.25, 0.75]
    assert method.groups.values == [0.25, 0.75]
    st = F.make_step(1, sc, tc)
    st.c_r = torch.tensor([5, 5, 5, 5] if absent else [4, 5, 3, 3])
    sc.calls = tc.calls = 0
    loss, logs = method.loss(st)
    assert (sc.calls, tc.calls) == (1, 1)
    means = group_means(st, s, te)
    present = [(w, m) for w, m in zip([0.25, 0.75], means) if m is not None]
    x, t = torch.cat([st.x_f, st.x_r]), torch.cat([st.t_f, st.t_r])
    u = F.msq(F.S(s, x, t, F.null(x)), F.T(te, x, t, F.null(x)))
    r_dro = sum(w * m for w, m in present) / sum(w for w, _ in present) + u
    F.check(loss, r_dro + 0.6 * (F.G(st, s, te) - 0.02), s)
    torch.testing.assert_close(logs["R_dro"].double(), r_dro.detach(), rtol=1e-6, atol=1e-9)


def test_after_step_pools_the_micro_batches_and_keeps_absent_groups():
    """R̄_g ← γ R̄_g + (1 − γ)·(the group's mean over all the step's rows, all micro-batches and ranks); a group with no
    row keeps R̄_g; μ = PIDualVec(D, ρ, R(θ0)).update(R̄); R_g, μ_g, R_max and mu_max go to the logs."""
    method, cfg, steps, sums, s, te, sc, tc = setup_groups(accumulation=2)
    groups = method.groups
    twin = PIDualVec(groups.d, groups.rho, groups.r0, 0.7, 0.1, cfg.saddle.nu, 0.0, cfg.saddle.mu_max)
    batches = [F.make_step(k, sc, tc) for k in range(3)]
    for st in batches:
        st.c_r = torch.tensor([3, 4, 3, 3])  # only group a
    for st in batches:  # three micro-batches for an accumulation of 2: a skipped step's is dropped with the next
        method.loss(st)
    sums.clear()
    logs = {"G": 1.0}
    method.after_step(logs, 1)
    assert len(sums) == 1  # the step's group sums are all-reduced once
    rows = torch.cat([per_row(F.S(s, st.x_r, st.t_r, st.c_r), F.T(te, st.x_r, st.t_r, st.c_r)) for st in batches[2:]])
    want_a = 0.2 * float(rows.detach().mean())
    assert groups.r_bar == pytest.approx([want_a, 0.0], rel=1e-5)
    assert groups.values == pytest.approx(twin.update([want_a, 0.0]))
    assert logs["R_g/a"] == groups.r_bar[0] and logs["mu_g/b"] == groups.values[1] == 0.0
    assert logs["R_max"] == max(groups.r_bar) and logs["mu_max"] == max(groups.values)
    assert groups.trace == [[1, [round(v, 6) for v in groups.values]]]


def test_dro_weights_follow_exponentiated_gradient():
    method, *_ = setup_groups(retain="dro")
    g = method.groups
    g.r_bar, g.r0, g.d, g.w = [0.0, 0.0], [0.0, 0.0], [2.0, 4.0], [0.5, 0.5]
    g._acc = torch.tensor([[1.0, 2.0], [1.0, 2.0]], dtype=torch.float64)  # R = 1 for both groups this step
    logs = {}
    g.after_step(logs, 3)
    r = [0.2, 0.2]  # (1 − γ)·1
    w = [0.5 * math.exp(2.0 * r[0] / 2.0), 0.5 * math.exp(2.0 * r[1] / 4.0)]
    assert g.w == pytest.approx([w[0] / sum(w), w[1] / sum(w)]) and logs["w_max"] == max(g.w)
    assert "w_g/a" in logs and "mu_g/a" not in logs


def test_a_multiplier_rises_only_while_its_constraint_is_violated():
    method, *_ = setup_groups()
    g = method.groups
    rho_a = g.rho[0]
    mus, violated = [], []
    for step in range(1, 200):
        r_a = 3 * rho_a if step <= 40 else 0.0  # group a far above its bound for 40 steps, then back under it
        g._acc = torch.tensor([[4.0, 4.0], [4 * r_a, 0.0]], dtype=torch.float64)  # group b: no drift at all
        g.after_step({}, step)
        mus.append(g.values)
        violated.append(g.r_bar[0] > g.rho[0])
    assert all(m[1] == 0.0 for m in mus)  # b's constraint always held: its μ never left 0
    rises = [t for t in range(1, len(mus)) if mus[t][0] > mus[t - 1][0]]
    assert rises and all(violated[t] for t in rises)
    assert max(m[0] for m in mus) > 0 and mus[-1][0] == 0.0  # and once it holds again, μ_a returns to 0


@pytest.mark.parametrize("retain", ["constraints", "dro"])
def test_group_state_restores_exactly(retain):
    method, *_ = setup_groups(retain=retain)
    rng = random.Random(5)
    feed = [torch.tensor([[2.0, 1.0], [rng.uniform(0, 0.01), rng.uniform(0, 0.01)]], dtype=torch.float64)
            for _ in range(20)]
    for step, acc in enumerate(feed[:10], 1):
        method.groups._acc = acc.clone()
        method.after_step({"G": 0.5}, step)
    state = json.loads(json.dumps(method.state_dict()))  # what a checkpoint holds: plain numbers
    other = setup_groups(retain=retain)[0]
    other.load_state_dict(state)
    assert other.state_dict() == state
    for who in (method, other):
        for step, acc in enumerate(feed[10:], 11):
            who.groups._acc = acc.clone()
            who.after_step({"G": 0.5}, step)
    assert other.state_dict() == method.state_dict() and other.report() == method.report()


# ---- where the groups come from ----------------------------------------------------------------------------------
def test_groups_from_lines_files_and_the_worlds(tmp_path):
    from fastunlearn import worlds
    from fastunlearn.train import config_from_args

    lines = tmp_path / "retain.txt"
    lines.write_text("dog: a photo of dog\ncar: a photo of car\ndog: a painting of dog\n")
    assert read_retain_groups(str(lines), None) == {"dog": ["a photo of dog", "a painting of dog"],
                                                    "car": ["a photo of car"]}
    (tmp_path / "dog.txt").write_text("a photo of dog\na painting of dog\n")
    (tmp_path / "car.txt").write_text("a photo of car\n")
    base = ["--model", "some/sd", "--output-dir", str(tmp_path / "out"), "--forget-prompts", "a photo of cat",
            "--set", "saddle.retain=constraints"]
    cfg = config_from_args([*base, "--retain-prompts", str(tmp_path / "dog.txt"), "--retain-prompts",
                            str(tmp_path / "car.txt")])
    assert cfg.retain_prompts is None and cfg.retain_groups == {"dog": str(tmp_path / "dog.txt"),
                                                                "car": str(tmp_path / "car.txt")}
    from fastunlearn.data import resolve_prompts

    _, retain, *_ = resolve_prompts(cfg)
    assert retain == ["a photo of dog", "a painting of dog", "a photo of car"]
    groups = resolve_groups(cfg, retain, None, None)
    assert groups.names == ["dog", "car"] and groups.prompts == [["a photo of dog", "a painting of dog"],
                                                                 ["a photo of car"]]
    index = groups.index({"": 0, "a photo of cat": 1, "a photo of dog": 2, "a painting of dog": 3, "a photo of car": 4})
    assert index.rows(torch.tensor([4, 2, 3])).tolist() == [1, 0, 0]
    cfg = config_from_args([*base, "--retain-prompts", str(lines)])
    assert resolve_prompts(cfg)[1] == ["a photo of dog", "a painting of dog", "a photo of car"]  # stripped, by group
    assert resolve_groups(cfg, resolve_prompts(cfg)[1], None, None).names == ["dog", "car"]
    cfg.saddle.retain = "mean"
    assert resolve_groups(cfg, [], None, None) is None  # the default needs none

    digits = worlds.get("digits")
    retain = ["a handwritten digit 1", "the number seven", "a drawing of the digit 1"]
    assert digits.retain_groups({"forget_digit": 3}, retain) == ["1", "7", "1"]
    assert digits.retain_groups({"forget_digit": 3}, ["a photo of dog"]) is None
    cfg = types.SimpleNamespace(method="saddle", saddle=M.SaddleConfig(retain="dro"), retain_prompts=None,
                                retain_groups=None)
    assert resolve_groups(cfg, retain, digits, {"forget_digit": 3}).names == ["1", "7"]
    styles = worlds.get("styles")
    red7, blue2 = "a handwritten digit seven in red ink, bold strokes", "the number 2 in thin blue ink"
    assert styles.retain_groups({"task": "style", "forget_style": "green"}, [red7, blue2]) == ["red bold", "blue thin"]
    assert styles.retain_groups({"task": "digit", "forget_digit": 3}, [red7, blue2]) == ["7", "2"]
    # the worlds' own retain sets: every prompt in a group, the groups of their integrity_retain_by_* reports
    _, retain, info = digits.prompts(None, None, types.SimpleNamespace(forget_digit=3))
    assert sorted(set(digits.retain_groups(info, retain))) == [str(d) for d in range(10) if d != 3]
    for info, n in (({"task": "digit", "forget_digit": 3}, 9), ({"task": "style", "forget_style": "red bold"}, 7),
                    ({"task": "style", "forget_style": "red"}, 6)):
        names = styles.retain_groups(info, styles.retain_prompts(info))
        assert names is not None and len(set(names)) == n


def test_group_errors_are_one_line(tmp_path):
    from fastunlearn.train import config_from_args

    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "dog.txt").write_text("a photo of dog\n")
    cases = [(lambda: read_retain_groups(None, {"dog": ["a photo of dog"], "car": []}), "retain group 'car' is empty"),
             (lambda: read_retain_groups(None, {"dog": str(tmp_path / "empty.txt")}), "retain group 'dog' is empty"),
             (lambda: read_retain_groups(None, {"a b": ["x"], "a_b": ["y"]}), "retain group 'a_b' is named twice"),
             (lambda: read_retain_groups(None, {"a": ["x"], "b": ["x"]}), "'x' is in two groups (a and b)"),
             (lambda: read_retain_groups("r.txt", {"a": ["x"]}), "not both"),
             (lambda: config_from_args(["--model", "some/sd", "--retain-prompts", str(tmp_path / "dog.txt"),
                                        "--retain-prompts", "a photo of car"]), "is not a file"),
             (lambda: config_from_args(["--model", "some/sd", "--set", "saddle.retain=worst"]),
              "saddle.retain must be one of mean, constraints, dro")]
    for call, match in cases:
        with pytest.raises(FastUnlearnError) as exc:
            call()
        assert match in str(exc.value) and "\n" not in str(exc.value)


def train(args, tmp_path, fault=None):
    from test_reliability import env

    extra = {"FASTUNLEARN_FAULT": fault} if fault else {}
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, env=env(tmp_path, **extra),
                          timeout=300)


@pytest.mark.parametrize("case", ["named-twice", "no-groups"])
def test_cli_errors_leave_no_output(case, tiny_sd_path, tmp_path):
    from test_reliability import one_error_line

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / "dog.txt").write_text("a photo of dog\n")
    (tmp_path / "b" / "dog.txt").write_text("a photo of car\n")
    retain = {"named-twice": ["--retain-prompts", str(tmp_path / "a" / "dog.txt"), "--retain-prompts",
                              str(tmp_path / "b" / "dog.txt")],
              "no-groups": ["--retain-prompts", str(tmp_path / "a" / "dog.txt")]}[case]
    proc = train(["--model", str(tiny_sd_path), "--forget-prompts", "a photo of cat", *retain, "--set",
                  "saddle.retain=constraints", "--output-dir", str(tmp_path / "out")], tmp_path)
    line = one_error_line(proc)
    assert proc.returncode == 2 and not (tmp_path / "out").exists()
    assert {"named-twice": "retain group 'dog' is named twice", "no-groups": "saddle.retain constraints needs "
            "neighbour groups"}[case] in line


# ---- per-world method defaults -----------------------------------------------------------------------------------
def test_world_method_defaults_lie_under_everything_the_user_sets(tmp_path, monkeypatch):
    from fastunlearn.config import TrainConfig
    from fastunlearn.train import config_from_args
    from fastunlearn.worlds.digits import World

    assert World.method_defaults == {}  # none chosen yet: a documented sweep sets them
    monkeypatch.setattr(World, "method_defaults", {"saddle": {"saddle.tau": 0.3, "lr": 1e-4, "saddle.kappa_p": 0.7}})
    out = ["--output-dir", str(tmp_path / "out")]
    cfg = config_from_args(out)  # the digits world, Saddle
    assert (cfg.saddle.tau, cfg.lr, cfg.saddle.kappa_p) == (0.3, 1e-4, 0.7)
    yaml = tmp_path / "c.yaml"
    yaml.write_text("lr: 0.001\nsaddle:\n  kappa_p: 0.5\n")
    cfg = config_from_args([*out, "--config", str(yaml), "--set", "saddle.tau=0.2"])
    assert (cfg.saddle.tau, cfg.lr, cfg.saddle.kappa_p) == (0.2, 1e-3, 0.5)  # set by the user, even to the default
    default = TrainConfig()
    cfg = config_from_args([*out, "--method", "ovw"])  # another method: not this one's defaults
    assert (cfg.saddle.tau, cfg.lr) == (default.saddle.tau, default.lr)
    cfg = config_from_args([*out, "--model", str(tmp_path)])  # not a world
    assert cfg.lr == default.lr
    monkeypatch.setattr(World, "method_defaults", {"saddle": {"saddle.taux": 1}})
    with pytest.raises(FastUnlearnError, match="method_defaults of the digits world: unknown config key 'saddle.taux'"):
        config_from_args(out)


def test_styles_world_defaults_for_a_style_task_only(tmp_path, monkeypatch):
    """The styles world's `style_method_defaults` apply over its `method_defaults` to a style task only."""
    from fastunlearn.train import config_from_args
    from fastunlearn.worlds.styles import World

    chosen = config_from_args(["--model", "styles", "--forget-style", "red"])  # the world's Saddle for a style
    assert (chosen.forget_target, chosen.saddle.tau, chosen.lr, chosen.saddle.lambda_init) == ("anchor", 0.01, 1e-4, 1.0)
    digit = config_from_args(["--model", "styles", "--forget-digit", "3"])  # a digit task: no style defaults
    assert (digit.forget_target, digit.saddle.tau, digit.lr, digit.saddle.lambda_init) == ("anchor", 0.01, 1e-4, 0.0)
    assert (chosen.forget_x0_anchor, digit.forget_x0_anchor) == (1.0, 0.0)  # anchor samples: style tasks only
    ovw = config_from_args(["--model", "styles", "--forget-style", "red", "--method", "ovw"])  # other methods: today's
    assert (ovw.forget_target, ovw.lr) == ("esd", 2e-4)
    for cfg in (chosen, digit):  # one constraint per neighbour group, beside the full mean retain loss
        assert (cfg.saddle.retain, cfg.saddle.retain_weight) == ("constraints", 1.0)
    assert (chosen.saddle.rho, digit.saddle.rho) == (0.01, 0.02)  # a tighter bound for a style task
    own = tmp_path / "forget.txt"
    own.write_text("the number 3 in thin red ink\nthe number 4 in thin red ink\n")
    mine = config_from_args(["--model", "styles", "--forget-style", "red", "--forget-prompts", str(own)])
    assert (mine.forget_target, mine.lr, mine.saddle.retain, mine.forget_x0_anchor) == ("esd", 2e-4, "mean", 0.0)
    kept = tmp_path / "retain.txt"
    kept.write_text("a photo of a cat\n")  # the user's retain prompts: the world's groups are not assumed
    theirs = config_from_args(["--model", "styles", "--forget-style", "red", "--retain-prompts", str(kept)])
    assert (theirs.forget_target, theirs.saddle.lambda_init, theirs.saddle.retain) == ("anchor", 1.0, "mean")
    assert (theirs.saddle.retain_weight, theirs.saddle.rho) == (0.1, 0.05)  # the built-in values, not the world's
    images = config_from_args(["--model", "styles", "--forget-digit", "3", "--set", f"retain_data_dir={tmp_path}"])
    assert (images.saddle.retain, images.lr) == ("mean", 1e-4)  # retain images: no groups assumed either
    monkeypatch.setattr(World, "method_defaults", {"saddle": {"saddle.tau": 0.3, "lr": 1e-4}})
    monkeypatch.setattr(World, "style_method_defaults", {"saddle": {"saddle.tau": 0.05}})
    style = config_from_args(["--model", "styles", "--forget-style", "green"])
    digit = config_from_args(["--model", "styles", "--forget-digit", "8"])
    assert (style.saddle.tau, style.lr) == (0.05, 1e-4) and (digit.saddle.tau, digit.lr) == (0.3, 1e-4)
    assert config_from_args(["--model", "styles", "--forget-style", "green", "--set", "saddle.tau=0.2"]).saddle.tau == 0.2
    assert config_from_args(["--model", "styles", "--forget-style", "green", "--method", "ovw"]).lr != 1e-4


# ---- on the tiny pipeline: the default unchanged, resume ---------------------------------------------------------
def old_setup(self, ctx):  # Saddle before issue 26, verbatim
    self.ctx = ctx
    g0 = self.forget_gap(ctx, self.args.g0_batches)
    if self.g0 is None:
        self.g0 = g0
        self.tau = self.args.tau * self.g0
    self.dual = self.make_dual()
    self.lam = self.dual.lam
    self.peak_lambda = self.lam if self.peak_lambda is None else self.peak_lambda


def old_loss(self, st):
    R, G = self.r_and_g(st)
    return R + self.lam * (G - self.tau), {"R": R, "G": G}


def old_after_step(self, logs, step):
    self.lam = self.dual.update(float(logs["G"]))
    self.peak_lambda = max(self.peak_lambda, self.lam)
    self.lambda_trace.append(round(self.lam, 6))
    logs.update(self.dual.parts(), tau=self.args.tau)
    every = self.args.probe_every
    if every and step % every == 0:
        value = self.probe()
        self.probe_trace.append([step, round(value, 6)])
        logs["probe"] = value
        if self.constraint_met_step is None and value <= self.args.tau:
            self.constraint_met_step = step
    elif not every and self.constraint_met_step is None and logs["gap"] <= self.args.tau:
        self.constraint_met_step = step


def test_the_default_mean_run_is_the_previous_saddle_bit_for_bit(base_args, tmp_path, monkeypatch):
    """saddle.retain: mean (the default) gives the loss, λ and weights of Saddle before neighbour groups."""
    from test_reliability import unet_weights

    from fastunlearn.train import main

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    args = [*base_args, "--max-steps", "3", "--set", "log_every=1", "--set", "saddle.probe_every=2"]

    def steps(out):
        return [ln.split(" ", 2)[2] for ln in (out / "train.log").read_text().splitlines() if " step " in ln
                and "eval" not in ln]

    main([*args, "--output-dir", str(tmp_path / "new")])
    for name, fn in (("setup", old_setup), ("loss", old_loss), ("after_step", old_after_step)):
        monkeypatch.setattr(M.Saddle, name, fn)
    main([*args, "--output-dir", str(tmp_path / "old")])
    new, old = steps(tmp_path / "new"), steps(tmp_path / "old")
    assert len(new) == 3 and new == old and "R_g/" not in new[0]
    a, b = unet_weights(tmp_path / "new"), unet_weights(tmp_path / "old")
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("new", "old"))
    assert ra["lambda_trace"] == rb["lambda_trace"] and "retain_loss_by_group" not in ra


def test_constraints_run_logs_checkpoints_and_resumes_exactly(tiny_sd_path, tmp_path):
    """Per-group R_g and μ_g in train.log, the progress bar and TensorBoard; the report's retain_loss_by_group and
    traces; killed at step 3 and rerun, the run equals the uninterrupted one (weights and the groups' report)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from test_reliability import assert_same_weights

    (tmp_path / "retain.txt").write_text("dog: a photo of dog\ndog: a painting of dog\ncar: a photo of car\n"
                                         "tree: a photo of tree\n")
    args = ["--model", str(tiny_sd_path), "--forget-prompts", "a photo of cat", "--retain-prompts",
            str(tmp_path / "retain.txt"), *SMALL, "--set", "retain_batch_size=4", "--set", "saddle.retain=constraints",
            "--set", "saddle.rho=0.01", "--set", "log_every=1", "--max-steps", "4", "--set", "checkpoint_every=2"]
    ref = train([*args, "--output-dir", str(tmp_path / "ref"), "--report-to", "tensorboard"], tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "R_max=" in ref.stderr and "mu_max=" in ref.stderr  # the progress bar
    log = (tmp_path / "ref" / "train.log").read_text()
    assert all(f"{k}/{g}=" in log for k in ("R_g", "mu_g") for g in ("dog", "car", "tree"))
    acc = EventAccumulator(str(tmp_path / "ref" / "logs"))
    acc.Reload()
    assert {"train/R_g/dog", "train/mu_g/tree", "train/R_max", "train/mu_max"} <= set(acc.Tags()["scalars"])
    report = json.loads((tmp_path / "ref" / "report.json").read_text())
    assert set(report["retain_loss_by_group"]) == {"dog", "car", "tree"}
    groups = report["retain_groups"]
    assert groups["mode"] == "constraints" and groups["source"] == "user"
    assert [s for s, _ in groups["multiplier_trace"]] == [1, 2, 3, 4] and set(groups["bound_by_group"]) == {
        "dog", "car", "tree"}

    out = tmp_path / "out"
    assert train([*args, "--output-dir", str(out)], tmp_path, fault="kill:3").returncode == -signal.SIGKILL
    resumed = train([*args, "--output-dir", str(out)], tmp_path)
    assert resumed.returncode == 0 and "step 2 of 4" in resumed.stderr, resumed.stderr[-3000:]
    assert_same_weights(tmp_path / "ref", out, atol=0)
    again = json.loads((out / "report.json").read_text())
    assert again["retain_groups"] == groups and again["retain_loss_by_group"] == report["retain_loss_by_group"]
    assert again["lambda_trace"] == report["lambda_trace"]
