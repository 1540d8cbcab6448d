"""The integrity metric I (SPEC §4) and the perceptual networks behind it.

I = mean over (prompt, seed) of LPIPS(teacher image, student image), the two images drawn from
the same initial latent with the same deterministic sampler, reported with a 95 % half-width.
Perceptual networks have a `features(images)` step and a `distance(f0, f1)` step so that the
teacher's features can be computed once and reused.
"""
from __future__ import annotations

import math

import torch

from .errors import FastUnlearnError
from .ops import lpips_distance


def mean_ci95(values: torch.Tensor) -> tuple[float, float]:
    """Mean and the 95 % half-width of the mean (normal approximation)."""
    v = values.double().flatten()
    if v.numel() == 0:
        return float("nan"), float("nan")
    half = 1.96 * float(v.std(unbiased=True)) / math.sqrt(v.numel()) if v.numel() > 1 else float("nan")
    return float(v.mean()), half


class DigitsPerceptual(torch.nn.Module):
    """`lpips-digits`: the digit classifier's three conv maps with uniform (all-ones) channel weights."""

    name = "lpips-digits"

    def __init__(self, classifier):
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.lin_weights = [torch.ones(c) for c in classifier.channels]

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """images: (B, 3, H, W) in [0, 1]."""
        return self.classifier.features(images * 2 - 1)

    def distance(self, f0, f1) -> torch.Tensor:
        return lpips_distance(f0, f1, [w.to(f0[0].device) for w in self.lin_weights])


class PackageLPIPS(torch.nn.Module):
    """LPIPS v0.1 through the `lpips` package; needs the torchvision backbone weights locally."""

    def __init__(self, net: str = "alex"):
        super().__init__()
        import lpips

        self.name = f"lpips-{net}"
        try:
            self.model = lpips.LPIPS(net=net, verbose=False).eval().requires_grad_(False)
        except Exception as exc:  # torchvision tries to download the backbone and fails offline
            raise FastUnlearnError(
                f"LPIPS {net} needs torchvision's pretrained {net} weights in the local torch cache "
                f"(~/.cache/torch/hub/checkpoints), which are not there ({type(exc).__name__}); "
                "copy them there from a machine with network access") from None

    @torch.no_grad()
    def features(self, images):
        x = self.model.scaling_layer(images * 2 - 1)
        return list(self.model.net(x))

    def distance(self, f0, f1):
        weights = [lin.model[-1].weight.flatten() for lin in self.model.lins]
        return lpips_distance(f0, f1, weights)


def integrity(perceptual, teacher_images: torch.Tensor, student_images: torch.Tensor, teacher_features=None,
              batch_size: int = 256) -> dict:
    """Per-sample LPIPS between paired images (N, 3, H, W in [0, 1]); returns mean, ci95 and values."""
    if teacher_images.shape != student_images.shape:
        raise FastUnlearnError(f"integrity: teacher images {tuple(teacher_images.shape)} and student images "
                               f"{tuple(student_images.shape)} differ in shape")
    values = []
    for i in range(0, len(student_images), batch_size):
        f1 = perceptual.features(student_images[i:i + batch_size])
        f0 = ([f[i:i + batch_size] for f in teacher_features] if teacher_features is not None
              else perceptual.features(teacher_images[i:i + batch_size]))
        values.append(perceptual.distance(f0, f1).float().cpu())
    values = torch.cat(values)
    mean, half = mean_ci95(values)
    return {"mean": mean, "ci95": half, "values": values}
