"""Shared helpers for the kernel tests: backends under test, tolerances, comparisons."""
from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_TRITON = importlib.util.find_spec("triton") is not None
# Every kernel backend that can run on this CPU machine.
KERNEL_BACKENDS = ["cpu"] + (["triton"] if HAS_TRITON else [])
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 1e-5, torch.float16: 1e-2, torch.bfloat16: 1e-2}


def require_interpreter():
    from fastunlearn.kernels import noise_loss

    if not noise_loss.INTERPRET:
        pytest.fail("fastunlearn.kernels was imported before TRITON_INTERPRET=1 was set (tests/kernels/conftest.py)")


def rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    """max |got - ref| / max |ref| (in fp64)."""
    got, ref = got.detach().double(), ref.detach().double()
    assert got.shape == ref.shape, (got.shape, ref.shape)
    assert torch.isfinite(got).all(), "non-finite values"
    return ((got - ref).abs().max() / ref.abs().max().clamp_min(1e-30)).item()


def assert_close(got, ref, dtype, what=""):
    err = rel_err(got, ref)
    assert err <= TOL[dtype], f"{what}: relative error {err:.3g} > {TOL[dtype]:g} ({dtype})"


def noncontiguous(x: torch.Tensor) -> torch.Tensor:
    """The same values as x in a non-contiguous layout (every other channel of a bigger tensor)."""
    big = x.new_empty((x.shape[0], 2 * x.shape[1], *x.shape[2:]))
    y = big[:, ::2]
    y.copy_(x.detach())
    assert not y.is_contiguous() and torch.equal(y, x.detach())
    return y.requires_grad_(x.requires_grad)
