"""The teacher without a second copy of the frozen weights (issue 6, item 2)."""
import copy
import json

import pytest
import torch
from diffusers import DiffusionPipeline

from fastunlearn.models import SharedTeacher, fingerprint, param_subset


@pytest.mark.parametrize("fixture", ["tiny_sd_path", "tiny_sdxl_path"])
@pytest.mark.parametrize("subset", ["attn2", "non-attn2"])
def test_shared_teacher_equals_a_frozen_copy_after_the_student_changes(fixture, subset, request):
    pipe = DiffusionPipeline.from_pretrained(request.getfixturevalue(fixture))
    unet = pipe.unet
    trained = set(param_subset(unet, subset))
    frozen_copy = copy.deepcopy(unet).eval()
    shared = SharedTeacher(unet, trained)
    assert fingerprint(shared) == fingerprint(frozen_copy)
    assert shared.extra_bytes() == sum(p.numel() * p.element_size() for n, p in unet.named_parameters() if n in trained)
    assert shared.extra_bytes() < sum(p.numel() * p.element_size() for p in unet.parameters())
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for n, p in unet.named_parameters():
            if n in trained:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
    c = unet.config
    x = torch.randn(3, c.in_channels, c.sample_size, c.sample_size, generator=g)
    t = torch.tensor([1, 500, 999])
    kwargs = {"encoder_hidden_states": torch.randn(3, 7, c.cross_attention_dim, generator=g)}
    if c.addition_embed_type == "text_time":
        kwargs["added_cond_kwargs"] = {"text_embeds": torch.randn(3, c.projection_class_embeddings_input_dim - 6 * c.addition_time_embed_dim, generator=g),
                                       "time_ids": torch.randn(3, 6, generator=g)}
    want = frozen_copy(x, t, **kwargs).sample
    got = shared(x, t, **kwargs).sample
    moved = unet(x, t, **kwargs).sample
    assert torch.allclose(got, want, atol=1e-6) and not torch.allclose(moved, want, atol=1e-4)
    assert not got.requires_grad
    assert shared.config is unet.config  # what a pipeline reads comes from the student


def test_attn2_run_uses_the_shared_teacher_and_finishes(tiny_sd_path, tmp_path, monkeypatch):
    from fastunlearn.train import main

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "f.txt").write_text("a photo of cat\n")
    (tmp_path / "r.txt").write_text("a photo of dog\n")
    out = tmp_path / "out"
    main(["--model", str(tiny_sd_path), "--params", "attn2", "--forget-prompts", str(tmp_path / "f.txt"),
          "--retain-prompts", str(tmp_path / "r.txt"), "--output-dir", str(out), "--max-steps", "2",
          "--set", "forget_batch_size=2", "--set", "retain_batch_size=2", "--set", "forget_samples_per_prompt=2",
          "--set", "retain_samples_per_prompt=2", "--set", "sample_steps=2", "--set", "eval.forget_samples=2",
          "--set", "eval.retain_samples_per_prompt=1", "--set", "eval.num_inference_steps=2",
          "--set", "saddle.g0_batches=1", "--set", "eval.grid_seeds=2"])
    report = json.loads((out / "report.json").read_text())
    assert report["teacher"] == "shared" and report["steps"] == 2
    assert 0 < report["teacher_extra_bytes"] < report["unet_bytes"] / 5
    # the report names the original it started from (the loaded weights), not the unlearned result
    original = DiffusionPipeline.from_pretrained(tiny_sd_path)
    assert report["original_fingerprint"] == fingerprint([original.unet, original.text_encoder])
    unlearned = DiffusionPipeline.from_pretrained(out)
    assert fingerprint([unlearned.unet, unlearned.text_encoder]) != report["original_fingerprint"]
