"""Public ops, one module per op (each with its plain PyTorch reference, its input checks and its
backend dispatch): `noise_loss` (noise_prediction_loss, docs/kernels.md) and `lpips`
(lpips_distance, docs/metrics.md). `_dispatch` holds what they share (backends, checks),
`_grad` the one backward helper of every kernel backend.

`backend`: "auto" | "triton" | "cuda" | "cpu" | "torch" (fastunlearn.ops._dispatch, docs/kernels.md).
"""
from ._dispatch import BACKENDS, KERNEL_DTYPES, resolve_backend
from .lpips import lpips_distance, lpips_distance_reference
from .noise_loss import noise_prediction_loss, noise_prediction_loss_reference

__all__ = ["BACKENDS", "KERNEL_DTYPES", "lpips_distance", "lpips_distance_reference", "noise_prediction_loss",
           "noise_prediction_loss_reference", "resolve_backend"]
