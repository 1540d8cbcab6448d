"""The fused per-layer LPIPS distance (docs/metrics.md, "The LPIPS distance"): its plain PyTorch
reference, its input checks and its backend dispatch.

    d = Σ_l mean_hw Σ_c w_c (n0 − n1)²,   n = f / (‖f‖_c + 1e-10)   (‖·‖_c: the norm over channels)

(The module is `lpips`, not `lpips_distance`, so that the function `fastunlearn.ops.lpips_distance`
does not shadow it.)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..errors import FastUnlearnError
from ._dispatch import (
    KERNEL_DTYPES,
    check_backend,
    check_tensor,
    require_finite,
    resolve_backend,
    triton_module,
)

OP = "lpips_distance"


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


def lpips_distance(feats0, feats1, lin_weights, backend="auto", check_finite=True):
    """The distance of the module docstring: lists of (B, C_l, H_l, W_l) maps and (C_l,) weights -> (B,).

    feats0, feats1: lists of (B, C_l, H_l, W_l) maps (fp32/fp16/bf16, one dtype and device per
    layer); lin_weights: (C_l,) weights (or lpips' (1, C_l, 1, 1) conv weights). Returns (B,) fp32,
    differentiable w.r.t. both feature lists. check_finite: as in noise_prediction_loss."""
    check_backend(backend)
    feats0, feats1, flat_weights = _check_inputs(feats0, feats1, lin_weights)
    dtype = next((f.dtype for f in feats0 if f.dtype not in KERNEL_DTYPES), feats0[0].dtype)
    impl = resolve_backend(backend, feats0[0].device, dtype, OP)
    if impl == "torch":
        out = lpips_distance_reference(feats0, feats1, lin_weights)
    elif impl == "triton":  # the kernels take (C,) fp32 weights as constants
        out = triton_module("lpips_distance").triton_lpips_distance(feats0, feats1, flat_weights)
    else:
        from .. import _ext

        out = _ext.lpips_distance(feats0, feats1, flat_weights)
    if check_finite:
        require_finite(out, OP, [*((f"feats0[{l}]", f) for l, f in enumerate(feats0)),
                                 *((f"feats1[{l}]", f) for l, f in enumerate(feats1)),
                                 *((f"lin_weights[{l}]", w) for l, w in enumerate(flat_weights))])
    return out


def _check_inputs(feats0, feats1, lin_weights):
    for name, seq in (("feats0", feats0), ("feats1", feats1), ("lin_weights", lin_weights)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise FastUnlearnError(f"{OP}: {name} must be a list of tensors, got {type(seq).__name__}")
    if not (len(feats0) == len(feats1) == len(lin_weights)) or len(feats0) == 0:
        raise FastUnlearnError(f"{OP}: feats0, feats1 and lin_weights must be non-empty lists of one length")
    device, B = None, None
    weights = []
    for l, (f0, f1, w) in enumerate(zip(feats0, feats1, lin_weights)):
        check_tensor(f0, f"feats0[{l}]", OP)
        check_tensor(f1, f"feats1[{l}]", OP)
        check_tensor(w, f"lin_weights[{l}]", OP)
        if f0.dim() != 4 or f0.shape != f1.shape:
            raise FastUnlearnError(f"{OP}: layer {l}: feature maps must be two (B, C, H, W) tensors of one shape, "
                                   f"got {tuple(f0.shape)} and {tuple(f1.shape)}")
        if f0.dtype != f1.dtype:
            raise FastUnlearnError(f"{OP}: layer {l}: feats0 is {f0.dtype}, feats1 {f1.dtype}")
        device = f0.device if device is None else device
        B = f0.shape[0] if B is None else B
        if f0.device != device or f1.device != device or w.device != device:
            raise FastUnlearnError(f"{OP}: layer {l}: tensors on {f0.device}, {f1.device}, {w.device}; "
                                   f"all must be on {device}")
        if f0.shape[0] != B:
            raise FastUnlearnError(f"{OP}: layer {l} has batch {f0.shape[0]}, layer 0 has {B}")
        if B == 0 or f0.shape[1] == 0 or f0.shape[2] * f0.shape[3] == 0:
            raise FastUnlearnError(f"{OP}: layer {l}: empty feature map {tuple(f0.shape)}")
        if w.numel() != f0.shape[1]:
            raise FastUnlearnError(f"{OP}: layer {l}: lin_weights has {w.numel()} values for {f0.shape[1]} channels")
        weights.append(w.detach().reshape(-1).float())
    return list(feats0), list(feats1), weights
