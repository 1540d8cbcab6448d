"""Nothing lost, ever: a failed or killed command never costs a finished run, one run per output
folder, the NaN guard for every optimizer, ranks that decide together, and one-line errors for the
inputs that used to end in a traceback. Each test here failed before its fix."""
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline
from test_reliability import TRAIN, env, one_error_line, train, unet_weights

from fastunlearn.errors import FastUnlearnError
from fastunlearn.outputs import MOVING, PREVIOUS, RunFolder, strict_json


def assert_intact(run: Path, report_text: str, weights: dict):
    """`run` is the finished run it was: same report, same weights, loads as a pipeline."""
    assert (run / "report.json").read_text() == report_text
    now = unet_weights(run)
    assert now.keys() == weights.keys() and all(torch.equal(now[k], weights[k]) for k in weights)
    DiffusionPipeline.from_pretrained(run)


# ---- 1. a failed or killed --overwrite never costs the finished run ---------------------------------


def test_failed_and_killed_overwrites_never_lose_the_finished_run(base_args, tmp_path):
    out = tmp_path / "out"
    args = [*base_args, "--max-steps", "4", "--set", "checkpoint_every=2", "--output-dir", str(out)]
    assert train(args, tmp_path).returncode == 0
    report, weights = (out / "report.json").read_text(), unet_weights(out)

    # a failing --overwrite (bad model path, bad DeepSpeed config) touches nothing
    bad_ds = tmp_path / "ds.json"
    bad_ds.write_text('{"train_batch_size": 7}')
    for extra, expect in ((["--model", "/nonexistent"], "model path /nonexistent does not exist"),
                          (["--set", f"deepspeed_config={bad_ds}"], "contradicts")):
        proc = train([*args, "--overwrite", *extra], tmp_path)
        assert proc.returncode == 2 and expect in one_error_line(proc)
        assert not (out / PREVIOUS).exists()
        assert_intact(out, report, weights)

    # a killed --overwrite: the finished run waits in .previous-run, the new one is not published
    assert train([*args, "--overwrite", "--set", "lr=1e-3"], tmp_path, fault="kill:3").returncode == -signal.SIGKILL
    assert not (out / "report.json").exists() and not (out / "model_index.json").exists()
    assert_intact(out / PREVIOUS, report, weights)

    # the sequence that used to delete it: a failing --overwrite after the killed one
    proc = train([*args, "--overwrite", "--model", "/nonexistent"], tmp_path)
    assert proc.returncode == 2 and "model path /nonexistent does not exist" in one_error_line(proc)
    assert_intact(out / PREVIOUS, report, weights)

    # a second killed --overwrite with yet other settings: the unfinished run goes, never the finished one
    assert train([*args, "--overwrite", "--set", "lr=5e-4"], tmp_path, fault="kill:3").returncode == -signal.SIGKILL
    assert_intact(out / PREVIOUS, report, weights)
    assert json.loads((out / "config.json").read_text())["lr"] == 5e-4

    # without --overwrite the refusal says where the finished run is
    proc = train([*args, "--set", "lr=1e-3"], tmp_path)
    assert proc.returncode == 2 and f"{out / PREVIOUS} holds the finished run" in one_error_line(proc)

    # a completed --overwrite replaces it, and only then is the old run deleted
    proc = train([*args, "--overwrite", "--set", "lr=5e-4"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (out / PREVIOUS).exists() and not list(out.glob(".final-tmp*")) and not list(out.glob(".discard-*"))
    DiffusionPipeline.from_pretrained(out)


def _finished_run(folder: Path, tag: str):
    folder.mkdir(parents=True)
    for name in ("unet", "vae"):
        (folder / name).mkdir()
        (folder / name / "weights").write_text(f"{tag}-{name}")
    (folder / "model_index.json").write_text("{}")
    (folder / "report.json").write_text(json.dumps({"run": tag}))


def test_an_interrupted_move_aside_is_rolled_back(tmp_path):
    """A kill while a finished run was being moved into .previous-run: the next run puts it back."""
    out = tmp_path / "out"
    _finished_run(out, "A")
    (out / MOVING).mkdir()
    os.replace(out / "unet", out / MOVING / "unet")  # half moved
    os.replace(out / "model_index.json", out / MOVING / "model_index.json")
    folder = RunFolder(out, {"lr": 1.0}, overwrite=True)
    folder.lock()
    folder.recover()
    assert not (out / MOVING).exists()
    assert (out / "unet" / "weights").read_text() == "A-unet" and (out / "model_index.json").is_file()
    assert folder.plan() == "replace"
    folder.prepare()
    assert (out / PREVIOUS / "unet" / "weights").read_text() == "A-unet"
    assert json.loads((out / PREVIOUS / "report.json").read_text()) == {"run": "A"}
    assert sorted(p.name for p in out.iterdir()) == [".lock", PREVIOUS, "config.json"]
    folder.release()
    assert not (out / ".lock").exists()  # deleted by the run that held it


def test_restarting_an_unfinished_run_keeps_the_finished_previous_one(tmp_path):
    out = tmp_path / "out"
    _finished_run(out / PREVIOUS, "A")
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    (out / "config.json").write_text(json.dumps({"lr": 1.0}))
    folder = RunFolder(out, {"lr": 2.0}, overwrite=True)
    folder.lock()
    assert folder.plan() == "restart"
    folder.prepare()
    assert json.loads((out / PREVIOUS / "report.json").read_text()) == {"run": "A"}
    assert not (out / "checkpoints").exists() and json.loads((out / "config.json").read_text()) == {"lr": 2.0}
    folder.release()


# ---- 2. one run per output folder -------------------------------------------------------------------


def test_the_output_folder_lock_names_its_holder(tmp_path):
    first = RunFolder(tmp_path / "out", {}, overwrite=False)
    first.lock()
    with pytest.raises(FastUnlearnError, match=rf"in use by another run \(pid {os.getpid()}\)"):
        RunFolder(tmp_path / "out", {}, overwrite=False).lock()
    first.release()
    again = RunFolder(tmp_path / "out", {}, overwrite=False)
    again.lock()  # free once released
    again.release()


def test_a_lock_taken_on_a_lock_file_its_holder_just_deleted_is_taken_again(tmp_path, monkeypatch):
    """The holder deletes `.lock` before letting go; a run that opened the old file just before must not count
    the lock it then gets on that deleted file: it opens the new one (else two runs could both hold "the" lock)."""
    from fastunlearn import outputs

    out = tmp_path / "out"
    out.mkdir()
    real_open, opened = os.open, []

    def open_then_holder_deletes(path, flags, mode=0o777):
        fd = real_open(path, flags, mode)
        if not opened:
            os.unlink(path)  # the holder's release() between our open and our flock
        opened.append(path)
        return fd

    monkeypatch.setattr(outputs.os, "open", open_then_holder_deletes)
    folder = RunFolder(out, {}, overwrite=False)
    folder.lock()
    monkeypatch.undo()
    assert len(opened) == 2 and (out / ".lock").read_text().strip() == str(os.getpid())
    with pytest.raises(FastUnlearnError, match="in use by another run"):
        RunFolder(out, {}, overwrite=False).lock()
    folder.release()


def test_two_concurrent_runs_one_refused_the_other_completes(base_args, tmp_path):
    out = tmp_path / "out"
    args = [sys.executable, TRAIN, *base_args, "--max-steps", "4", "--output-dir", str(out)]
    first = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(tmp_path))
    deadline = time.time() + 120
    while time.time() < deadline and not ((out / ".lock").is_file() and (out / ".lock").read_text().strip()):
        time.sleep(0.05)
    second = subprocess.run(args, capture_output=True, text=True, env=env(tmp_path), timeout=300)
    assert second.returncode == 2
    assert f"is in use by another run (pid {first.pid})" in one_error_line(second)
    _, err = first.communicate(timeout=600)
    assert first.returncode == 0, err[-3000:]
    assert json.loads((out / "report.json").read_text())["steps"] == 4
    DiffusionPipeline.from_pretrained(out)
    assert not list(out.glob(".*"))  # no .final-tmp, no .lock: nothing but the run's own files


# ---- 3. the NaN guard holds when DeepSpeed builds the optimizer ---------------------------------------


def test_nan_guard_holds_for_an_optimizer_deepspeed_builds(base_args, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 0},
                              "optimizer": {"type": "AdamW", "params": {"torch_adam": True}}}))
    out = tmp_path / "out"
    proc = train([*base_args, "--max-steps", "4", "--set", f"deepspeed_config={ds}", "--set", "lr=1e-3",
                  "--set", "weight_decay=0.01", "--output-dir", str(out)], tmp_path, fault="nan:1")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "step 2: non-finite loss term" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["skipped_steps"] == [2]
    assert all(torch.isfinite(w).all() for w in unet_weights(out).values())
    log = (out / "train.log").read_text()
    assert "optimizer AdamW (built by DeepSpeed), lr 0.001, weight_decay 0.01" in log  # the run's lr, not ignored


def test_deepspeed_optimizer_settings_that_contradict_the_run_are_refused(base_args, tmp_path):
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-3}}}))
    out = tmp_path / "out"
    proc = train([*base_args, "--max-steps", "2", "--set", f"deepspeed_config={ds}", "--output-dir", str(out)], tmp_path)
    assert proc.returncode == 2
    assert "optimizer.params.lr=0.001 contradicts lr=0.0002" in one_error_line(proc)
    assert not out.exists()


def test_step_guard_skips_on_request_and_on_a_nonfinite_gradient():
    from fastunlearn.engine import StepGuard

    p = torch.nn.Parameter(torch.randn(5))
    opt = torch.optim.AdamW([p], lr=0.1)
    guard = StepGuard(opt)
    before = p.detach().clone()
    p.grad = torch.tensor([1.0, float("nan"), 0.0, 2.0, 3.0])
    opt.step()
    assert guard.skipped and torch.equal(p.detach(), before) and not opt.state[p]
    p.grad = torch.randn(5)
    guard.skip_next = True
    opt.step()
    assert guard.skipped and torch.equal(p.detach(), before) and not guard.skip_next
    opt.step()
    assert not guard.skipped and not torch.equal(p.detach(), before)


# ---- 4. ranks decide together (2 processes, gloo) ---------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("cached_on", [0, 1], ids=["cache-on-rank0-only", "cache-on-rank1-only"])
def test_two_ranks_with_different_local_caches_and_a_one_rank_nan_gradient_finish(cached_on, base_args, tmp_path):
    """Two processes as on two nodes, each with its own (node-local) cache, only one of which holds the
    teacher latents; under ZeRO-2 (no DeepSpeed gradient norm) rank 1 feeds a NaN into one gradient element of step 2 (0-based batch 1), which only
    rank 0's partition receives. Both ranks must take the same decisions and finish."""
    warm = train([*base_args, "--max-steps", "1", "--output-dir", str(tmp_path / "warm")], tmp_path)
    assert warm.returncode == 0, warm.stderr[-3000:]
    caches = [tmp_path / f"node{r}-cache" for r in range(2)]
    os.replace(tmp_path / "cache", caches[cached_on])
    caches[1 - cached_on].mkdir()
    rank1_files = sorted(caches[1].rglob("*.safetensors"))
    out, port = tmp_path / "out", str(_free_port())
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"zero_optimization": {"stage": 2, "compute_grad_norm": False}}))
    procs = [subprocess.Popen(
        [sys.executable, TRAIN, *base_args, "--max-steps", "4", "--zero-stage", "2", "--set", "log_every=1",
         # without DeepSpeed's gradient norm (and so its overflow check) only fastunlearn's guard sees the
         # NaN, on rank 0 alone; a per-rank decision hangs here (seen: both ranks stuck after step 2)
         "--set", f"deepspeed_config={ds}", "--set", "grad_clip=0",
         "--output-dir", str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env=env(tmp_path) | {"RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
                             "MASTER_PORT": port, "OMP_NUM_THREADS": "1", "FASTUNLEARN_CACHE": str(caches[r]),
                             "FASTUNLEARN_FAULT": "nan-grad:1:1"}) for r in range(2)]
    try:
        texts = [p.communicate(timeout=600)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], texts[0][-3000:] + texts[1][-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["world_size"] == 2 and report["steps"] == 4 and report["skipped_steps"] == [2]
    assert "step 2: non-finite gradient (loss finite)" in (out / "train.log").read_text()
    assert all(torch.isfinite(w).all() for w in unet_weights(out).values())
    # rank 0 decided (it loaded or sampled and wrote); rank 1 followed and wrote nothing of its own
    assert any(caches[0].glob("teacher-latents/*.safetensors"))
    assert sorted(caches[1].rglob("*.safetensors")) == rank1_files


# ---- 5-9. one-line errors, nothing written ------------------------------------------------------------


@pytest.mark.parametrize("setting", [
    "log_every=0", "saddle.g0_batches=0", "evaluate-steps-0", "lr=0", "lr=-1e-4", "lr=nan", "lr=inf",
    "weight_decay=-0.1", "grad_clip=-1", "forget_batch_size=true", "output_dir=", "yaml-output-dir-empty",
    "yaml-bool-as-int", "saddle.lambda_init=20", "eval.forget_threshold=1.5"])
def test_settings_that_make_no_sense_are_refused_up_front(setting, tmp_path):
    from fastunlearn.train import config_from_args

    if setting == "evaluate-steps-0":
        from fastunlearn.evaluate import main as evaluate

        with pytest.raises(SystemExit) as info:
            evaluate(["--original", "digits", "--unlearned", "digits", "--steps", "0", "--out", str(tmp_path / "ev")])
        assert info.value.code == 2 and not (tmp_path / "ev").exists()
        return
    if setting.startswith("yaml-"):
        config = tmp_path / "c.yaml"
        config.write_text({"yaml-output-dir-empty": "output_dir:\n", "yaml-bool-as-int": "forget_batch_size: true\n"}[setting])
        argv = ["--config", str(config)]
    else:
        argv = ["--set", setting]
    with pytest.raises(FastUnlearnError) as info:
        config_from_args(argv)
    assert "\n" not in str(info.value)
    key = {"yaml-output-dir-empty": "output_dir", "yaml-bool-as-int": "forget_batch_size",
           "evaluate-steps-0": "steps"}.get(setting, setting.split("=")[0])
    assert key in str(info.value), str(info.value)


def test_an_invalid_setting_on_the_command_line_is_one_line_and_writes_nothing(base_args, tmp_path):
    out = tmp_path / "out"
    proc = train([*base_args, "--set", "lr=nan", "--output-dir", str(out)], tmp_path)
    assert proc.returncode == 2 and "lr must be a finite number, got nan" in one_error_line(proc)
    assert not out.exists()


def test_output_paths_that_are_files_are_refused_before_any_work(base_args, tmp_path):
    taken = tmp_path / "taken"
    taken.write_text("not a folder")
    proc = train([*base_args, "--output-dir", str(taken)], tmp_path)
    assert proc.returncode == 2 and f"output directory {taken} is not a folder" in one_error_line(proc)
    proc = train([*base_args, "--output-dir", str(taken / "sub")], tmp_path)
    assert proc.returncode == 2 and f"(its parent {taken} is a file)" in one_error_line(proc)
    assert taken.read_text() == "not a folder"
    (tmp_path / "p.txt").write_text("a photo of cat\n")
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "fastunlearn.evaluate", "--original", base_args[1], "--unlearned",
                           base_args[1], "--prompts", str(tmp_path / "p.txt"), "--out", str(taken)],
                          capture_output=True, text=True, env=env(tmp_path), timeout=300)
    assert proc.returncode == 2 and f"--out {taken} is not a folder" in one_error_line(proc)
    assert "lpips" not in proc.stderr.lower() and time.time() - t0 < 60  # refused before loading or sampling


def _broken_copy(src: Path, dst: Path, case: str) -> Path:
    import shutil

    shutil.copytree(src, dst)
    weights = dst / "unet" / "diffusion_pytorch_model.safetensors"
    if case == "no-unet":
        shutil.rmtree(dst / "unet")
    elif case == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) // 2])
    elif case == "bin-only":
        from safetensors.torch import load_file

        torch.save(load_file(str(weights)), dst / "unet" / "diffusion_pytorch_model.bin")
        weights.unlink()
    return dst


@pytest.mark.parametrize("case,expect", [
    ("no-unet", "is incomplete: model_index.json lists unet (UNet2DConditionModel) but there is no unet/ folder"),
    ("truncated", "unet/diffusion_pytorch_model.safetensors is truncated or corrupt"),
    ("bin-only", "unet/ has weights only as diffusion_pytorch_model.bin (a pickle)")])
def test_an_incomplete_or_corrupt_model_folder_names_the_cause(case, expect, tiny_sd_path, tmp_path):
    from fastunlearn.models import load_pipeline

    model = _broken_copy(tiny_sd_path, tmp_path / "model", case)
    with pytest.raises(FastUnlearnError, match=expect.replace("(", r"\(").replace(")", r"\)")) as info:
        load_pipeline(str(model))
    assert "\n" not in str(info.value) and "offline" not in str(info.value)


def test_a_long_prompt_on_the_command_line_is_a_prompt_truncated_with_a_warning(base_args, tmp_path):
    long_prompt = "a photo of cat " * 40  # longer than a file name may be, and than the text encoder takes
    out = tmp_path / "out"
    args = [*base_args, "--max-steps", "1", "--output-dir", str(out)]
    args[args.index("--forget-prompts") + 1] = long_prompt.strip()
    proc = train(args, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "tokens long but the text encoder takes 16: the last 146 token(s) are dropped" in proc.stderr
    report = json.loads((out / "report.json").read_text(), parse_constant=lambda c: pytest.fail(f"bare {c}"))
    assert any("are dropped" in n for n in report["notes"])


def test_reports_are_strict_json():
    text = strict_json({"a": float("nan"), "b": [1.0, float("inf")], "c": {"d": -float("inf"), "e": 0.5}})
    assert json.loads(text, parse_constant=lambda c: pytest.fail(f"bare {c}")) == {
        "a": None, "b": [1.0, None], "c": {"d": None, "e": 0.5}}
