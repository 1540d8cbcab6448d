"""Public ops (SPEC §2, §4) with a plain PyTorch reference and backend dispatch.

`backend`: "torch" is the reference; "auto" picks the fastest available backend for the
tensors' device. Compiled / Triton backends are registered by the kernels work.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .errors import FastUnlearnError

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")


def noise_prediction_loss_reference(student, targets, coeffs, weights=None, reduction="mean"):
    """Teacher-student noise-prediction loss, plain PyTorch (SPEC §2).

    student: (B, ...) any float dtype; targets: K <= 4 tensors shaped like student;
    coeffs: (B, K) fp32; weights: (B,) fp32 or None (= ones). Accumulates in fp32.
    Returns a 0-d fp32 tensor ("mean"/"sum") or (B,) fp32 ("none").
    """
    s = student.float()
    y = sum(coeffs[:, k].float().view(-1, *([1] * (s.dim() - 1))) * t.float() for k, t in enumerate(targets))
    per_sample = (s - y).pow(2).flatten(1).mean(1)
    if weights is not None:
        per_sample = per_sample * weights.float()
    if reduction == "mean":
        return per_sample.mean()
    if reduction == "sum":
        return per_sample.sum()
    return per_sample


def _check_noise_loss_inputs(student, targets, coeffs, weights, reduction):
    if reduction not in ("mean", "sum", "none"):
        raise FastUnlearnError(f"noise_prediction_loss: unknown reduction {reduction!r} (use mean, sum or none)")
    if not isinstance(targets, Sequence) or isinstance(targets, torch.Tensor) or not 1 <= len(targets) <= 4:
        raise FastUnlearnError("noise_prediction_loss: targets must be a list of 1 to 4 tensors")
    if student.dim() < 1 or student.shape[0] == 0:
        raise FastUnlearnError(f"noise_prediction_loss: student must be (B, ...) with B >= 1, got {tuple(student.shape)}")
    for k, t in enumerate(targets):
        if t.shape != student.shape:
            raise FastUnlearnError(
                f"noise_prediction_loss: targets[{k}] has shape {tuple(t.shape)}, student {tuple(student.shape)}")
        if t.device != student.device:
            raise FastUnlearnError(f"noise_prediction_loss: targets[{k}] is on {t.device}, student on {student.device}")
        if t.dtype != student.dtype:
            raise FastUnlearnError(f"noise_prediction_loss: targets[{k}] is {t.dtype}, student {student.dtype}")
    B, K = student.shape[0], len(targets)
    if tuple(coeffs.shape) != (B, K):
        raise FastUnlearnError(f"noise_prediction_loss: coeffs must be (B, K) = ({B}, {K}), got {tuple(coeffs.shape)}")
    if weights is not None and tuple(weights.shape) != (B,):
        raise FastUnlearnError(f"noise_prediction_loss: weights must be (B,) = ({B},), got {tuple(weights.shape)}")


def noise_prediction_loss(student, targets, coeffs, weights=None, reduction="mean", backend="auto"):
    """See SPEC §2. Gradients flow to `student` only."""
    if backend not in BACKENDS:
        raise FastUnlearnError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    _check_noise_loss_inputs(student, targets, coeffs, weights, reduction)
    coeffs = coeffs.to(device=student.device, dtype=torch.float32)
    if weights is not None:
        weights = weights.to(device=student.device, dtype=torch.float32)
    targets = [t.detach() for t in targets]
    if backend in ("auto", "torch"):
        return noise_prediction_loss_reference(student, targets, coeffs, weights, reduction)
    raise FastUnlearnError(f"backend {backend!r} is not built in this install; use backend='torch' or 'auto'")


def lpips_distance_reference(feats0, feats1, lin_weights):
    """Sum over layers of mean_hw sum_c w_c (n0 - n1)^2 with n = f / (||f||_c + 1e-10). Returns (B,) fp32."""
    total = None
    for f0, f1, w in zip(feats0, feats1, lin_weights):
        f0, f1 = f0.float(), f1.float()
        n0 = f0 / (f0.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        n1 = f1 / (f1.pow(2).sum(1, keepdim=True).sqrt() + 1e-10)
        d = ((n0 - n1).pow(2) * w.float().view(1, -1, 1, 1)).sum(1).mean((1, 2))
        total = d if total is None else total + d
    return total


def lpips_distance(feats0, feats1, lin_weights, backend="auto"):
    """Per-layer fused LPIPS distance (SPEC §4): lists of (B, C_l, H_l, W_l) maps and (C_l,) weights -> (B,)."""
    if backend not in BACKENDS:
        raise FastUnlearnError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    if not (len(feats0) == len(feats1) == len(lin_weights)) or len(feats0) == 0:
        raise FastUnlearnError("lpips_distance: feats0, feats1 and lin_weights must be non-empty lists of one length")
    if backend in ("auto", "torch"):
        return lpips_distance_reference(feats0, feats1, lin_weights)
    raise FastUnlearnError(f"backend {backend!r} is not built in this install; use backend='torch' or 'auto'")
