"""What every op shares: backend names and resolution, input checks, the finiteness check, the
one-time warning and the lazy loading of the Triton kernels (fastunlearn.kernels).

Backends (docs/kernels.md):
* "torch": the plain PyTorch reference (any device, any float dtype);
* "triton": the fused Triton kernels of fastunlearn.kernels (CUDA tensors; CPU tensors only
  under the Triton interpreter, TRITON_INTERPRET=1 set before the first import);
* "cuda" / "cpu": the C++ ops of csrc/ (torch.ops.fastunlearn.*, see fastunlearn/_ext.py);
* "auto": Triton for CUDA tensors (the CUDA op if Triton is missing), the C++ op for CPU
  tensors; falls back to "torch" with a one-time warning when neither can be loaded.
"""
from __future__ import annotations

import importlib
import os
import warnings

import torch

from ..errors import FastUnlearnError

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned: set[str] = set()
_triton_modules: dict[str, object] = {}


def triton_module(name: str):
    """fastunlearn.kernels.<name>, or a FastUnlearnError saying why it can't be used."""
    if name not in _triton_modules:
        try:
            _triton_modules[name] = importlib.import_module(f"fastunlearn.kernels.{name}")
        except ImportError as exc:
            _triton_modules[name] = FastUnlearnError(f"backend 'triton' unavailable: {exc} (pip install triton)")
    mod = _triton_modules[name]
    if isinstance(mod, FastUnlearnError):
        raise mod
    return mod


def _triton_ok() -> bool:
    try:
        triton_module("noise_loss")
        return True
    except FastUnlearnError:
        return False


def warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def check_backend(backend: str) -> None:
    if backend not in BACKENDS:
        raise FastUnlearnError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, op: str) -> str:
    """The concrete backend ("triton", "cuda", "cpu" or "torch") that runs `op` on these tensors."""
    check_backend(backend)
    from .. import _ext

    if backend == "torch":
        return "torch"
    if backend == "auto":
        if dtype not in KERNEL_DTYPES:
            return "torch"
        if device.type == "cuda":
            if _triton_ok():
                return "triton"
            if _ext.available(cuda=True):
                return "cuda"
            warn_once("cuda", f"fastunlearn: no Triton and no CUDA extension; {op} runs the PyTorch reference")
            return "torch"
        if device.type == "cpu":
            try:
                _ext.load()
                return "cpu"
            except FastUnlearnError as exc:
                warn_once("cpu", f"{exc}; {op} falls back to the PyTorch reference")
                return "torch"
        return "torch"
    if dtype not in KERNEL_DTYPES:
        raise FastUnlearnError(f"{op}: backend {backend!r} takes float32, float16 or bfloat16, got {dtype}")
    if backend == "triton":
        mod = triton_module("noise_loss")
        if device.type == "cpu" and not mod.INTERPRET:
            raise FastUnlearnError(
                f"{op}: backend 'triton' needs CUDA tensors, or TRITON_INTERPRET=1 set before fastunlearn.kernels "
                f"is imported to interpret on the CPU (TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', 'unset')})")
        if device.type not in ("cuda", "cpu"):
            raise FastUnlearnError(f"{op}: backend 'triton' needs CUDA tensors, got {device}")
        return "triton"
    if backend == "cuda":
        if device.type != "cuda":
            raise FastUnlearnError(f"{op}: backend 'cuda' needs CUDA tensors, got {device}; use backend='cpu' or 'auto'")
        _ext.load(cuda=True)
        return "cuda"
    if device.type != "cpu":
        raise FastUnlearnError(f"{op}: backend 'cpu' needs CPU tensors, got {device}; use backend='auto'")
    _ext.load()
    return "cpu"


def check_tensor(x, name: str, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise FastUnlearnError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise FastUnlearnError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")


def require_finite(out: torch.Tensor, op: str, inputs) -> None:
    """Raise a one-line error if `out` holds NaN/inf, naming the first input that does (not while
    torch.compile traces: a data-dependent check would break the graph)."""
    if torch.compiler.is_compiling() or bool(torch.isfinite(out.detach()).all()):
        return
    for name, t in inputs:
        if t is None:
            continue
        n = int((~torch.isfinite(t.detach())).sum())
        if n:
            raise FastUnlearnError(f"{op}: {name} has {n} non-finite value(s) (NaN or inf)")
    raise FastUnlearnError(f"{op}: the result is not finite although every input is (values too large for the dtype?)")
