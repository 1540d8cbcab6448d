import lpips
import pytest
import torch

from fastunlearn.errors import FastUnlearnError
from fastunlearn.metrics import LPIPS, TORCHVISION_FILES, mean_ci95


def _torchvision_state(ref, arch):
    """The random backbone of a reference lpips.LPIPS as a torchvision state dict."""
    import torchvision

    tv = getattr(torchvision.models, arch)(weights=None)
    for i in range(1, ref.L + 1):
        for idx, module in getattr(ref.net, f"slice{i}").named_children():
            tv.features[int(idx)].load_state_dict(module.state_dict())
    return tv.state_dict()


@pytest.mark.parametrize("net", ["alex", "vgg", "squeeze"])
def test_lpips_equals_the_lpips_package(net, tmp_path):
    torch.manual_seed(0)
    ref = lpips.LPIPS(net=net, pnet_rand=True, verbose=False).eval()
    path = tmp_path / "backbone.pth"
    torch.save(_torchvision_state(ref, TORCHVISION_FILES[net][0]), path)
    ours = LPIPS(net, backbone_weights=str(path))
    for batch, (h, w) in [(1, (64, 64)), (7, (67, 45)), (2, (96, 80))]:
        x0, x1 = torch.rand(batch, 3, h, w) * 2 - 1, torch.rand(batch, 3, h, w) * 2 - 1
        with torch.no_grad():
            torch.testing.assert_close(ours(x0, x1), ref(x0, x1), rtol=1e-5, atol=1e-5)
            a, b = (x0 + 1) / 2, (x1 + 1) / 2
            torch.testing.assert_close(ours(a, b, normalize=True), ref(a, b, normalize=True), rtol=1e-5, atol=1e-5)


def test_lpips_without_backbone_weights_is_one_line_error(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(FastUnlearnError, match="pretrained alexnet weights") as exc:
        LPIPS("alex")
    assert "\n" not in str(exc.value)
    with pytest.raises(FastUnlearnError, match="unknown LPIPS network"):
        LPIPS("resnet")


def test_mean_ci95():
    m, h = mean_ci95(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert m == 2.5 and h == pytest.approx(1.96 * torch.tensor([1.0, 2.0, 3.0, 4.0]).std().item() / 2)


def test_frechet_distance():
    from fastunlearn.metrics import frechet_distance

    g = torch.Generator().manual_seed(0)
    a = torch.randn(400, 8, generator=g)
    assert abs(frechet_distance(a, a)) < 1e-6
    shifted = frechet_distance(a, a + 1.0)
    assert shifted == pytest.approx(8.0, rel=1e-6)  # mean shift of 1 in 8 dims, same covariance
    b = torch.randn(400, 8, generator=g) * 2
    assert frechet_distance(a, b) > 1.0


def _tiny_clip(path):
    from fastunlearn.testing import tiny_clip

    return tiny_clip(path)


def test_clip_score_from_a_local_model(tmp_path):
    from transformers import CLIPModel

    from fastunlearn.metrics import CLIPScore

    path = _tiny_clip(tmp_path / "clip")
    score = CLIPScore(str(path))
    g = torch.Generator().manual_seed(1)
    images = torch.rand(3, 3, 45, 67, generator=g)
    prompts = ["a photo of cat", "a photo of dog", "a car"]
    got = score(images, prompts)
    assert got.shape == (3,) and (got >= 0).all() and (got <= 100).all()
    # by hand: the same embeddings through the model's own projection heads
    model = CLIPModel.from_pretrained(path).eval()
    inputs = score.processor(text=prompts, images=list(images), return_tensors="pt", padding=True, do_rescale=False)
    with torch.no_grad():
        out = model(**inputs)
    want = 100 * torch.nn.functional.cosine_similarity(out.image_embeds, out.text_embeds).clamp(min=0)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-4)
    with pytest.raises(FastUnlearnError, match="does not exist"):
        CLIPScore(str(tmp_path / "none"))


def test_evaluate_cli_reports_clip_score_and_notes(tiny_sd_path, tmp_path):
    import json
    import subprocess
    import sys

    from diffusers import DiffusionPipeline

    pipe = DiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.unet.register_to_config(sample_size=32)  # 64 px images: big enough for AlexNet
    pipe.save_pretrained(tmp_path / "model")
    clip = _tiny_clip(tmp_path / "clip")
    (tmp_path / "p.txt").write_text("a photo of cat\n")
    env = {"HF_HUB_OFFLINE": "1", "FASTUNLEARN_CACHE": str(tmp_path / "cache"), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "fastunlearn.evaluate", "--original", str(tmp_path / "model"),
                           "--unlearned", str(tmp_path / "model"), "--prompts", str(tmp_path / "p.txt"), "--seeds", "2",
                           "--steps", "2", "--backbone-weights", str(_alex(tmp_path)), "--clip-model", str(clip),
                           "--out", str(tmp_path / "ev")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["clip_score_original"] == pytest.approx(report["clip_score_unlearned"])  # the same model twice
    assert 0 <= report["clip_score_original"] <= 100
    assert any("FID (Inception) not computed" in n for n in report["notes"])


def _alex(tmp_path):
    import torchvision

    path = tmp_path / "alex.pth"
    torch.save(torchvision.models.alexnet(weights=None).state_dict(), path)
    return path


def test_training_report_has_clip_scores_with_a_local_clip_model(tiny_sd_path, tmp_path, monkeypatch):
    import json

    from fastunlearn.train import main

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    clip = _tiny_clip(tmp_path / "clip")
    (tmp_path / "f.txt").write_text("a photo of cat\n")
    (tmp_path / "r.txt").write_text("a photo of dog\n")
    out = tmp_path / "out"
    main(["--model", str(tiny_sd_path), "--method", "ovw", "--forget-prompts", str(tmp_path / "f.txt"), "--retain-prompts",
          str(tmp_path / "r.txt"), "--output-dir", str(out), "--max-steps", "1", "--set", "forget_batch_size=1",
          "--set", "retain_batch_size=1", "--set", "forget_samples_per_prompt=1", "--set", "retain_samples_per_prompt=1",
          "--set", "sample_steps=2", "--set", "eval.forget_samples=2", "--set", "eval.retain_samples_per_prompt=2",
          "--set", "eval.num_inference_steps=2", "--set", "eval.grid_seeds=2", "--set", f"eval.clip_model={clip}"])
    report = json.loads((out / "report.json").read_text())
    for key in ("clip_score_retain", "clip_score_forget", "base_clip_score_retain", "base_clip_score_forget"):
        assert 0 <= report[key] <= 100
    assert not any("CLIPScore not computed" in n for n in report["notes"])
