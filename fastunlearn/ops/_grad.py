"""The one backward helper shared by every kernel backend (Triton and C++/CUDA): torch only, so that
fastunlearn.kernels and fastunlearn._ext can import it without importing anything else."""
from __future__ import annotations

import torch


def _is_all_ones(t: torch.Tensor) -> bool:
    """True if t is all ones; False whenever that can't be known without data (tracing, fake tensors)."""
    if torch.compiler.is_compiling():
        return False
    from torch._subclasses.fake_tensor import is_fake

    if is_fake(t):
        return False
    return bool(torch.equal(t, torch.ones_like(t)))


def scale_grad(grad: torch.Tensor, grad_output: torch.Tensor) -> torch.Tensor:
    """grad * grad_output in fp32, in grad's dtype (a (B,) grad_output scales per sample); skipped when
    grad_output is all ones. The kernels compute the gradient in the forward pass; backward only scales it."""
    if _is_all_ones(grad_output):
        return grad
    go = grad_output.float().view(-1, *([1] * (grad.dim() - 1))) if grad_output.dim() else grad_output.float()
    return grad * go if grad.dtype == torch.float32 else (grad.float() * go).to(grad.dtype)
