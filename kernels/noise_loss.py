"""Fused teacher-student noise-prediction loss (docs/kernels.md, "noise_prediction_loss") in Triton.

One pass over memory: each program reads a block of the student and of the K targets,
builds the target on the fly, writes the (already scaled) gradient w.r.t. the student and
one fp32 partial sum of squares. Backward only scales the saved gradient by grad_output.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastunlearn.ops._grad import scale_grad

# The interpreter cost grows with the number of programs, so it gets one big block per sample.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}


@triton.jit
def _noise_loss_fwd_kernel(
    S, T0, T1, T2, T3, COEFFS, WEIGHTS, GRAD, PARTIAL,
    D, N_CHUNKS, GRAD_SCALE,
    K: tl.constexpr, BLOCK: tl.constexpr, NEED_GRAD: tl.constexpr,
):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    offs = chunk * BLOCK + tl.arange(0, BLOCK)
    mask = offs < D
    base = b.to(tl.int64) * D
    s = tl.load(S + base + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(COEFFS + b * K) * tl.load(T0 + base + offs, mask=mask, other=0.0).to(tl.float32)
    if K > 1:
        y += tl.load(COEFFS + b * K + 1) * tl.load(T1 + base + offs, mask=mask, other=0.0).to(tl.float32)
    if K > 2:
        y += tl.load(COEFFS + b * K + 2) * tl.load(T2 + base + offs, mask=mask, other=0.0).to(tl.float32)
    if K > 3:
        y += tl.load(COEFFS + b * K + 3) * tl.load(T3 + base + offs, mask=mask, other=0.0).to(tl.float32)
    diff = s - y  # masked lanes are 0 - 0
    tl.store(PARTIAL + b * N_CHUNKS + chunk, tl.sum(diff * diff, axis=0))
    if NEED_GRAD:
        g = diff * (tl.load(WEIGHTS + b) * GRAD_SCALE)
        tl.store(GRAD + base + offs, g.to(GRAD.dtype.element_ty), mask=mask)


def noise_loss_forward(student, targets, coeffs, weights, reduction="mean", need_grad=True):
    """student (B, ...) fp32/fp16/bf16; targets: 1-4 tensors like student; coeffs (B, K) fp32;
    weights (B,) fp32. Returns (loss, grad): loss fp32, 0-d for mean/sum or (B,) for none;
    grad shaped like student in its dtype (already scaled for the reduction), or None."""
    B, K = student.shape[0], len(targets)
    s = student.contiguous()
    ts = [t.contiguous() for t in targets]
    D = s.numel() // B
    if INTERPRET:
        block = min(triton.next_power_of_2(D), 1 << 17)
        num_warps = 4
    else:
        block, num_warps = (4096, 8) if D >= 4096 else (max(triton.next_power_of_2(D), 128), 4)
    n_chunks = triton.cdiv(D, block)
    partial = torch.empty((B, n_chunks), device=s.device, dtype=torch.float32)
    grad = torch.empty_like(s) if need_grad else None
    coeffs = coeffs.contiguous().float()
    weights = weights.contiguous().float()
    grad_scale = 2.0 / D / (B if reduction == "mean" else 1)
    ptrs = ts + [ts[0]] * (4 - K)
    _noise_loss_fwd_kernel[(n_chunks, B)](
        s, *ptrs, coeffs, weights, grad if need_grad else s, partial,
        D, n_chunks, grad_scale,
        K=K, BLOCK=block, NEED_GRAD=need_grad, num_warps=num_warps,
    )
    per_sample = partial.sum(1) * weights / D
    if reduction == "mean":
        loss = per_sample.mean()
    elif reduction == "sum":
        loss = per_sample.sum()
    else:
        loss = per_sample
    return loss, grad


class NoisePredictionLossFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, coeffs, weights, reduction, *targets):
        loss, grad = noise_loss_forward(student, targets, coeffs, weights, reduction,
                                        need_grad=ctx.needs_input_grad[0])
        if grad is not None:
            ctx.save_for_backward(grad)
        ctx.n_targets = len(targets)
        return loss

    @staticmethod
    def backward(ctx, grad_output):
        (grad,) = ctx.saved_tensors
        return (scale_grad(grad, grad_output), None, None, None, *([None] * ctx.n_targets))


def triton_noise_prediction_loss(student, targets, coeffs, weights=None, reduction="mean"):
    """Inputs already validated by fastunlearn.ops; weights None means ones."""
    if weights is None:
        weights = torch.ones(student.shape[0], device=student.device, dtype=torch.float32)
    return NoisePredictionLossFunction.apply(student, coeffs, weights, reduction, *targets)
