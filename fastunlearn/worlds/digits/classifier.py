"""The digits world's judge: a small CNN trained on the real scikit-learn digits.

It scores generated images (forget/retain accuracy) and its convolutional features serve as
the perceptual network of the digits world's integrity metric (`lpips-digits`).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

IMAGE_SIZE = 32


class DigitClassifier(nn.Module):
    """Input: (B, 1 or 3, H, W) images in [-1, 1] (RGB is averaged, any size is resized to 32x32)."""

    def __init__(self, channels=(16, 32, 64)):
        super().__init__()
        self.channels = tuple(channels)
        c1, c2, c3 = self.channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.head = nn.Linear(c3, 10)

    @staticmethod
    def prepare(images: torch.Tensor) -> torch.Tensor:
        x = images.float()
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)
        if x.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            x = F.interpolate(x, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
        return x

    def features(self, images: torch.Tensor) -> list[torch.Tensor]:
        """The three post-ReLU conv maps: (B,16,32,32), (B,32,16,16), (B,64,8,8)."""
        h1 = F.relu(self.conv1(self.prepare(images)))
        h2 = F.relu(self.conv2(F.max_pool2d(h1, 2)))
        h3 = F.relu(self.conv3(F.max_pool2d(h2, 2)))
        return [h1, h2, h3]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        h3 = self.features(images)[-1]
        return self.head(h3.mean((2, 3)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 512) -> torch.Tensor:
        self.eval()
        return torch.cat([self(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)])

    def save(self, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        save_file({k: v.contiguous() for k, v in self.state_dict().items()}, str(path / "model.safetensors"))
        (path / "config.json").write_text(json.dumps({"channels": list(self.channels)}))

    @classmethod
    def load(cls, path: Path) -> DigitClassifier:
        model = cls(**json.loads((Path(path) / "config.json").read_text()))
        model.load_state_dict(load_file(str(Path(path) / "model.safetensors")))
        return model.eval().requires_grad_(False)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Small random affine jitter (shift, scale, rotation) so generated digits are judged robustly."""
    b = x.shape[0]
    angle = (torch.rand(b, generator=gen) - 0.5) * 0.4
    scale = 1 + (torch.rand(b, generator=gen) - 0.5) * 0.2
    shift = (torch.rand(b, 2, generator=gen) - 0.5) * 0.2
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x + 1, grid, align_corners=False, padding_mode="zeros") - 1


def train_classifier(images, labels, steps: int = 600, batch_size: int = 128, seed: int = 0, progress=None):
    """Train on (N, 1, 32, 32) images in [-1, 1]. Returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = DigitClassifier()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (batch_size,), generator=gen)
        loss = F.cross_entropy(model(_augment(images[idx], gen)), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        if progress is not None:
            progress.update(1)
    return model.eval().requires_grad_(False)
