"""Robust unlearning (--robust, fastunlearn/robust.py, docs/methods.md "Robust unlearning"): the adversarial rows in
every method's forget term against the formulas, the pool's encoding against the pipeline's own, the inner attack
improving its objective, the pool's strength, the curves, checkpoint/resume equality, every method on tiny SD and
SDXL (LoRA and ZeRO-2 too), and the one-line errors."""
import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import test_methods_formula as F
import torch

from fastunlearn import methods as M
from fastunlearn.config import TRAINED_METHODS
from fastunlearn.testing import SMALL

ROOT = Path(__file__).resolve().parents[1]
TRAIN = str(ROOT / "fastunlearn" / "train.py")
ADV = (6, 7)  # the fake UNet's ids 6 and 7 stand in for adversarial prompts (any conditioning of their own)


# ---- the forget term with adversarial copies, against the formulas (fake UNet, milliseconds) --------------------
def adversarial(st, n=2):
    """`st` with adversarial copies of its first n forget rows, and (x, t, ids) of the forget term's rows."""
    st.n_adv, st.adv_ids = n, torch.tensor([ADV[0], ADV[1]] * n)[:n]
    return (torch.cat([st.x_f, st.x_f[:n]]), torch.cat([st.t_f, st.t_f[:n]]), torch.cat([st.c_f, st.adv_ids]))


def wide(y, n=2):
    return torch.cat([y, y[:n]])


@pytest.mark.parametrize("method", ["ovw", "saddle", "esd", "ga", "ca", "salun"])
def test_forget_term_covers_the_adversarial_copies_with_the_plain_rows_targets(method):
    """G over the forget rows and their adversarial copies (same x_t, t; the copy conditioned on its adversarial
    prompt), each copy with its plain row's target: the ESD target uses the teacher on the PLAIN c_f. R, the teacher
    call and the number of calls are unchanged."""
    m, cfg, st, s, te, sc, tc = F.run(method)
    x, t, c = adversarial(st)
    if method == "saddle":
        m.lam, m.tau = 0.7, 0.05
    loss, _ = m.loss(st)
    S_f = F.S(s, x, t, c)
    G = F.msq(S_f, wide(F.y_f(st, te, "esd", cfg.forget_eta)))
    expected = {
        "ovw": lambda: F.R(st, s, te) + cfg.ovw.alpha * G,
        "saddle": lambda: F.R(st, s, te) + 0.7 * (G - 0.05),
        "esd": lambda: G,
        "ga": lambda: F.R(st, s, te) - cfg.ga.beta * F.msq(S_f, wide(st.eps_f)),
        "ca": lambda: F.msq(S_f, wide(F.S(s, st.x_f, st.t_f, st.a_f).detach())) + F.R(st, s, te),
        "salun": lambda: F.msq(S_f, wide(F.S(s, st.x_f, st.t_f, st.alt_r).detach())) + cfg.salun.alpha * F.R(st, s, te),
    }[method]()
    F.check(loss, expected, s)
    assert tc.calls == 1 and sc.calls == (2 if method in ("ca", "salun") else 1)


def test_erasediff_inner_and_outer_forget_terms_cover_the_adversarial_copies():
    """EraseDiff's f and f̂ both run over the extended rows: f̂ is that of a plain step whose forget rows are the
    extended ones (it depends on nothing else), and the loss is R (plain rows) + λ_b (f − f̂) over the extended rows."""
    m, cfg, st, s, te, sc, tc = F.run("erasediff")

    def call(items, params=None, grad=True):
        return F.Caller(s, params)(*items, grad=grad)

    m.setup(M.Context(module=s, make_step=None, call=call, teacher=tc, all_reduce=None, all_reduce_sum_=None))
    x, t, c = adversarial(st)
    plain = M.Step(x_f=x, x_r=st.x_r, t_f=t, t_r=st.t_r, c_f=c, c_r=st.c_r, a_f=wide(st.a_f), alt_r=wide(st.alt_r),
                   eps_f=wide(st.eps_f), eps_r=st.eps_r, fresh_f=wide(st.fresh_f), student=sc, teacher=tc)
    loss, logs = m.loss(st)
    loss_plain, logs_plain = m.loss(plain)
    torch.testing.assert_close(logs["f_hat"], logs_plain["f_hat"])
    for got, step, f_hat in ((loss, st, logs_plain["f_hat"]), (loss_plain, plain, logs["f_hat"])):
        f = F.msq(F.S(s, x, t, c), wide(st.fresh_f))
        F.check(got, F.R(step, s, te) + cfg.erasediff.lambda_b * (f - f_hat), s)


# ---- on a tiny pipeline -----------------------------------------------------------------------------------------
@pytest.fixture()
def argv(tiny_sd_path, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "forget.txt").write_text("a photo of cat\na painting of cat in the style\n")
    (tmp_path / "retain.txt").write_text("a photo of dog\na photo of car\n")
    return ["--forget-prompts", str(tmp_path / "forget.txt"), "--retain-prompts", str(tmp_path / "retain.txt"),
            *SMALL, "--robust", "--robust-concept", "cat", "--output-dir", str(tmp_path / "out")]


def trainer(model, argv, *more):
    from fastunlearn.train import Trainer, config_from_args

    return Trainer(config_from_args(["--model", str(model), *argv, *more]))


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sdxl_path"])
def test_the_pool_encodes_prompts_exactly_as_the_pipeline(fixture, request, argv):
    """An entry that holds the concept word's own embedding gives the adversarial prompt exactly the conditioning
    the pipeline gives the plain prompt (hidden states; SDXL's pooled projection too); an entry started from the
    init word differs. Tokenizers and text encoders are left as they were."""
    t = trainer(request.getfixturevalue(fixture), argv)
    try:
        pool, cond = t.robust, t.cond
        vocab = len(t.pipe.tokenizer)
        assert pool.K == 4 and pool.P == 2 and cond.hidden.shape[0] == pool.base + pool.K * pool.P
        for p, prompt in enumerate(t.forget):
            plain = cond.index[prompt]
            for k in range(pool.K):
                row = pool.base + k * pool.P + p
                same = torch.allclose(cond.hidden[row], cond.hidden[plain], atol=1e-6, rtol=1e-5)
                assert same == (k % 2 == 0), (k, prompt)
                if cond.sdxl:
                    assert torch.allclose(cond.pooled[row], cond.pooled[plain], atol=1e-6, rtol=1e-5) == (k % 2 == 0)
        assert len(t.pipe.tokenizer) == vocab and not t.pipe.text_encoder.get_input_embeddings()._forward_hooks
    finally:
        t.folder.release()


def test_the_inner_attack_lowers_its_own_objective(tiny_sd_path, argv):
    """A refresh (AdamW on the pool against the current student) lowers the Concept Inversion loss on a fixed
    batch of forget latents it never saw, for every entry; it moves only the pool and the adversarial rows."""
    t = trainer(tiny_sd_path, argv, "--set", "robust.steps=15", "--set", "robust.lr=0.02", "--set", "robust.batch=16")
    try:
        pool, b = t.robust, t.batches
        g = torch.Generator().manual_seed(123)
        i = torch.randint(0, len(b.lat_f), (64,), generator=g)
        x0, noise = b.lat_f[i], torch.randn(b.lat_f[i].shape, generator=g)
        steps = torch.randint(0, 1000, (64,), generator=g)

        def loss():  # per pool entry
            return [float(pool.inner_loss(x0, noise, steps, b.ids_f[i], torch.full((64,), k), grad=False))
                    for k in range(pool.K)]

        weights = {k: v.clone() for k, v in t.engine.module.state_dict().items()}
        plain = t.cond.hidden[:pool.base].clone()
        before = loss()
        t.folder.prepare()
        pool.refresh(t.cfg.robust.every)
        after = loss()
        assert all(x < y for x, y in zip(after, before)), (before, after)
        assert len(pool.trace) == 1 and pool.trace[0][0] == t.cfg.robust.every and pool.trace[0][2] is None
        assert all(torch.equal(v, weights[k]) for k, v in t.engine.module.state_dict().items())
        assert torch.equal(t.cond.hidden[:pool.base], plain)
        pool.refresh(t.cfg.robust.every + 1)  # not due: nothing happens
        assert len(pool.trace) == 1
    finally:
        t.folder.release()


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sdxl_path"])
def test_pool_strength_samples_the_student_under_the_adversarial_prompts(fixture, request, argv):
    """The share of samples under the pool's prompts the judge reads as the concept, through the evaluation's
    own Evaluator.shows_concept; the first `strength_samples` forget pairs that name the concept."""
    from fastunlearn.evaluation import Evaluator
    from fastunlearn.sampling import SamplerConfig

    class Judge:  # a classifier that reads label 1 in images whose mean is above the median
        seen = []

        def predict(self, x):
            self.seen.append(x.shape)
            m = x.mean(dim=(1, 2, 3))
            return (m >= m.median()).long()

    t = trainer(request.getfixturevalue(fixture), argv, "--set", "robust.strength_samples=3")
    try:
        prompts = ["a photo of dog", "a photo of cat", "a painting of cat in the style", "a photo of cat"]
        t.robust._evaluator = Evaluator(None, (prompts, [0, 1, 2, 3]), ([], []), SamplerConfig(2, 4.0),
                                        classifier=Judge(), forget_label=1)
        share = t.robust.strength()
        assert share == pytest.approx(2 / 3) and Judge.seen[-1][0] == 3  # the dog prompt names no cat: left out
    finally:
        t.folder.release()


def run(argv):
    from fastunlearn.train import main

    return main(argv)


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sdxl_path"])
@pytest.mark.parametrize("method", TRAINED_METHODS)  # uce, rece: tests/test_uce.py
def test_every_method_trains_with_robust(method, fixture, request, argv, tmp_path):
    model = request.getfixturevalue(fixture)
    run(["--model", str(model), "--method", method, *argv, "--max-steps", "2", "--set", "robust.every=1",
         "--set", "robust.steps=1", "--set", "robust.batch=2"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["steps"] == 2 and [r[0] for r in report["robust"]["trace"]] == [1, 2]
    assert report["robust"]["concept"] == ["cat"] and report["robust"]["adversarial_rows_per_step"] == 1


def test_robust_with_lora_zero2_bf16_and_gradient_checkpointing(tiny_sd_path, argv, tmp_path):
    run(["--model", str(tiny_sd_path), "--method", "ovw", *argv, "--max-steps", "2", "--lora-rank", "4",
         "--zero-stage", "2", "--set", "mixed_precision=bf16", "--set", "gradient_checkpointing=true",
         "--set", "robust.every=1", "--set", "robust.steps=2", "--set", "robust.batch=2"])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["zero_stage"] == 2 and report["lora"]["rank"] == 4 and len(report["robust"]["trace"]) == 2


def test_robust_off_changes_nothing(tiny_sd_path, argv, tmp_path):
    """Without --robust no step carries adversarial rows, the Conditioner holds only the prompts, and the report has
    no robust section."""
    plain = [a for a in argv if a not in ("--robust", "--robust-concept", "cat")]
    t = trainer(tiny_sd_path, plain)
    try:
        assert t.cond.hidden.shape[0] == len(t.cond.prompts) and t.robust.report() == {}
        assert t.make_step(0, 0).n_adv == 0 and t.robust.state_dict() is None
    finally:
        t.folder.release()
    t = trainer(tiny_sd_path, argv)
    try:
        st = t.make_step(5, 0)
        assert st.n_adv == 1 and int(st.adv_ids[0]) >= t.robust.base and t.make_step(-1, 0).n_adv == 0
    finally:
        t.folder.release()


def test_curves_go_to_train_log_tqdm_and_the_tracker(tiny_sd_path, argv, tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fastunlearn.robust import AdversarialPool

    monkeypatch.setattr(AdversarialPool, "strength", lambda self: 0.25)  # the tiny fixture has no judge
    run(["--model", str(tiny_sd_path), *argv, "--max-steps", "4", "--report-to", "tensorboard",
         "--set", "robust.every=2", "--set", "robust.steps=1"])
    out = tmp_path / "out"
    log = (out / "train.log").read_text()
    assert "robust step 2 inner_loss=" in log and "robust step 4 inner_loss=" in log and "pool_strength=0.25" in log
    acc = EventAccumulator(str(out / "logs"))
    acc.Reload()
    assert {"robust/inner_loss", "robust/pool_strength"} <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("robust/inner_loss")] == [2, 4]
    report = json.loads((out / "report.json").read_text())
    assert report["robust"]["final_pool_strength"] == 0.25


# ---- resume, and the errors (subprocesses, as a user runs them) -------------------------------------------------
def train(args, tmp_path, fault=None):
    from test_reliability import env

    extra = {"FASTUNLEARN_FAULT": fault} if fault else {}
    return subprocess.run([sys.executable, TRAIN, *args], capture_output=True, text=True, env=env(tmp_path, **extra),
                          timeout=300)


def test_the_pool_is_checkpointed_and_a_resumed_run_equals_the_uninterrupted_one(tiny_sd_path, argv, tmp_path):
    from test_reliability import assert_same_weights

    args = argv[:-2] + [  # without its --output-dir
        "--model", str(tiny_sd_path), "--max-steps", "6", "--set", "checkpoint_every=2", "--set", "robust.every=2",
        "--set", "robust.steps=2", "--set", "robust.batch=4"]
    ref = train([*args, "--output-dir", str(tmp_path / "ref")], tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert "adv=" in ref.stderr  # the tqdm postfix
    out = tmp_path / "out"
    assert train([*args, "--output-dir", str(out)], tmp_path, fault="kill:5").returncode == -signal.SIGKILL
    state = torch.load(next((out / "checkpoints" / "step-4").glob("*model_states.pt")), weights_only=False)
    assert [r[0] for r in state["robust"]["trace"]] == [2, 4] and len(state["robust"]["pool"]) == 1
    resumed = train([*args, "--output-dir", str(out)], tmp_path)
    assert resumed.returncode == 0 and "step 4 of 6" in resumed.stderr, resumed.stderr[-3000:]
    assert_same_weights(tmp_path / "ref", out, atol=0)
    a, b = (json.loads((d / "report.json").read_text())["robust"] for d in (tmp_path / "ref", out))
    assert a == b and [r[0] for r in a["trace"]] == [2, 4, 6]


@pytest.mark.parametrize("case", ["absent-word", "no-word", "zero3"])
def test_one_line_errors(case, tiny_sd_path, argv, tmp_path):
    base = [a for a in argv if a not in ("--robust-concept", "cat")]
    more = {"absent-word": ["--robust-concept", "dog"], "no-word": [],
            "zero3": ["--robust-concept", "cat", "--zero-stage", "3", "--method", "ovw"]}[case]
    expect = {"absent-word": "robust.concept 'dog' is not in the forget prompt 'a photo of cat'",
              "no-word": "--robust needs the concept word of the forget prompts",
              "zero3": "--robust runs with ZeRO stages 0-2, not 3"}[case]
    proc = train(["--model", str(tiny_sd_path), *base, *more], tmp_path)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("fastunlearn:")]
    assert proc.returncode == 2 and len(lines) == 1 and expect in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
