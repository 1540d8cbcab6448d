"""The teacher-student noise-prediction loss (docs/kernels.md, "noise_prediction_loss"): its plain
PyTorch reference, its input checks and its backend dispatch.

    y_i = Σ_k a[i, k] · T_k[i],   ℓ_i = w_i · (1/D) Σ_j (s[i, j] − y[i, j])²,
    loss = mean_i ℓ_i ("mean"), Σ_i ℓ_i ("sum") or ℓ ("none"),
    ∂loss/∂s = (2 w_i / D) (s − y) (· 1/B for "mean"), accumulated in fp32, in s's dtype.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import FastUnlearnError
from ._dispatch import check_backend, check_tensor, require_finite, resolve_backend, triton_module

OP = "noise_prediction_loss"


def noise_prediction_loss_reference(student, targets, coeffs, weights=None, reduction="mean"):
    """Teacher-student noise-prediction loss, plain PyTorch (the formula above).

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


def _check_inputs(student, targets, coeffs, weights, reduction):
    check_tensor(student, "student", OP)
    if reduction not in ("mean", "sum", "none"):
        raise FastUnlearnError(f"{OP}: unknown reduction {reduction!r} (use mean, sum or none)")
    if not isinstance(targets, Sequence) or isinstance(targets, torch.Tensor) or not 1 <= len(targets) <= 4:
        raise FastUnlearnError(f"{OP}: targets must be a list of 1 to 4 tensors")
    if student.dim() < 1 or student.shape[0] == 0:
        raise FastUnlearnError(f"{OP}: student must be (B, ...) with B >= 1, got {tuple(student.shape)}")
    if student.numel() == 0:
        raise FastUnlearnError(f"{OP}: student has no elements per sample, shape {tuple(student.shape)}")
    for k, t in enumerate(targets):
        check_tensor(t, f"targets[{k}]", OP)
        if t.shape != student.shape:
            raise FastUnlearnError(f"{OP}: targets[{k}] has shape {tuple(t.shape)}, student {tuple(student.shape)}")
        if t.device != student.device:
            raise FastUnlearnError(f"{OP}: targets[{k}] is on {t.device}, student on {student.device}")
        if t.dtype != student.dtype:
            raise FastUnlearnError(f"{OP}: targets[{k}] is {t.dtype}, student {student.dtype}")
    B, K = student.shape[0], len(targets)
    check_tensor(coeffs, "coeffs", OP)
    if tuple(coeffs.shape) != (B, K):
        raise FastUnlearnError(f"{OP}: coeffs must be (B, K) = ({B}, {K}), got {tuple(coeffs.shape)}")
    if weights is not None:
        check_tensor(weights, "weights", OP)
    if weights is not None and tuple(weights.shape) != (B,):
        raise FastUnlearnError(f"{OP}: weights must be (B,) = ({B},), got {tuple(weights.shape)}")


def noise_prediction_loss(student, targets, coeffs, weights=None, reduction="mean", backend="auto",
                          check_finite=True):
    """The loss of the module docstring (docs/kernels.md). Gradients flow to `student` only.

    student: (B, ...) fp32/fp16/bf16; targets: 1-4 tensors like student (same dtype and device);
    coeffs: (B, K); weights: (B,) or None (= ones), negative allowed. Returns fp32: 0-d for
    "mean"/"sum", (B,) for "none".

    check_finite: a non-finite result raises a one-line error naming the input that holds NaN/inf.
    The check reads only the result (one host sync, no extra pass over the inputs unless it fails);
    it is skipped while torch.compile traces. Pass False when the caller handles non-finite losses
    itself (the trainer does: it skips such steps).
    """
    check_backend(backend)
    _check_inputs(student, targets, coeffs, weights, reduction)
    coeffs = coeffs.detach().to(device=student.device, dtype=torch.float32)
    if weights is not None:
        weights = weights.detach().to(device=student.device, dtype=torch.float32)
    targets = [t.detach() for t in targets]
    impl = resolve_backend(backend, student.device, student.dtype, OP)
    if impl == "torch":
        out = noise_prediction_loss_reference(student, targets, coeffs, weights, reduction)
    elif impl == "triton":
        out = triton_module("noise_loss").triton_noise_prediction_loss(student, targets, coeffs, weights, reduction)
    else:
        from .. import _ext

        w = weights if weights is not None else torch.ones(student.shape[0], device=student.device, dtype=torch.float32)
        out = _ext.noise_loss(student, targets, coeffs, w, reduction)
    if check_finite:
        require_finite(out, OP, [("student", student), *((f"targets[{k}]", t) for k, t in enumerate(targets)),
                                 ("coeffs", coeffs), ("weights", weights)])
    return out
