"""Metric weights online and offline (issue 15 item 3): LPIPS backbones and torch-fidelity's InceptionV3 are
found at a given path or in the torch hub cache, downloaded there when online, and otherwise refused in one
line naming the file. No network: "online" runs through a stand-in for the download."""
import json

import pytest
import torch

from fastunlearn import metrics
from fastunlearn.errors import FastUnlearnError
from fastunlearn.metrics import INCEPTION_FILE, LPIPS, InceptionFID

ALEX = "alexnet-owt-7be5be79.pth"


def _alexnet_state():
    import torchvision

    torch.manual_seed(0)
    return torchvision.models.alexnet(weights=None).state_dict()


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An empty torch hub folder, offline, with a download that must not happen."""
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded although offline")

    monkeypatch.setattr(metrics, "_download", no_download)
    return tmp_path / "hub" / "checkpoints"


@pytest.fixture(scope="session")
def inception_weights(tmp_path_factory):
    """A random state dict in the format of torch-fidelity's InceptionV3 file (about 96 MB, made once): its
    own module built with the loading skipped, conv weights drawn with He scaling so that features do not vanish."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: None)
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, *a, **k: None)
        state = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"]).state_dict()
    g = torch.Generator().manual_seed(0)
    for k, v in state.items():
        if v.dim() == 4:
            state[k] = torch.randn(v.shape, generator=g) * (2 / v[0].numel()) ** 0.5
    path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
    torch.save(state, path)
    return path


def test_lpips_offline_without_weights_is_one_line_naming_the_file(hub):
    with pytest.raises(FastUnlearnError) as exc:
        LPIPS("alex")
    msg = str(exc.value)
    assert "\n" not in msg
    assert str(hub / ALEX) in msg and "HF_HUB_OFFLINE" in msg
    assert f"curl -fL -o {hub / ALEX} https://download.pytorch.org/models/{ALEX}" in msg
    assert "--lpips-weights" in msg
    with pytest.raises(FastUnlearnError, match="does not exist") as exc:
        LPIPS("alex", backbone_weights=str(hub / "nothing.pth"))
    assert "\n" not in str(exc.value)


def test_lpips_online_download_failure_is_one_line_naming_the_file(hub, monkeypatch):
    import urllib.error

    for var in metrics.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)

    def fail(url, dst, hash_prefix=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure\nin name resolution")

    monkeypatch.setattr(metrics, "_download", fail)
    with pytest.raises(FastUnlearnError, match="download failed") as exc:
        LPIPS("alex")
    assert "\n" not in str(exc.value) and str(hub / ALEX) in str(exc.value)


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_lpips_with_a_weights_path_computes_a_distance(hub, tmp_path, fmt):
    path = tmp_path / f"alex.{fmt}"
    if fmt == "pth":
        torch.save(_alexnet_state(), path)
    else:
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in _alexnet_state().items()}, str(path))
    net = LPIPS("alex", backbone_weights=str(path))
    a, b = torch.rand(2, 3, 64, 64), torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        d = net(a, b, normalize=True).flatten()
        same = net(a, a, normalize=True).flatten()
    assert torch.isfinite(d).all() and (d > 0).all() and torch.allclose(same, torch.zeros(2), atol=1e-6)
    wrong = tmp_path / "wrong.pth"
    torch.save({"features.0.weight": torch.zeros(1)}, wrong)
    with pytest.raises(FastUnlearnError, match="cannot load alexnet weights") as exc:
        LPIPS("alex", backbone_weights=str(wrong))
    assert "\n" not in str(exc.value)


def test_lpips_online_downloads_into_the_cache_once(hub, monkeypatch):
    for var in metrics.OFFLINE_VARS:
        monkeypatch.delenv(var, raising=False)
    calls = []

    def fake_download(url, dst, hash_prefix=None):  # what torch.hub.download_url_to_file would leave behind
        calls.append((url, dst, hash_prefix))
        torch.save(_alexnet_state(), dst)

    monkeypatch.setattr(metrics, "_download", fake_download)
    net = LPIPS("alex")
    assert calls == [(f"https://download.pytorch.org/models/{ALEX}", str(hub / ALEX), "7be5be79")]
    assert (hub / ALEX).is_file()
    LPIPS("alex")  # now from the cache
    assert len(calls) == 1
    with torch.no_grad():
        assert torch.isfinite(net(torch.rand(1, 3, 32, 32), torch.rand(1, 3, 32, 32), normalize=True)).all()


def test_inception_fid_offline_without_weights_is_one_line_naming_the_file(hub):
    with pytest.raises(FastUnlearnError) as exc:
        InceptionFID()
    msg = str(exc.value)
    assert "\n" not in msg and str(hub / INCEPTION_FILE) in msg
    assert f"https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/{INCEPTION_FILE}" in msg
    assert "--fid-weights" in msg


def test_inception_fid_url_is_torch_fidelitys():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert metrics.INCEPTION_URL == URL_INCEPTION_V3


def test_inception_fid_and_kid_with_a_weights_path(hub, inception_weights, tmp_path):
    fid = InceptionFID(str(inception_weights))
    g = torch.Generator().manual_seed(0)
    a, b = torch.rand(3, 3, 32, 32, generator=g), torch.rand(3, 3, 32, 32, generator=g)
    near, far = fid.compare(a, b), fid.compare(a, b * 0.3)
    for res in (near, far):
        assert all(v == v and abs(v) < float("inf") for v in res.values())
    assert far["fid"] > near["fid"] >= 0 and far["kid"] > near["kid"]
    with pytest.raises(FastUnlearnError, match="at least 2 images"):
        fid.compare(a[:1], b)
    wrong = tmp_path / "wrong.pth"
    torch.save({"fc.weight": torch.zeros(3)}, wrong)
    with pytest.raises(FastUnlearnError, match="cannot load InceptionV3 weights") as exc:
        InceptionFID(str(wrong))
    assert "\n" not in str(exc.value)


def test_eval_config_checks_fid_settings(tmp_path):
    from fastunlearn.config import EvalConfig
    from fastunlearn.judges import check_eval_config

    with pytest.raises(FastUnlearnError, match="unknown eval.fid 'clean'"):
        check_eval_config(EvalConfig(fid="clean"), "eval.")
    with pytest.raises(FastUnlearnError, match=r"eval.fid_weights .* is not a file"):
        check_eval_config(EvalConfig(fid="inception", fid_weights=str(tmp_path / "none.pth")), "eval.")
    with pytest.raises(FastUnlearnError, match="set eval.fid=inception"):
        check_eval_config(EvalConfig(fid_weights=str(tmp_path)), "eval.")
    with pytest.raises(FastUnlearnError, match=r"eval.lpips_weights .* is not a file"):
        check_eval_config(EvalConfig(lpips_weights=str(tmp_path / "none.pth")), "eval.")


def _train_argv(tiny_sd_path, tmp_path):
    (tmp_path / "f.txt").write_text("a photo of cat\n")
    (tmp_path / "r.txt").write_text("a photo of dog\n")
    return ["--model", str(tiny_sd_path), "--method", "ovw", "--forget-prompts", str(tmp_path / "f.txt"),
            "--retain-prompts", str(tmp_path / "r.txt"), "--output-dir", str(tmp_path / "out"), "--max-steps", "1",
            "--set", "forget_batch_size=1", "--set", "retain_batch_size=1", "--set", "forget_samples_per_prompt=1",
            "--set", "retain_samples_per_prompt=1", "--set", "sample_steps=2", "--set", "eval.forget_samples=2",
            "--set", "eval.retain_samples_per_prompt=2", "--set", "eval.num_inference_steps=2",
            "--set", "eval.grid_seeds=2", "--set", "eval.every=0", "--set", "eval.early_every=0"]


def test_training_with_fid_inception_offline_and_no_weights_fails_before_training(tiny_sd_path, tmp_path, hub,
                                                                                   monkeypatch, capsys):
    from fastunlearn.train import main

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    with pytest.raises(SystemExit) as exc:
        main([*_train_argv(tiny_sd_path, tmp_path), "--set", "eval.fid=inception"])
    assert exc.value.code == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the progress bars
    assert len(err) == 1 and err[0].startswith("fastunlearn: error: FID (Inception")
    assert str(hub / INCEPTION_FILE) in err[0]
    assert not (tmp_path / "out" / "report.json").exists() and not (tmp_path / "out" / "checkpoints").exists()


def test_training_reports_inception_fid_with_fid_weights(tiny_sd_path, tmp_path, hub, inception_weights,
                                                         monkeypatch):
    from fastunlearn.train import main

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    main([*_train_argv(tiny_sd_path, tmp_path), "--fid-weights", str(inception_weights)])
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["fid_network"] == "inception"
    for key in ("fid_retain", "kid_retain", "kid_retain_std"):
        assert isinstance(report[key], float) and report[key] == report[key]
    assert not any("FID (Inception) not computed" in n for n in report["notes"])
    assert any("integrity not computed" in n and "too small" in n for n in report["notes"])  # tiny images


def test_evaluate_cli_reports_inception_fid_with_fid_weights(tiny_sd_path, tmp_path, hub, inception_weights,
                                                              monkeypatch, capsys):
    from diffusers import DiffusionPipeline

    from fastunlearn.evaluate import main

    monkeypatch.setenv("FASTUNLEARN_CACHE", str(tmp_path / "cache"))
    pipe = DiffusionPipeline.from_pretrained(tiny_sd_path)
    pipe.unet.register_to_config(sample_size=32)  # 64 px images: big enough for LPIPS
    pipe.save_pretrained(tmp_path / "model")
    (tmp_path / "p.txt").write_text("a photo of cat\n")
    common = ["--original", str(tmp_path / "model"), "--unlearned", str(tmp_path / "model"), "--prompts",
              str(tmp_path / "p.txt"), "--seeds", "2", "--steps", "2"]
    # offline with no LPIPS backbone: one line naming the file, before any sampling
    with pytest.raises(SystemExit) as exc:
        main([*common, "--out", str(tmp_path / "ev0")])
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]  # not the progress bars
    assert exc.value.code == 2 and len(err) == 1 and err[0].startswith("fastunlearn: error: LPIPS-alex")
    assert str(hub / ALEX) in err[0] and not (tmp_path / "ev0").exists()
    alex = tmp_path / "alex.pth"
    torch.save(_alexnet_state(), alex)
    assert main([*common, "--lpips-weights", str(alex), "--fid-weights", str(inception_weights),
                 "--out", str(tmp_path / "ev")]) == 0
    report = json.loads((tmp_path / "ev" / "report.json").read_text())
    assert report["fid_network"] == "inception" and abs(report["fid_retain"]) < 1e-3  # the same model twice
    assert report["integrity_retain"] == pytest.approx(0, abs=1e-6)
    assert not any("FID (Inception) not computed" in n for n in report["notes"])
