"""Fused per-layer LPIPS distance (docs/metrics.md, "The LPIPS distance") in Triton.

For each spatial position: n = f / (||f||_c + 1e-10), d = sum_c w_c (n0 - n1)^2; the layer
distance is the spatial mean of d. The normalised maps are never written: a program owns a
block of positions of one sample and walks the channels twice (norms, then distance), and a
third time to write the analytic gradients when they are needed. Backward only scales the
saved gradients by grad_output (B,).

Gradient, with a = 1/(r0 + eps), r0 = ||f0||_c, g_c = 2 w_c (n0_c - n1_c):
    dd/df0_j = a (g_j - (f0_j / r0) * sum_c g_c n0_c)
    dd/df1_j = b (-g_j + (f1_j / r1) * sum_c g_c n1_c)
At r = 0 (an all-zero feature vector, common after ReLU) the second term is taken as 0,
where PyTorch autograd of the reference gives NaN.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from fastunlearn.ops._grad import scale_grad

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
EPS = 1e-10


@triton.jit
def _lpips_layer_kernel(
    F0, F1, W, PARTIAL, G0, G1,
    C, HW, N_BLOCKS, GRAD_SCALE,
    BLOCK_C: tl.constexpr, BLOCK_HW: tl.constexpr, NEED_GRAD: tl.constexpr,
):
    pid = tl.program_id(0)
    b = tl.program_id(1)
    offs_hw = pid * BLOCK_HW + tl.arange(0, BLOCK_HW)
    mask_hw = offs_hw < HW
    base = b.to(tl.int64) * C * HW

    ss0 = tl.zeros([BLOCK_HW], dtype=tl.float32)
    ss1 = tl.zeros([BLOCK_HW], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c[:, None] < C) & mask_hw[None, :]
        ptr = base + offs_c[:, None].to(tl.int64) * HW + offs_hw[None, :]
        f0 = tl.load(F0 + ptr, mask=mask, other=0.0).to(tl.float32)
        f1 = tl.load(F1 + ptr, mask=mask, other=0.0).to(tl.float32)
        ss0 += tl.sum(f0 * f0, axis=0)
        ss1 += tl.sum(f1 * f1, axis=0)
    r0 = tl.sqrt(ss0)
    r1 = tl.sqrt(ss1)
    a0 = 1.0 / (r0 + 1e-10)
    a1 = 1.0 / (r1 + 1e-10)

    dist = tl.zeros([BLOCK_HW], dtype=tl.float32)
    p0 = tl.zeros([BLOCK_HW], dtype=tl.float32)
    p1 = tl.zeros([BLOCK_HW], dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        mask = (offs_c[:, None] < C) & mask_hw[None, :]
        ptr = base + offs_c[:, None].to(tl.int64) * HW + offs_hw[None, :]
        w = tl.load(W + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
        n0 = tl.load(F0 + ptr, mask=mask, other=0.0).to(tl.float32) * a0[None, :]
        n1 = tl.load(F1 + ptr, mask=mask, other=0.0).to(tl.float32) * a1[None, :]
        diff = n0 - n1
        wd = w[:, None] * diff
        dist += tl.sum(wd * diff, axis=0)
        if NEED_GRAD:
            p0 += tl.sum(wd * n0, axis=0)
            p1 += tl.sum(wd * n1, axis=0)
    tl.store(PARTIAL + b * N_BLOCKS + pid, tl.sum(dist, axis=0))

    if NEED_GRAD:
        inv_r0 = tl.where(r0 > 0, 1.0 / tl.where(r0 > 0, r0, 1.0), 0.0)
        inv_r1 = tl.where(r1 > 0, 1.0 / tl.where(r1 > 0, r1, 1.0), 0.0)
        k0 = 2.0 * p0 * inv_r0
        k1 = 2.0 * p1 * inv_r1
        s0 = a0 * GRAD_SCALE
        s1 = a1 * GRAD_SCALE
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            mask = (offs_c[:, None] < C) & mask_hw[None, :]
            ptr = base + offs_c[:, None].to(tl.int64) * HW + offs_hw[None, :]
            w = tl.load(W + offs_c, mask=offs_c < C, other=0.0).to(tl.float32)
            f0 = tl.load(F0 + ptr, mask=mask, other=0.0).to(tl.float32)
            f1 = tl.load(F1 + ptr, mask=mask, other=0.0).to(tl.float32)
            g = 2.0 * w[:, None] * (f0 * a0[None, :] - f1 * a1[None, :])
            g0 = s0[None, :] * (g - f0 * k0[None, :])
            g1 = s1[None, :] * (f1 * k1[None, :] - g)
            tl.store(G0 + ptr, g0.to(G0.dtype.element_ty), mask=mask)
            tl.store(G1 + ptr, g1.to(G1.dtype.element_ty), mask=mask)


def lpips_layer_forward(f0, f1, weight, need_grad=True):
    """f0, f1 (B, C, H, W) fp32/fp16/bf16 (same dtype); weight (C,). Returns (dist (B,) fp32,
    grad_f0, grad_f1) with the gradients of dist.sum() in the feature dtype, or None."""
    B, C, H, W = f0.shape
    HW = H * W
    f0, f1 = f0.contiguous(), f1.contiguous()
    weight = weight.contiguous().float()
    if INTERPRET:
        block_hw = min(triton.next_power_of_2(HW), 4096)
        block_c = min(triton.next_power_of_2(C), max(1, (1 << 19) // block_hw))
        num_warps = 4
    else:
        block_hw = min(max(triton.next_power_of_2(HW), 32), 128)
        block_c = 16
        num_warps = 4
    n_blocks = triton.cdiv(HW, block_hw)
    partial = torch.empty((B, n_blocks), device=f0.device, dtype=torch.float32)
    g0 = torch.empty_like(f0) if need_grad else None
    g1 = torch.empty_like(f1) if need_grad else None
    _lpips_layer_kernel[(n_blocks, B)](
        f0, f1, weight, partial, g0 if need_grad else f0, g1 if need_grad else f1,
        C, HW, n_blocks, 1.0 / HW,
        BLOCK_C=block_c, BLOCK_HW=block_hw, NEED_GRAD=need_grad, num_warps=num_warps,
    )
    return partial.sum(1) / HW, g0, g1


class LPIPSLayerDistanceFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, f0, f1, weight):
        need = ctx.needs_input_grad
        dist, g0, g1 = lpips_layer_forward(f0, f1, weight, need_grad=need[0] or need[1])
        ctx.save_for_backward(*([g0, g1] if g0 is not None else []))
        return dist

    @staticmethod
    def backward(ctx, grad_output):
        g0, g1 = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (scale_grad(g0, grad_output) if need[0] else None,
                scale_grad(g1, grad_output) if need[1] else None, None)


def triton_lpips_distance(feats0, feats1, lin_weights):
    """Inputs already validated by fastunlearn.ops. Returns (B,) fp32 summed over layers."""
    total = None
    for f0, f1, w in zip(feats0, feats1, lin_weights):
        d = LPIPSLayerDistanceFunction.apply(f0, f1, w.reshape(-1))
        total = d if total is None else total + d
    return total
