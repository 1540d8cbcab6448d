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
