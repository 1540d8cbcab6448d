"""LoRA unlearning (--lora-rank): the student trains PEFT adapters, the teacher is the same UNet with
its adapters switched off, the adapter saves in the format diffusers' load_lora_weights reads; and the
attention choice that goes with it."""
import json
import subprocess
import sys

import pytest
import torch
from diffusers import DiffusionPipeline
from test_train import TINY, clean_env, run_inprocess

from fastunlearn.config import TRAINED_METHODS


def args(model, prompt_files, out, *extra):
    return ["--model", str(model), "--forget-prompts", str(prompt_files / "forget.txt"), "--retain-prompts",
            str(prompt_files / "retain.txt"), "--output-dir", str(out), "--lora-rank", "4", *TINY, *extra]


@pytest.fixture(scope="module")
def prompt_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("prompts")
    (d / "forget.txt").write_text("a photo of cat\na painting of cat\n")
    (d / "retain.txt").write_text("a photo of dog\na photo of car\n")
    return d


def unet_inputs(unet, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = unet.config.sample_size
    kw = {"encoder_hidden_states": torch.randn(2, 7, unet.config.cross_attention_dim, generator=g)}
    if unet.config.addition_embed_type == "text_time":  # SDXL
        kw["added_cond_kwargs"] = {"text_embeds": torch.randn(2, unet.config.projection_class_embeddings_input_dim
                                                              - 6 * unet.config.addition_time_embed_dim, generator=g),
                                   "time_ids": torch.randn(2, 6, generator=g)}
    return torch.randn(2, unet.config.in_channels, s, s, generator=g), torch.tensor([10, 700]), kw


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sdxl_path"])
@pytest.mark.parametrize("method", TRAINED_METHODS)  # uce, rece: tests/test_uce.py
def test_every_method_trains_lora_and_saves_the_adapter(method, fixture, request, prompt_files, tmp_path, monkeypatch):
    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    model = request.getfixturevalue(fixture)
    out = tmp_path / "out"
    import fastunlearn.models as fm

    seen = {}
    merge = fm.merge_lora

    def spy(unet):  # the trained student's output just before its adapter is merged for the pipeline
        x, t, kw = unet_inputs(unet)
        with torch.no_grad():
            seen["student"] = unet(x, t, **kw).sample
        return merge(unet)

    monkeypatch.setattr(fm, "merge_lora", spy)
    run_inprocess([*args(model, prompt_files, out), "--method", method])
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"] == "adapters off" and report["teacher_extra_bytes"] == 0
    assert 0 < report["lora"]["trained_parameters"] < report["unet_bytes"] / 4 / 10
    assert (out / "pytorch_lora_weights.safetensors").is_file()

    base = DiffusionPipeline.from_pretrained(model)
    x, t, kw = unet_inputs(base.unet)
    with torch.no_grad():
        original = base.unet(x, t, **kw).sample
        base.load_lora_weights(out)
        loaded = base.unet(x, t, **kw).sample
        merged = DiffusionPipeline.from_pretrained(out).unet(x, t, **kw).sample
    torch.testing.assert_close(loaded, seen["student"], rtol=1e-5, atol=1e-6)  # the adapter reproduces the student
    torch.testing.assert_close(merged, seen["student"], rtol=1e-3, atol=1e-4)  # merged: fp32 rounding of W + BA
    assert not torch.allclose(loaded, original), "the adapter did not change the UNet"


def test_teacher_is_exactly_the_original_while_adapters_train(tiny_sd_path, prompt_files, tmp_path, monkeypatch):
    from fastunlearn.train import Trainer, config_from_args

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    original = DiffusionPipeline.from_pretrained(tiny_sd_path).unet
    a = Trainer(config_from_args(args(tiny_sd_path, prompt_files, tmp_path / "out", "--set", "lr=1e-2")))
    a.folder.prepare()
    a.method.setup(a.context())
    x, t, kw = unet_inputs(original)
    before = a.engine.module(x, t, **kw).sample.detach()
    for step in range(3):
        loss, terms = a.method.loss(a.make_step(step, 0))
        a.engine.backward(loss)
        a.engine.step()
    with torch.no_grad():
        assert torch.equal(a.teacher(x, t, **kw).sample, original(x, t, **kw).sample)
        assert not torch.allclose(a.engine.module(x, t, **kw).sample, before)  # while the student moved
    assert {type(p).__name__ for p in a.engine.module.attn_processors.values()} == {"AttnProcessor2_0"}  # attention: sdpa
    trained = {n for n, p in a.engine.module.named_parameters() if p.requires_grad}
    assert trained and all(".lora_" in n for n in trained)
    a.folder.release()


def test_resume_restores_the_adapter(tiny_sd_path, prompt_files, tmp_path, monkeypatch):
    from fastunlearn.train import Trainer, config_from_args

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    argv = args(tiny_sd_path, prompt_files, tmp_path / "out", "--set", "checkpoint_every=2", "--set", "lr=1e-2")
    a = Trainer(config_from_args(argv))
    a.folder.prepare()
    a.method.setup(a.context())
    for step in range(2):
        loss, terms = a.method.loss(a.make_step(step, 0))
        a.engine.backward(loss)
        a.engine.step()
        a.step += 1
        a.method.after_step({k: float(v.detach()) for k, v in terms.items()}, a.step)
    a.save_checkpoint()
    saved = {k: v.clone() for k, v in a.engine.module.state_dict().items() if ".lora_" in k}
    state = a.method.state_dict()
    a.folder.release()

    b = Trainer(config_from_args(argv))
    assert b.maybe_resume() and b.step == 2 and b.method.state_dict() == state
    got = {k: v for k, v in b.engine.module.state_dict().items() if ".lora_" in k}
    assert got.keys() == saved.keys() and all(torch.equal(got[k], saved[k]) for k in saved)
    assert any(not torch.all(v == 0) for k, v in got.items() if "lora_B" in k)  # B starts at 0: it trained


@pytest.mark.parametrize("extra,message", [
    (["--zero-stage", "3"], "LoRA (lora.rank > 0) runs with ZeRO stages 0-2"),
    (["--set", "lora.target_modules=nothing_like_this"], "lora.target_modules"),
    (["--set", "teacher=copy"], "does not apply with LoRA"),
    (["--set", "attention=xformers"], "attention: xformers needs the xformers package"),  # not installed here
])
def test_lora_errors_are_one_line(extra, message, tiny_sd_path, prompt_files, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fastunlearn.train", *args(tiny_sd_path, prompt_files, tmp_path / "o"),
                           *extra], capture_output=True, text=True, env=clean_env() | {"FASTUNLEARN_CACHE": str(tmp_path)})
    assert proc.returncode != 0
    err = proc.stderr.strip().splitlines()
    assert message in err[-1] and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "o").exists()
