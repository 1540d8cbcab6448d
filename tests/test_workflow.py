"""The workflow around a run: training curves (--report-to), the diffusers-style flags, resuming from a
named checkpoint, the small exports (--save-format unet|trained, fastunlearn.load_unlearned) and
`python -m fastunlearn.evaluate` reporting what was kept apart from what was forgotten."""
import json
from pathlib import Path

import pytest
import torch

from fastunlearn.errors import FastUnlearnError


def train(argv):
    from fastunlearn.train import main

    return main(argv)


# ---- training curves --------------------------------------------------------------------------------


def test_report_to_tensorboard_curves_survive_a_crash_and_resume_from_a_named_checkpoint(base_args, tmp_path,
                                                                                         monkeypatch):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from fastunlearn.train import Trainer

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    argv = [*base_args, "--output_dir", str(out), "--max_train_steps", "4", "--report_to", "tensorboard",
            "--checkpointing_steps", "2", "--set", "eval.every=2", "--set", "eval.early_every=0"]
    evaluate = Trainer.evaluate

    def judged(self, evaluator):  # the tiny fixture has no judge: give the curves numbers to plot
        metrics, images = evaluate(self, evaluator)
        return {**metrics, "forget_accuracy": 0.5, "retain_accuracy_by_digit": {"1": 0.75}}, images

    make_step = Trainer.make_step

    def crash_at_step_4(self, step, micro):
        if step == 3:
            raise RuntimeError("crash")
        return make_step(self, step, micro)

    monkeypatch.setattr(Trainer, "evaluate", judged)
    monkeypatch.setattr(Trainer, "make_step", crash_at_step_4)
    with pytest.raises(RuntimeError, match="crash"):  # steps 1-3 logged, checkpoint at step 2
        train(argv)
    assert (out / "checkpoints" / "step-2").is_dir() and not (out / "report.json").exists()
    monkeypatch.setattr(Trainer, "make_step", make_step)
    assert train([*argv, "--resume_from_checkpoint", str(out / "checkpoints" / "step-2")]) == 0
    assert "resumed from" in (out / "train.log").read_text() and (out / "report.json").is_file()

    acc = EventAccumulator(str(out / "logs"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/R", "train/G", "train/lam", "train/lr", "eval/forget_accuracy",
            "eval/retain_accuracy_by_digit/1"} <= tags, tags
    # the step logged before the crash and again after resuming appears once (purged), every step once
    assert [e.step for e in acc.Scalars("train/loss")] == [1, 2, 3, 4]
    assert [e.step for e in acc.Scalars("eval/forget_accuracy")] == [2, 4]  # in training, and the final one
    assert acc.Scalars("train/lr")[0].value == pytest.approx(2e-4)


def test_report_to_choices_are_checked(base_args):
    from fastunlearn.train import config_from_args

    with pytest.raises(FastUnlearnError, match="report_to must be one of none, tensorboard, wandb"):
        config_from_args([*base_args, "--report-to", "comet"])
    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(FastUnlearnError) as info:
            config_from_args([*base_args, "--report_to", "wandb"])
        assert "pip install wandb" in str(info.value) and "\n" not in str(info.value)


# ---- the diffusers flags ----------------------------------------------------------------------------


def test_diffusers_style_flags_are_aliases(base_args, tmp_path):
    from fastunlearn.train import DIFFUSERS_FLAGS, build_parser, config_from_args

    model = base_args[1]
    cfg = config_from_args(["--pretrained_model_name_or_path", model, "--learning_rate", "1e-5",
                            "--max_train_steps", "7", "--train_batch_size", "3", "--gradient_accumulation_steps", "2",
                            "--mixed_precision", "bf16", "--gradient_checkpointing", "--report_to", "none",
                            "--checkpointing_steps", "5", "--checkpoints_total_limit", "2", "--seed", "11",
                            "--output_dir", str(tmp_path / "o"), "--resume_from_checkpoint", "latest"])
    assert (cfg.model, cfg.lr, cfg.max_steps, cfg.forget_batch_size, cfg.retain_batch_size) == (model, 1e-5, 7, 3, 3)
    assert (cfg.gradient_accumulation_steps, cfg.mixed_precision, cfg.gradient_checkpointing) == (2, "bf16", True)
    assert (cfg.checkpoint_every, cfg.keep_checkpoints, cfg.seed, cfg.output_dir) == (5, 2, 11, str(tmp_path / "o"))
    assert cfg.resume_from_checkpoint == "latest" and cfg.report_to == "none"
    hyphen = config_from_args(["--learning-rate", "3e-5", "--max-train-steps", "9", "--train-batch-size", "4",
                               "--mixed-precision", "fp16", "--gradient-checkpointing", "--checkpoints-total-limit", "3"])
    assert (hyphen.lr, hyphen.max_steps, hyphen.retain_batch_size, hyphen.mixed_precision) == (3e-5, 9, 4, "fp16")
    assert hyphen.gradient_checkpointing and hyphen.keep_checkpoints == 3
    # the options they alias still work, and a contradiction between the two is refused in one line
    assert config_from_args(["--max-steps", "5", "--max_train_steps", "5"]).max_steps == 5
    with pytest.raises(FastUnlearnError, match="--max_train_steps 6 and --max-steps 5 disagree"):
        config_from_args(["--max-steps", "5", "--max_train_steps", "6"])
    for bad, key in ((["--learning_rate", "-1"], "lr"), (["--mixed_precision", "fp8"], "mixed_precision"),
                     (["--train_batch_size", "x"], "forget_batch_size")):
        with pytest.raises(FastUnlearnError, match=key):
            config_from_args(bad)
    text = build_parser().format_help()
    for name, (_, aliased) in DIFFUSERS_FLAGS.items():
        assert name in text and f"= {aliased}" in text


def test_resume_from_checkpoint_path_must_be_a_complete_checkpoint_of_the_run(tmp_path):
    from fastunlearn.train import config_from_args

    out = tmp_path / "out"
    ckpts = out / "checkpoints"
    (ckpts / "step-2").mkdir(parents=True)
    torch.save({"x": torch.zeros(1)}, ckpts / "step-2" / "mp_rank_00_model_states.pt")
    (ckpts / ".partial-step-4").mkdir()
    (ckpts / "step-6").mkdir()  # no model states
    other = tmp_path / "elsewhere" / "step-2"
    other.mkdir(parents=True)
    base = ["--output-dir", str(out)]
    assert config_from_args([*base, "--resume_from_checkpoint", "step-2"]).resume_from_checkpoint == "step-2"
    assert config_from_args([*base, "--resume-from-checkpoint", str(ckpts / "step-2")])
    for spec, expect in (("step-9", "no such checkpoint folder .the complete ones in .*: step-2"),
                         (str(ckpts / ".partial-step-4"), "incomplete checkpoint"),
                         (str(ckpts / "step-6"), "not a complete checkpoint"),
                         (str(other), "not a checkpoint of this run's output_dir")):
        with pytest.raises(FastUnlearnError, match=expect) as info:
            config_from_args([*base, "--resume_from_checkpoint", spec])
        assert "\n" not in str(info.value)
    with pytest.raises(FastUnlearnError, match="cannot be combined with --overwrite"):
        config_from_args([*base, "--resume_from_checkpoint", "step-2", "--overwrite"])


# ---- small exports ----------------------------------------------------------------------------------


def test_unet_and_trained_exports_apply_to_the_base_pipeline(base_args, tiny_sdxl_path, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline, UNet2DConditionModel
    from safetensors import safe_open

    import fastunlearn
    from fastunlearn.export import load_run

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    model = base_args[1]
    runs = {}
    for fmt in ("unet", "trained"):
        runs[fmt] = tmp_path / fmt
        train([*base_args, "--output-dir", str(runs[fmt]), "--max-steps", "2", "--params", "attn2",
               "--save-format", fmt])
        report = json.loads((runs[fmt] / "report.json").read_text())
        assert report["save_format"] == fmt and not (runs[fmt] / "model_index.json").exists()
    assert (runs["unet"] / "unet" / "config.json").is_file()
    UNet2DConditionModel.from_pretrained(runs["unet"], subfolder="unet")
    base = DiffusionPipeline.from_pretrained(model)
    with safe_open(str(runs["trained"] / "unlearned.safetensors"), framework="pt") as f:
        names, meta = set(f.keys()), f.metadata()
    attn2 = {n for n, _ in base.unet.named_parameters() if ".attn2." in n}
    assert names == attn2 and meta["params"] == "attn2" and meta["base_model"] == str(Path(model).resolve())

    from_trained = fastunlearn.load_unlearned(DiffusionPipeline.from_pretrained(model), runs["trained"])
    from_unet = fastunlearn.load_unlearned(DiffusionPipeline.from_pretrained(model), runs["unet"] / "unet")
    a, b, c = (p.unet.state_dict() for p in (from_trained, from_unet, base))
    assert all(torch.equal(a[k], b[k]) for k in a)  # the same run, exported two ways
    assert any(not torch.equal(a[k], c[k]) for k in attn2) and all(torch.equal(a[k], c[k]) for k in a if k not in attn2)
    # the evaluation loads either export as a pipeline: the base model from report.json, or --base
    assert all(torch.equal(v, a[k]) for k, v in load_run(runs["trained"]).unet.state_dict().items())
    (runs["unet"] / "report.json").unlink()
    with pytest.raises(FastUnlearnError, match="holds only the UNet .* give it with --base"):
        load_run(runs["unet"])
    assert all(torch.equal(v, a[k]) for k, v in load_run(runs["unet"], base=model).unet.state_dict().items())

    with pytest.raises(FastUnlearnError, match="does not fit this pipeline") as info:  # another architecture
        fastunlearn.load_unlearned(DiffusionPipeline.from_pretrained(tiny_sdxl_path), runs["trained"])
    assert "\n" not in str(info.value)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(runs["trained"] / "unlearned.safetensors"))
    key = sorted(tensors)[0]
    tensors[key] = tensors[key][..., :1].contiguous()
    save_file(tensors, str(tmp_path / "bad.safetensors"), metadata=meta)
    with pytest.raises(FastUnlearnError, match=f"{key} has shape"):
        fastunlearn.load_unlearned(DiffusionPipeline.from_pretrained(model), tmp_path / "bad.safetensors")


def test_save_format_is_checked():
    from fastunlearn.train import config_from_args

    with pytest.raises(FastUnlearnError, match="save_format must be one of pipeline, unet, trained"):
        config_from_args(["--save-format", "ckpt"])


# ---- evaluate: kept apart from forgotten --------------------------------------------------------------


def _evaluate(argv):
    from fastunlearn.evaluate import main

    return main(argv)


def test_evaluate_reports_integrity_retain_and_forget_apart(tiny_sd_path, tmp_path, monkeypatch):
    import torchvision
    from diffusers import DiffusionPipeline

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    pipe = DiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.unet.register_to_config(sample_size=32)  # 64 px images: big enough for LPIPS
    pipe.save_pretrained(tmp_path / "original")
    with torch.no_grad():
        for name, p in pipe.unet.named_parameters():
            if ".attn2." in name:
                p.add_(torch.randn_like(p) * 0.5)
    pipe.save_pretrained(tmp_path / "unlearned")
    (tmp_path / "unlearned" / "report.json").write_text(json.dumps({"forget_prompts": ["a photo of cat"]}))
    weights = tmp_path / "squeeze.pth"
    torch.save(torchvision.models.squeezenet1_1(weights=None).state_dict(), weights)
    (tmp_path / "p.txt").write_text("a photo of cat\na photo of dog\na photo of car\n")
    common = ["--original", str(tmp_path / "original"), "--prompts", str(tmp_path / "p.txt"), "--seeds", "2",
              "--steps", "2", "--perceptual", "squeeze", "--backbone-weights", str(weights)]
    assert _evaluate([*common, "--unlearned", str(tmp_path / "unlearned"), "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["forget_prompts"] == ["a photo of cat"] and report["forget_prompts_from"].endswith("report.json")
    assert report["retain_prompts"] == ["a photo of dog", "a photo of car"]
    assert (report["samples_retain"], report["samples_forget"], report["samples"]) == (4, 2, 6)
    for key in ("integrity_retain", "integrity_forget", "integrity_retain_ci95"):
        assert report[key] is not None and report[key] >= 0
    assert report["integrity"] == report["integrity_retain"]
    assert set(report["integrity_forget_by_prompt"]) == {"a photo of cat"}
    assert (tmp_path / "ev" / "grid.png").is_file()
    assert "forget_rate" not in report  # no judge asked for
    # a forget judge (here a tiny CLIP) gives the forget and retain rates beside integrity, before and after
    from fastunlearn.testing import tiny_clip

    clip = tiny_clip(tmp_path / "clip")
    assert _evaluate([*common, "--unlearned", str(tmp_path / "unlearned"), "--out", str(tmp_path / "ev-judge"),
                      "--clip-model", str(clip)]) == 0
    report = json.loads((tmp_path / "ev-judge" / "report.json").read_text())
    assert report["judge"].startswith("clip")
    for key in ("forget_rate", "retain_rate", "base_forget_rate", "base_retain_rate"):
        assert 0 <= report[key] <= 1, key
    # --forget-prompts names them when the run does not (a plain pipeline folder)
    (tmp_path / "unlearned" / "report.json").unlink()
    assert _evaluate([*common, "--unlearned", str(tmp_path / "unlearned"), "--out", str(tmp_path / "ev2"),
                      "--forget-prompts", "a photo of dog"]) == 0
    report = json.loads((tmp_path / "ev2" / "report.json").read_text())
    assert report["forget_prompts_from"] == "--forget-prompts"
    assert report["retain_prompts"] == ["a photo of cat", "a photo of car"] and report["samples_forget"] == 2
    # without forget prompts every prompt counts as kept, and the report says why I_forget is missing
    assert _evaluate([*common, "--unlearned", str(tmp_path / "unlearned"), "--out", str(tmp_path / "ev3")]) == 0
    report = json.loads((tmp_path / "ev3" / "report.json").read_text())
    assert report["integrity_forget"] is None and report["samples_retain"] == 6
    assert any("I_forget not computed" in n for n in report["notes"])


@pytest.mark.slow
def test_evaluate_on_the_digits_world_gives_accuracies_beside_integrity(digits_world, tmp_path):
    run = tmp_path / "run"  # stands in for an unlearned run: the base pipeline and a report naming the forget prompts
    run.mkdir()
    for entry in Path(digits_world.pipeline_path).iterdir():
        (run / entry.name).symlink_to(entry)
    forget = ["a handwritten digit three", "the number 3", "a drawing of the digit 3"]
    (run / "report.json").write_text(json.dumps({"model": "digits", "forget_prompts": forget}))
    assert _evaluate(["--original", "digits", "--unlearned", str(run), "--seeds", "2", "--steps", "10",
                      "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert len(report["retain_prompts"]) == 9 and not any("three" in q for q in report["retain_prompts"])
    assert (report["samples_forget"], report["samples_retain"]) == (6, 18)
    assert report["integrity_retain"] == pytest.approx(0, abs=1e-6)  # the same model twice
    for key in ("forget_accuracy", "retain_accuracy", "base_forget_accuracy", "base_retain_accuracy"):
        assert 0 <= report[key] <= 1
    assert report["forget_accuracy"] == report["base_forget_accuracy"]
