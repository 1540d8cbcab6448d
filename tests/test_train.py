"""The unlearning engine on the tiny SD 1.x / SDXL fixtures: every method, Saddle's dual variable,
checkpoints, and the one-line errors of the command line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from fastunlearn.config import TRAINED_METHODS, TrainConfig, load_config
from fastunlearn.methods import Saddle, SaddleConfig

TRAIN = str(Path(__file__).resolve().parents[1] / "fastunlearn" / "train.py")
TINY = ["--max-steps", "3", "--set", "forget_batch_size=2", "--set", "retain_batch_size=2",
        "--set", "forget_samples_per_prompt=2", "--set", "retain_samples_per_prompt=2", "--set", "sample_steps=2",
        "--set", "eval.forget_samples=2", "--set", "eval.retain_samples_per_prompt=1",
        "--set", "eval.num_inference_steps=2", "--set", "saddle.g0_batches=1", "--set", "eval.grid_seeds=2"]


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    (d / "forget.txt").write_text("a photo of cat\na painting of cat\n")
    (d / "retain.txt").write_text("a photo of dog\na photo of car\n")
    return d


def clean_env():
    """The environment without the distributed variables an in-process run of train.py sets for itself."""
    drop = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "LOCAL_WORLD_SIZE"}
    return {k: v for k, v in os.environ.items() if k not in drop} | {"HF_HUB_OFFLINE": "1"}


def run_inprocess(argv):
    from fastunlearn.train import main

    return main(argv)


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sdxl_path"])
@pytest.mark.parametrize("method", TRAINED_METHODS)  # uce, rece: tests/test_uce.py
def test_every_method_runs_three_steps(method, fixture, request, prompt_files, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    model = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    run_inprocess(["--model", str(model), "--method", method, "--forget-prompts", str(prompt_files / "forget.txt"),
                   "--retain-prompts", str(prompt_files / "retain.txt"), "--output-dir", str(out), *TINY])
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["steps"] == 3
    for key in ("steps_to_converge", "wall_time_s", "integrity_retain", "integrity_forget",
                "integrity_retain_ci95", "integrity_forget_ci95"):
        assert key in report
    assert (out / "grid.png").is_file() and (out / "train.log").is_file()
    pipe = DiffusionPipeline.from_pretrained(out)
    assert type(pipe).__name__ == ("StableDiffusionXLPipeline" if "sdxl" in fixture else "StableDiffusionPipeline")
    original = DiffusionPipeline.from_pretrained(model)
    changed = any(not torch.equal(a, b) for a, b in zip(pipe.unet.parameters(), original.unet.parameters()))
    assert changed, "three steps did not change the UNet"


def test_v_prediction_model_trains(tmp_path, prompt_files, monkeypatch):
    from fastunlearn.testing import tiny_sd_pipeline

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    tiny_sd_pipeline(prediction_type="v_prediction").save_pretrained(tmp_path / "v")
    run_inprocess(["--model", str(tmp_path / "v"), "--method", "ga", "--forget-prompts",
                   str(prompt_files / "forget.txt"), "--retain-prompts", str(prompt_files / "retain.txt"),
                   "--output-dir", str(tmp_path / "out"), *TINY])
    assert DiffusionPipeline.from_pretrained(tmp_path / "out").scheduler.config.prediction_type == "v_prediction"


@pytest.mark.parametrize("dual", ["ga", "pi"])
def test_saddle_lambda_rises_above_tau_and_falls_below(dual):
    cfg = TrainConfig()
    cfg.saddle = SaddleConfig(dual=dual, tau=0.2, eta_lambda=0.5, lambda_init=1.0, lambda_max=10.0, gap_ema=0.5,
                              kappa_i=0.05, probe_every=0)
    m = Saddle(cfg)
    m.g0, m.tau = 1.0, 0.2
    m.dual = m.make_dual()
    m.lam = m.peak_lambda = m.dual.lam
    lams = []
    for step in range(1, 11):  # the gap stays at G0, far above tau
        m.after_step({"G": 1.0}, step)
        lams.append(m.lam)
    assert all(b > a for a, b in zip(lams, lams[1:])) and m.constraint_met_step is None
    for step in range(11, 400):  # the concept is gone: the gap drops below tau
        m.after_step({"G": 0.0}, step)
        lams.append(m.lam)
    assert m.constraint_met_step is not None and lams[-1] == 0.0 and max(lams) <= 10.0
    peak = lams.index(max(lams))
    assert all(b <= a for a, b in zip(lams[peak:], lams[peak + 1:]))
    assert m.peak_lambda == max(lams) and m.lambda_trace == [round(v, 6) for v in lams]


def test_checkpoint_restores_saddle_state_optimizer_step_and_rng(tiny_sd_path, prompt_files, tmp_path, monkeypatch):
    from fastunlearn.train import Trainer, config_from_args

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    argv = ["--model", str(tiny_sd_path), "--forget-prompts", str(prompt_files / "forget.txt"), "--retain-prompts",
            str(prompt_files / "retain.txt"), "--output-dir", str(tmp_path / "out"), *TINY,
            "--set", "checkpoint_every=2", "--max-steps", "2"]
    a = Trainer(config_from_args(argv))
    a.folder.prepare()
    a.method.setup(a.context())
    for step in range(2):
        loss, terms = a.method.loss(a.make_step(step, 0))
        a.engine.backward(loss)
        a.engine.step()
        a.step += 1
        a.method.after_step({k: float(v.detach()) for k, v in terms.items()}, a.step)
        a.save_checkpoint()  # at steps 1 and 2: only the newest is kept
    assert [p.name for p in (a.out / "checkpoints").glob("step-*")] == ["step-2"]
    rng = torch.get_rng_state()
    saved_state = a.method.state_dict()
    saved_weights = {k: v.clone() for k, v in a.engine.module.state_dict().items()}
    saved_opt = {k: v.clone() for k, v in a.engine.optimizer.state_dict()["state"][0].items() if torch.is_tensor(v)}
    torch.manual_seed(1234)  # scramble the RNG; resume must restore it
    a.folder.release()  # the output folder's lock, as at the end of a run

    b = Trainer(config_from_args(argv))
    assert b.maybe_resume()
    assert b.step == 2 and b.method.state_dict() == saved_state
    assert {"lam", "g0", "dual", "tau", "lambda_trace"} <= saved_state.keys() and len(saved_state["lambda_trace"]) == 2
    assert b.method.dual.state_dict() == saved_state["dual"]
    assert torch.equal(torch.get_rng_state(), rng)
    for k, v in b.engine.module.state_dict().items():
        assert torch.equal(v, saved_weights[k]), k
    opt = b.engine.optimizer.state_dict()["state"][0]
    for k, v in saved_opt.items():
        assert torch.equal(opt[k], v), k


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")),
                         ids=lambda p: p.name)
def test_shipped_configs_are_valid(path):
    cfg = load_config(str(path)).validate()
    if cfg.deepspeed_config:
        ds = json.loads((Path(__file__).resolve().parents[1] / cfg.deepspeed_config).read_text())
        assert ds["zero_optimization"]["stage"] == cfg.zero_stage


@pytest.mark.parametrize("case", ["unknown-method", "unknown-key", "missing-model", "empty-prompts",
                                  "same-prompt", "hub-offline", "not-diffusers", "bad-subset", "ds-batch"])
def test_bad_input_is_one_line_error_and_leaves_no_output(case, tmp_path, tiny_sd_path):
    out = tmp_path / "out"
    forget = tmp_path / "forget.txt"
    forget.write_text("a photo of cat\n")
    retain = tmp_path / "retain.txt"
    retain.write_text("a photo of dog\n")
    base = ["--model", str(tiny_sd_path), "--forget-prompts", str(forget), "--retain-prompts", str(retain),
            "--output-dir", str(out)]
    expect = {"unknown-method": (["--method", "forgetful"], "unknown method"),
              "unknown-key": (["--set", "lrr=0.1"], "unknown config key 'lrr'"),
              "missing-model": (["--model", str(tmp_path / "nope")], "does not exist"),
              "empty-prompts": (["--forget-prompts", str(tmp_path / "empty.txt")], "forget prompt list is empty"),
              "same-prompt": (["--retain-prompts", str(forget)], "in both the forget and the retain set"),
              "hub-offline": (["--model", "someone/not-a-model"], "offline"),
              "not-diffusers": (["--model", str(tmp_path)], "not a diffusers pipeline"),
              "bad-subset": (["--params", "attn3"], "unknown parameter subset"),
              "ds-batch": (["--set", f"deepspeed_config={tmp_path / 'ds.json'}"], "contradicts")}[case]
    (tmp_path / "empty.txt").write_text("\n\n")
    (tmp_path / "ds.json").write_text(json.dumps({"train_batch_size": 7, "zero_optimization": {"stage": 0}}))
    config = tmp_path / "c.yaml"
    if case == "unknown-key":
        config.write_text("lrr: 0.1\n")
    if case == "empty-prompts":  # --forget-prompts repeated names several concepts: give it once here
        base = base[:2] + base[4:]
    proc = subprocess.run([sys.executable, TRAIN, *base, *expect[0]], capture_output=True, text=True,
                          env=clean_env(), timeout=300)
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.startswith("fastunlearn:")]
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert len(lines) == 1 and expect[1] in lines[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert not out.exists()


def test_unknown_key_in_config_file(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("saddle:\n  taux: 0.1\n")
    proc = subprocess.run([sys.executable, TRAIN, "--config", str(config)], capture_output=True, text=True, timeout=120,
                          env=clean_env())
    assert proc.returncode == 2 and "unknown config key 'saddle.taux'" in proc.stderr and "Traceback" not in proc.stderr


def test_help_documents_every_flag():
    proc = subprocess.run([sys.executable, TRAIN, "--help"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0
    for flag in ("--model", "--method", "--forget-prompts", "--retain-prompts", "--forget-digit", "--output-dir",
                 "--max-steps", "--zero-stage", "--seed", "--config", "--set", "--overwrite"):
        assert flag in proc.stdout
    assert "default" in proc.stdout


def _image_folder(path, captions, sizes=None):
    from PIL import Image

    path.mkdir(parents=True)
    rows = []
    for i, text in enumerate(captions):
        size = sizes[i] if sizes else (16, 16)
        rng = torch.Generator().manual_seed(i)
        arr = (torch.rand(size[1], size[0], 3, generator=rng) * 255).to(torch.uint8).numpy()
        Image.fromarray(arr).save(path / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "text": text}))
    (path / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    return path


def test_data_mode_trains_from_captioned_images(tiny_sd_path, prompt_files, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    forget = _image_folder(tmp_path / "forget", ["a photo of cat", "a photo of cat", "a painting of cat"])
    out = tmp_path / "out"
    run_inprocess(["--model", str(tiny_sd_path), "--method", "ovw", "--retain-prompts",
                   str(prompt_files / "retain.txt"), "--output-dir", str(out), "--set", f"forget_data_dir={forget}",
                   *TINY])
    report = json.loads((out / "report.json").read_text())
    assert report["forget_prompts"] == ["a photo of cat", "a painting of cat"]


@pytest.mark.parametrize("case", ["no-caption", "mixed-sizes"])
def test_data_mode_bad_folders(case, tiny_sd_path, prompt_files, tmp_path):
    if case == "no-caption":
        folder = _image_folder(tmp_path / "forget", ["a photo of cat", ""])
        expect = "has no caption"
    else:
        folder = _image_folder(tmp_path / "forget", ["a photo of cat", "a painting of cat"], sizes=[(16, 16), (20, 16)])
        expect = "mixed sizes"
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, TRAIN, "--model", str(tiny_sd_path), "--retain-prompts",
                           str(prompt_files / "retain.txt"), "--output-dir", str(out), "--set",
                           f"forget_data_dir={folder}", *TINY], capture_output=True, text=True, env=clean_env(),
                          timeout=300)
    assert proc.returncode == 2 and expect in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_bf16_and_gradient_checkpointing_switches(tiny_sd_path, prompt_files, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    run_inprocess(["--model", str(tiny_sd_path), "--method", "saddle", "--forget-prompts",
                   str(prompt_files / "forget.txt"), "--retain-prompts", str(prompt_files / "retain.txt"),
                   "--output-dir", str(out), "--set", "mixed_precision=bf16", "--set", "gradient_checkpointing=true",
                   "--zero-stage", "2", *TINY])
    report = json.loads((out / "report.json").read_text())
    assert report["mixed_precision"] == "bf16" and report["zero_stage"] == 2


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_default_deepspeed_config_is_the_shipped_file(stage):
    """Without deepspeed_config a run uses exactly configs/ds_zero{stage}.json (plus the keys it owns)."""
    from fastunlearn.engine import deepspeed_config

    path = Path(__file__).resolve().parents[1] / "configs" / f"ds_zero{stage}.json"
    shipped = json.loads(path.read_text())
    cfg = TrainConfig(zero_stage=stage, method="ovw" if stage == 3 else "saddle").validate()
    built = deepspeed_config(cfg, world_size=1)
    assert {k: v for k, v in built.items() if k in shipped} == shipped
    assert built["gradient_clipping"] == cfg.grad_clip
    from_file = TrainConfig(zero_stage=stage, deepspeed_config=str(path)).validate()
    assert deepspeed_config(from_file, world_size=1) == built


def data_step(seed, step, micro, lat_a_shift=None, **cfg):
    """One `Batches.step` over fresh random latents (7 forget rows, 9 retain rows, odd shapes), with `cfg` keys;
    `lat_a_shift`: anchor samples equal to the forget latents plus this constant. Returns (step, scheduler)."""
    from diffusers import DDPMScheduler

    from fastunlearn.data import Batches

    sched = DDPMScheduler(num_train_timesteps=1000)
    g = torch.Generator().manual_seed(seed)
    lat_f, lat_r = torch.randn(7, 4, 5, 3, generator=g), torch.randn(9, 4, 5, 3, generator=g)
    ids_f, ids_r = torch.arange(7) % 3, torch.arange(9) % 4
    lat_a = None if lat_a_shift is None else lat_f + lat_a_shift
    b = Batches(TrainConfig(**cfg).validate(), sched, lat_f, ids_f, ids_f, lat_r, ids_r, 0, "cpu", torch.float32,
                None, None, lat_a=lat_a)
    return b.step(step, micro), sched


@pytest.mark.parametrize("t_min", [0.0, 0.37, 1.0])
def test_forget_t_min_draws_forget_timesteps_from_the_noisy_end_only(t_min):
    """forget_t_min: the forget rows' t in [floor(t_min * T), T), the retain rows' and everything else as at 0 (the
    same generator draws, so 0 is today's data bit for bit)."""
    def draw(value):
        return data_step(3, 5, 0, forget_t_min=value, forget_batch_size=64, retain_batch_size=64)[0]

    st, st0 = draw(t_min), draw(0.0)
    lo = min(int(t_min * 1000), 999)
    assert int(st.t_f.min()) >= lo and int(st.t_f.max()) < 1000
    assert torch.equal(st.t_r, st0.t_r) and torch.equal(st.x_r, st0.x_r) and torch.equal(st.c_f, st0.c_f)
    if t_min == 0.0:
        assert torch.equal(st.t_f, st0.t_f)
    else:
        assert int(st.t_f.max()) > lo or t_min == 1.0  # uniform over the range, not one value
    with pytest.raises(Exception, match="forget_t_min"):
        TrainConfig(forget_t_min=1.5).validate()


def test_forget_x0_anchor_takes_that_share_of_forget_rows_from_the_anchor_samples():
    """forget_x0_anchor p: a forget row's x_0 is the anchor's sample (same row index) with probability p; nothing
    else drawn changes, and 0 is today's data."""
    def draw(p):
        return data_step(4, 2, 1, lat_a_shift=100.0, forget_x0_anchor=p, forget_batch_size=200, retain_batch_size=5)

    (st0, sched), (st_half, _), (st1, _) = draw(0.0), draw(0.5), draw(1.0)
    shift = sched.alphas_cumprod[st0.t_f].sqrt().view(-1, 1, 1, 1) * 100.0  # add_noise(x0 + 100) - add_noise(x0)
    assert torch.allclose(st1.x_f - st0.x_f, shift.expand_as(st0.x_f), atol=1e-3)
    moved = ((st_half.x_f - st0.x_f).abs().flatten(1).amax(1) > 1e-3)
    assert 0.3 < moved.float().mean() < 0.7
    for st in (st_half, st1):
        assert torch.equal(st.t_f, st0.t_f) and torch.equal(st.x_r, st0.x_r) and torch.equal(st.c_f, st0.c_f)
    with pytest.raises(Exception, match="forget_x0_anchor"):
        TrainConfig(forget_x0_anchor=0.5, forget_data_dir="imgs").validate()


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sdxl_path"])
def test_forget_t_min_and_forget_x0_anchor_train_end_to_end(fixture, request, prompt_files, tmp_path, monkeypatch):
    """Both data knobs through the whole run: the anchors' samples are drawn (and cached beside the forget set's),
    the run trains and reports them in its config."""
    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    (tmp_path / "anchors.txt").write_text("a photo of lion\n")
    run_inprocess(["--model", str(request.getfixturevalue(fixture)), "--method", "saddle", "--forget-prompts",
                   str(prompt_files / "forget.txt"), "--retain-prompts", str(prompt_files / "retain.txt"),
                   "--anchor-prompts", str(tmp_path / "anchors.txt"), "--set", "forget_target=anchor",
                   "--set", "forget_t_min=0.5", "--set", "forget_x0_anchor=0.5", "--output-dir", str(out), *TINY])
    assert json.loads((out / "report.json").read_text())["steps"] == 3
    cached = sorted(p.name for p in (tmp_path / "cache" / "teacher-latents").iterdir())
    assert any("-a-" in name for name in cached), cached
