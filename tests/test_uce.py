"""The closed-form methods, UCE and RECE (docs/methods.md): the formulas against direct least-squares solves, the
edit of a tiny SD 1.x and SDXL pipeline (preserved rows kept, forget rows moved to their target), several concepts
in one solve, the runs through train.py with their report, grid and exports, and the one-line errors."""
import json

import pytest
import torch

from fastunlearn import closed_form as cf
from fastunlearn.errors import FastUnlearnError
from fastunlearn.testing import tiny_clip

DT = torch.float64


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=DT)


# ---- the formulas ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("s_e,s_p,lamb", [(1.0, 1.0, 0.5), (2.0, 0.1, 0.05), (0.7, 0.0, 3.0)])
def test_uce_is_the_least_squares_solution(s_e, s_p, lamb):
    """W' = W K minimises s_e Σ‖W'c_i − W c*_i‖² + s_p Σ‖W'c_j − W c_j‖² + λ‖W' − W‖²_F: the same W' as
    torch.linalg.lstsq on the stacked system, and as UCE's own (λW + Σ v* cᵀ + ...)(λI + Σ c cᵀ + ...)⁻¹."""
    d, d_out = 12, 7
    W, C, V, P = rand(d_out, d, seed=1), rand(5, d, seed=2), rand(5, d, seed=3), rand(9, d, seed=4)
    got = cf.uce_edit(W, C, V, P, s_e, s_p, lamb)
    X = torch.cat([s_e ** 0.5 * C, s_p ** 0.5 * P, lamb ** 0.5 * torch.eye(d, dtype=DT)])
    Y = torch.cat([s_e ** 0.5 * V @ W.T, s_p ** 0.5 * P @ W.T, lamb ** 0.5 * W.T])
    want = torch.linalg.lstsq(X, Y).solution.T
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    mat1 = lamb * W + s_e * (W @ V.T) @ C + s_p * (W @ P.T) @ P
    mat2 = lamb * torch.eye(d, dtype=DT) + s_e * C.T @ C + s_p * P.T @ P
    torch.testing.assert_close(got, mat1 @ torch.inverse(mat2), rtol=1e-9, atol=1e-10)
    # the gradient of the objective vanishes there
    Wp = got.clone().requires_grad_(True)
    loss = (s_e * (C @ Wp.T - V @ W.T).pow(2).sum() + s_p * (P @ Wp.T - P @ W.T).pow(2).sum()
            + lamb * (Wp - W).pow(2).sum())
    (grad,) = torch.autograd.grad(loss, Wp)
    assert grad.abs().max() < 1e-9


def test_uce_with_few_rows_and_a_small_lambda_interpolates():
    d = 16
    W, C, V, P = rand(6, d, seed=5), rand(3, d, seed=6), rand(3, d, seed=7), rand(4, d, seed=8)
    Wn = cf.uce_edit(W, C, V, P, lamb=1e-8)
    torch.testing.assert_close(C @ Wn.T, V @ W.T, rtol=1e-5, atol=1e-5)   # the erased rows give their targets'
    torch.testing.assert_close(P @ Wn.T, P @ W.T, rtol=1e-5, atol=1e-5)   # the preserved rows are kept
    with pytest.raises(ValueError, match="lamb must be > 0"):
        cf.uce_map(C, V, P, lamb=0)


def test_adversarial_embedding_is_the_ridge_solution_over_every_projection():
    """e = argmin Σ_l ‖W_l K e − W_l c‖² + ρ‖e‖², against lstsq on the stacked projections."""
    d, rho = 10, 0.3
    Ws = [rand(n, d, seed=10 + n) for n in (4, 7, 5)]
    K, C = torch.eye(d, dtype=DT) + 0.3 * rand(d, d, seed=20), rand(3, d, seed=21)
    got = cf.adversarial(cf.gram(Ws), K, C, rho)
    X = torch.cat([W @ K for W in Ws] + [rho ** 0.5 * torch.eye(d, dtype=DT)])
    for c, e in zip(C, got):
        y = torch.cat([W @ c for W in Ws] + [torch.zeros(d, dtype=DT)])
        torch.testing.assert_close(e, torch.linalg.lstsq(X, y[:, None]).solution[:, 0], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(cf.gram(Ws), sum(W.T @ W for W in Ws))
    assert cf.energy(cf.gram(Ws), C) == pytest.approx(sum(float((C @ W.T).pow(2).sum()) for W in Ws))


# ---- on a tiny pipeline ---------------------------------------------------------------------------------------
def solve_on(path, forget, anchors, retain, method="uce", sets=()):
    """A loaded pipeline, its original projections, and the method after `solve` (without train.py)."""
    from diffusers import DiffusionPipeline

    from fastunlearn.config import TrainConfig, set_dotted
    from fastunlearn.methods import make_method
    from fastunlearn.uce import encode, projections

    cfg = TrainConfig()
    cfg.method = method
    for kv in sets:
        set_dotted(cfg, *kv.split("="))
    cfg.validate()
    pipe = DiffusionPipeline.from_pretrained(path)
    before = {n: m.weight.detach().clone() for n, m in projections(pipe.unet).items()}
    method = make_method(cfg)
    names = method.bind(pipe, forget, anchors, retain)
    assert sorted(names) == sorted(f"{n}.weight" for n in before) and all(".attn2.to_" in n for n in names)
    method.solve()
    return pipe, before, method, lambda prompts: encode(pipe, prompts)


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sdxl_path"])
def test_preserved_rows_kept_and_forget_rows_moved_to_the_target(fixture, request):
    """tokens=last with a small λ: few rows, so the least squares fits them; every edited projection gives the
    forget prompts' last-token keys and values of their target, and the preserved prompts' (retain and "") their
    own, while nothing else in the UNet changes."""
    from fastunlearn.uce import projections

    forget, retain = ["a photo of cat", "a painting of cat"], ["a photo of dog", "a photo of car"]
    anchors = ["", "a photo of tree"]
    pipe, before, method, enc = solve_on(request.getfixturevalue(fixture), forget, anchors, retain,
                                         sets=["uce.tokens=last", "uce.lamb=1e-6"])
    hidden, last = enc(forget + anchors + retain + [""])
    rows = hidden[torch.arange(len(last)), last]  # the last token of each prompt
    f, a, r = rows[:2], rows[2:4], rows[4:]
    mods = projections(pipe.unet)
    assert len(mods) == (8 if "sdxl" not in fixture else 16)
    for name, m in mods.items():
        W0, W1 = before[name].double(), m.weight.double()
        assert not torch.allclose(W0, W1)
        torch.testing.assert_close(f @ W1.T, a @ W0.T, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(r @ W1.T, r @ W0.T, rtol=1e-4, atol=1e-4)
    assert method.facts["forget_residual"] < 1e-6 and method.facts["preserve_residual"] < 1e-6
    from diffusers import DiffusionPipeline

    original = DiffusionPipeline.from_pretrained(request.getfixturevalue(fixture)).unet.state_dict()
    changed = {k for k, v in pipe.unet.state_dict().items() if not torch.equal(v, original[k])}
    assert changed == {f"{n}.weight" for n in mods}


def test_tail_rows_are_the_last_token_through_the_padding_aligned_with_the_target():
    from fastunlearn.uce import erase_rows, preserve_rows

    L, D = 6, 2
    hidden = torch.arange(3 * L * D, dtype=DT).reshape(3, L, D)
    last = torch.tensor([3, 1, 0])  # prompt 0: 3 words; prompt 1: one word; prompt 2: ""
    C, V = erase_rows(hidden, last, [(0, 2), (1, 0)], "tail")
    # prompt 0 from position 3 (its last word) to the end, against "" from BOS on: 3 rows
    # prompt 1 from position 1, against prompt 0 from position 3: L - 3 = 3 rows
    torch.testing.assert_close(C, torch.cat([hidden[0, 3:6], hidden[1, 1:4]]))
    torch.testing.assert_close(V, torch.cat([hidden[2, 0:3], hidden[0, 3:6]]))
    C, V = erase_rows(hidden, last, [(0, 2)], "last")
    assert torch.equal(C, hidden[0, 3:4]) and torch.equal(V, hidden[2, 0:1])
    assert torch.equal(preserve_rows(hidden, last, [1, 2], "tail"), hidden[1:].reshape(-1, D))
    assert torch.equal(preserve_rows(hidden, last, [1, 2], "last"), hidden[[1, 2], [1, 0]])


def test_several_concepts_in_one_solve_and_the_default_rows(tiny_sdxl_path, tmp_path):
    """Two concepts, each to its own anchor, in one solve with the default rows (tail): each concept's keys and values
    move well towards its target's (64 preserved rows in a 64-wide space: a compromise, not an exact fit) while the
    preserved rows barely change; the preserve list adds rows."""
    from fastunlearn.uce import erase_rows, projections

    (tmp_path / "keep.txt").write_text("a photo of tree\nthe house\n")
    forget, anchors, retain = ["a photo of cat", "a photo of fish"], ["a photo of dog", ""], ["a photo of car"]
    pipe, before, method, enc = solve_on(tiny_sdxl_path, forget, anchors, retain,
                                         sets=[f"uce.preserve_prompts={tmp_path / 'keep.txt'}"])
    assert method.preserve == ["", "a photo of car", "a photo of tree", "the house"]
    assert method.facts["preserve_scale"] == 0.25 and method.facts["preserved_rows"] == 4 * 16
    hidden, last = enc(forget + anchors)
    mods = projections(pipe.unet)
    for k in range(2):  # each concept on its own: Σ_l ‖W'_l c − W_l c*‖² against Σ_l ‖W_l c − W_l c*‖²
        C, V = erase_rows(hidden, last, [(k, 2 + k)], "tail")
        moved = sum(float((C @ m.weight.detach().double().T - V @ before[n].double().T).pow(2).sum()) for n, m in mods.items())
        was = sum(float(((C - V) @ before[n].double().T).pow(2).sum()) for n in mods)
        assert moved < 0.5 * was, (k, moved / was)  # 0.34 and 0.28 here (1: unmoved)
    assert method.facts["forget_residual"] < 0.5 and method.facts["preserve_residual"] < 0.05


def test_rece_rounds_close_the_gap_its_adversarial_embeddings_open(tiny_sd_path):
    """Each round's adversarial rows bring the concept's keys and values back (a small gap) on the model before the
    round, and are erased by it (a larger gap after); rounds=0 is UCE exactly."""
    forget, anchors, retain = ["a photo of cat"], [""], ["a photo of dog"]
    _, _, rece, _ = solve_on(tiny_sd_path, forget, anchors, retain, "rece", ["rece.rounds=2"])
    assert [t["round"] for t in rece.trace] == [1, 2]
    for t in rece.trace:
        assert t["adversarial_gap_after"] > t["adversarial_gap"] * 1.5, t
    uce_pipe, _, _, _ = solve_on(tiny_sd_path, forget, anchors, retain, "uce")
    rece0_pipe, _, rece0, _ = solve_on(tiny_sd_path, forget, anchors, retain, "rece", ["rece.rounds=0"])
    assert rece0.trace == []
    a, b = uce_pipe.unet.state_dict(), rece0_pipe.unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


# ---- through train.py -----------------------------------------------------------------------------------------
def train(argv):
    from fastunlearn.train import main

    return main(argv)


@pytest.mark.parametrize("method,fixture", [("uce", "tiny_sd_path"), ("rece", "tiny_sdxl_path")])
def test_runs_through_train_py(method, fixture, request, base_args, tmp_path, monkeypatch):
    """No training steps, the solve's seconds in the report, the final evaluation, grid, card and pipeline; with a
    judge whose threshold every run meets, seconds_to_converge is the solve's."""
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    args = list(base_args)
    args[args.index("--model") + 1] = str(request.getfixturevalue(fixture))
    out = tmp_path / "out"
    clip = tiny_clip(tmp_path / "clip")
    assert train([*args, "--method", method, "--output-dir", str(out), "--set", f"eval.clip_model={clip}",
                  "--set", "eval.forget_threshold=1.0", "--set", "eval.every=1"]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["steps"] == 0 and report["solve_seconds"] > 0
    assert [h["step"] for h in report["history"]] == [0] and report["history"][0]["final"]
    assert report["steps_to_converge"] == 0 and report["seconds_to_converge"] == pytest.approx(report["solve_seconds"], abs=1e-3)
    assert report["uce"]["edited_projections"] > 0 and (method == "uce") == ("rece" not in report)
    assert report["teacher"] == "shared" and 0 <= report["forget_rate"] <= 1
    for name in ("grid.png", "README.md", "train.log", "model_index.json"):
        assert (out / name).is_file(), name
    card = (out / "README.md").read_text()
    assert "closed-form edit solved in" in card and "every cross-attention to_k and to_v" in card and "lr:" not in card
    assert "solved in" in (out / "train.log").read_text() and not (out / "checkpoints").exists()
    edited = DiffusionPipeline.from_pretrained(out).unet.state_dict()
    original = DiffusionPipeline.from_pretrained(args[args.index("--model") + 1]).unet.state_dict()
    changed = {k for k in edited if not torch.equal(edited[k], original[k])}
    assert changed and all(".attn2.to_k." in k or ".attn2.to_v." in k for k in changed)


def test_trained_and_unet_exports_load_onto_the_base(base_args, tmp_path, monkeypatch):
    """--save-format trained writes only the edited projections; both small exports apply to the original."""
    from diffusers import DiffusionPipeline
    from safetensors import safe_open

    import fastunlearn

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    model = base_args[1]
    for fmt in ("trained", "unet"):
        train([*base_args, "--method", "uce", "--output-dir", str(tmp_path / fmt), "--save-format", fmt])
    with safe_open(str(tmp_path / "trained" / "unlearned.safetensors"), framework="pt") as f:
        names, meta = set(f.keys()), f.metadata()
    base = DiffusionPipeline.from_pretrained(model).unet
    kv = {f"{n}.weight" for n, _ in base.named_modules() if ".attn2.to_" in n and n.endswith(("to_k", "to_v"))}
    assert names == kv and meta["method"] == "uce" and meta["steps"] == "0"
    a = fastunlearn.load_unlearned(DiffusionPipeline.from_pretrained(model), tmp_path / "trained").unet.state_dict()
    b = fastunlearn.load_unlearned(DiffusionPipeline.from_pretrained(model), tmp_path / "unet").unet.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a) and any(not torch.equal(a[k], base.state_dict()[k]) for k in kv)


def test_two_concepts_through_train_py(base_args, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cat.txt").write_text("a photo of cat\na painting of cat\n")
    (tmp_path / "fish.txt").write_text("a photo of fish\n")
    args = list(base_args)
    i = args.index("--forget-prompts")
    del args[i:i + 2]
    out = tmp_path / "out"
    train([*args, "--forget-prompts", str(tmp_path / "cat.txt"), "--forget-prompts", str(tmp_path / "fish.txt"),
           "--method", "uce", "--output-dir", str(out)])
    report = json.loads((out / "report.json").read_text())
    assert set(report["forget_concepts"]) == {"cat", "fish"} and report["steps"] == 0
    assert report["uce"]["erased_rows"] == (16 - 4) * 2 + (16 - 4)  # tail rows: last word (position 4) to 15


@pytest.mark.parametrize("sets,expect", [
    (["--set", "uce.erase_scale=-1"], "uce.erase_scale must be >= 0"),
    (["--set", "uce.preserve_scale=-0.5"], "uce.preserve_scale must be a number >= 0"),
    (["--set", "uce.lamb=0"], "uce.lamb must be > 0"),
    (["--set", "uce.tokens=all"], "uce.tokens must be tail or last"),
    (["--set", "uce.preserve_prompts=nowhere.txt"], "uce.preserve_prompts file nowhere.txt does not exist"),
    (["--set", "rece.rounds=-1"], "rece.rounds must be >= 0"),
    (["--set", "rece.regular_scale=0"], "rece.regular_scale must be > 0"),
    (["--robust", "--robust-concept", "cat"], "--robust does not apply"),
    (["--lora-rank", "4"], "--lora-rank does not apply"),
    (["--params", "attn2"], "--params attn2 does not apply"),
])
def test_bad_settings_are_one_line_errors(sets, expect, base_args):
    from fastunlearn.train import config_from_args

    with pytest.raises(FastUnlearnError, match=expect) as info:
        config_from_args([*base_args, "--method", "rece", *sets])
    assert "\n" not in str(info.value)


def test_empty_anchor_list_and_a_preserved_forget_prompt_are_one_line_errors(base_args, tmp_path, capsys):
    (tmp_path / "empty.txt").write_text("\n")
    (tmp_path / "keep.txt").write_text("a photo of cat\n")
    cases = ((["--anchor-prompts", str(tmp_path / "empty.txt")], "anchor prompt list is empty"),
             (["--set", f"uce.preserve_prompts={tmp_path / 'keep.txt'}"], "both a forget prompt and in uce.preserve"))
    for extra, expect in cases:
        with pytest.raises(SystemExit) as info:
            train([*base_args, "--method", "uce", "--output-dir", str(tmp_path / "out"), *extra])
        err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("fastunlearn:")]
        assert info.value.code == 2 and len(err) == 1 and expect in err[0], err
        assert not (tmp_path / "out").exists()


def test_an_unfinished_run_from_before_the_uce_sections_still_resumes():
    """A key the saved config lacks (uce.*, rece.*: added since) is no difference; a changed one still is."""
    from fastunlearn.config import TrainConfig
    from fastunlearn.outputs import config_difference

    new = TrainConfig().to_dict()
    old = {k: v for k, v in new.items() if k not in ("uce", "rece")}
    assert config_difference(old, new) is None
    assert config_difference({**old, "lr": 1.0}, new) == "lr: 1.0 -> 0.0002"
    assert config_difference(new, {**new, "uce": {**new["uce"], "lamb": 2.0}}) == "uce.lamb: 0.5 -> 2.0"
    assert config_difference({**new, "gone": 1}, new) == "gone: 1 -> None"


def test_init_uce_starts_the_student_from_the_edit_and_keeps_the_teacher(base_args, tmp_path, monkeypatch):
    """--init uce: with a vanishing lr the trained student is the UCE edit (to 1e-6) while Saddle's G0, measured on
    the teacher alone, is the plain run's (the teacher stays the original); the solve is in the report."""
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    runs = {"uce": ["--method", "uce"], "init": ["--method", "saddle", "--init", "uce", "--max-steps", "1",
                                                 "--set", "lr=1e-12"],
            "plain": ["--method", "saddle", "--max-steps", "1", "--set", "lr=1e-12"]}
    for name, extra in runs.items():
        assert train([*base_args, *extra, "--output-dir", str(tmp_path / name)]) == 0
    rep = {n: json.loads((tmp_path / n / "report.json").read_text()) for n in runs}
    assert rep["init"]["init_uce"]["solve_seconds"] > 0 and "init_uce" not in rep["plain"]
    assert rep["init"]["init_uce"]["uce"]["edited_projections"] == rep["uce"]["uce"]["edited_projections"]
    assert rep["init"]["G0"] == rep["plain"]["G0"]
    a = DiffusionPipeline.from_pretrained(tmp_path / "init").unet.state_dict()
    b = DiffusionPipeline.from_pretrained(tmp_path / "uce").unet.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert json.loads((tmp_path / "init" / "config.json").read_text())["init"] == "uce"


@pytest.mark.parametrize("extra,expect", [
    (["--method", "uce"], "closed-form edit itself"),
    (["--lora-rank", "4"], "LoRA and a shared teacher"),
    (["--params", "attn2"], "set teacher: copy"),
    (["--set", "init=start"], "init must be original or uce"),
])
def test_init_uce_bad_combinations_are_one_line_errors(extra, expect, base_args):
    from fastunlearn.train import config_from_args

    with pytest.raises(FastUnlearnError, match=expect) as info:
        config_from_args([*base_args, "--init", "uce", *extra] if "init=" not in extra[-1] else [*base_args, *extra])
    assert "\n" not in str(info.value)
