"""Loading of the C++/CUDA ops of csrc/ (torch.ops.fastunlearn.*), their fake kernels and autograd.

The ops come from `fastunlearn._C` (built by setup.py). When that module is missing or fails to
import (e.g. built against another torch), the sources are JIT-built with
torch.utils.cpp_extension.load into TORCH_EXTENSIONS_DIR (default ~/.cache/torch_extensions).
Every failure surfaces as a one-line FastUnlearnError.
"""
from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

from .errors import FastUnlearnError
from .ops._grad import scale_grad

CSRC = Path(__file__).resolve().parent.parent / "csrc"
_NOISE_OP = "fastunlearn::noise_loss_fwd"
_LPIPS_OP = "fastunlearn::lpips_layer_fwd"
REDUCTIONS = {"none": 0, "mean": 1, "sum": 2}

_lock = threading.Lock()
_state: dict = {"cpu": None, "cuda": None, "registered": False, "source": None}


def _first_line(exc: BaseException) -> str:
    """One line for an error message: the first compiler 'error:' line if any, else the last line."""
    lines = [ln.strip() for ln in str(exc).strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if "error:" in ln]
    return f"{type(exc).__name__}: {(errors or lines or [''])[0 if errors else -1]}"[:300]


def _has_kernel(key: str) -> bool:
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(_NOISE_OP, key)
    except RuntimeError:  # op not defined yet
        return False


def cuda_home() -> str | None:
    """CUDA toolkit root: CUDA_HOME / CUDA_PATH, else /usr/local/cuda when it has nvcc."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            return os.environ[var]
    return "/usr/local/cuda" if Path("/usr/local/cuda/bin/nvcc").exists() else None


def cpu_build_args() -> dict:
    return dict(extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"],
                extra_include_paths=[str(CSRC)])


def cuda_build_args() -> dict:
    return dict(extra_cflags=["-O3"], extra_cuda_cflags=["-O3", "-std=c++20", "-lineinfo"],
                extra_include_paths=[str(CSRC)])


def _jit(name: str, sources: list[Path], **kwargs) -> None:
    home = cuda_home()
    if home is not None:
        os.environ.setdefault("CUDA_HOME", home)  # read when cpp_extension is imported
    from torch.utils import cpp_extension

    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        raise FileNotFoundError(f"sources not found: {', '.join(missing)} (install fastunlearn from its source tree)")
    cpp_extension.load(name=name, sources=[str(s) for s in sources], is_python_module=False,
                       verbose=os.environ.get("FASTUNLEARN_VERBOSE_BUILD") == "1", **kwargs)


def _load_cpu() -> None:
    if _state["cpu"] is True:
        return
    if _state["cpu"] is not None:
        raise FastUnlearnError(_state["cpu"])
    try:
        from . import _C  # noqa: F401  (registers the ops)
        _state["source"] = "fastunlearn._C"
    except Exception as compiled_exc:  # missing, or built for another torch (undefined symbol)
        if not _has_kernel("CPU"):
            try:
                _jit("fastunlearn_cpu", [CSRC / "ops.cpp"], **cpu_build_args())
                _state["source"] = "jit"
            except Exception as jit_exc:  # noqa: BLE001
                _state["cpu"] = (f"fastunlearn C++ ops unavailable: fastunlearn._C did not import "
                                 f"({_first_line(compiled_exc)}) and the JIT build failed ({_first_line(jit_exc)}); "
                                 f"reinstall with `pip install -e .` or use backend='torch'")
                raise FastUnlearnError(_state["cpu"]) from None
    _state["cpu"] = True


def _load_cuda() -> None:
    if _state["cuda"] is True:
        return
    if _state["cuda"] is not None:
        raise FastUnlearnError(_state["cuda"])
    if not _has_kernel("CUDA"):
        try:
            from . import _C_cuda  # noqa: F401  (built by setup.py when a CUDA toolkit was found)
        except Exception:  # noqa: BLE001  missing or built for another torch: JIT below
            pass
    if not _has_kernel("CUDA"):
        home = cuda_home()
        try:
            if home is None:
                raise RuntimeError("no CUDA toolkit found (set CUDA_HOME)")
            from torch.utils import cpp_extension

            if cpp_extension.CUDA_HOME is None or not Path(cpp_extension.CUDA_HOME, "bin", "nvcc").exists():
                cpp_extension.CUDA_HOME = home  # it guesses /usr/local when CUDA_HOME is unset
            os.environ.setdefault("CUDA_HOME", home)
            _jit("fastunlearn_cuda", [CSRC / "ops_cuda.cu"], **cuda_build_args())
        except Exception as exc:  # noqa: BLE001
            _state["cuda"] = (f"fastunlearn CUDA ops unavailable: fastunlearn._C_cuda did not import and the JIT "
                              f"build failed ({_first_line(exc)}); use backend='triton' or 'torch'")
            raise FastUnlearnError(_state["cuda"]) from None
    _state["cuda"] = True


def load(cuda: bool = False) -> None:
    """Make torch.ops.fastunlearn.* available (CPU kernels always, CUDA kernels if `cuda`)."""
    if _state["registered"] and _state["cpu"] is True and (not cuda or _state["cuda"] is True):
        return  # fast path, also what torch.compile traces
    _load_slow(cuda)


@torch.compiler.disable  # a graph break the first time only; loading can't be traced
def _load_slow(cuda: bool) -> None:
    with _lock:
        _load_cpu()
        if cuda:
            _load_cuda()
        if not _state["registered"]:
            _register_python_parts()
            _state["registered"] = True


def available(cuda: bool = False) -> bool:
    try:
        load(cuda)
        return True
    except FastUnlearnError:
        return False


def _register_python_parts() -> None:
    """Fake kernels (torch.compile / meta tensors) and autograd for both ops."""

    @torch.library.register_fake(_NOISE_OP)
    def _noise_fake(student, targets, coeffs, weights, reduction, need_grad):
        loss = student.new_empty((student.shape[0],) if reduction == 0 else (), dtype=torch.float32)
        grad = (torch.empty_like(student, memory_format=torch.contiguous_format) if need_grad
                else student.new_empty((0,)))
        return loss, grad

    def _noise_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1])
        ctx.mark_non_differentiable(output[1])
        ctx.n_targets = len(inputs[1])

    def _noise_backward(ctx, grad_loss, _grad_grad):
        (grad,) = ctx.saved_tensors
        if grad.numel() == 0 and grad_loss.numel():
            raise RuntimeError("fastunlearn: noise_loss_fwd ran with need_grad=False; no gradient saved")
        return scale_grad(grad, grad_loss), [None] * ctx.n_targets, None, None, None, None

    torch.library.register_autograd(_NOISE_OP, _noise_backward, setup_context=_noise_setup)

    @torch.library.register_fake(_LPIPS_OP)
    def _lpips_fake(f0, f1, weight, need_grad):
        dist = f0.new_empty((f0.shape[0],), dtype=torch.float32)
        if need_grad:
            return (dist, torch.empty_like(f0, memory_format=torch.contiguous_format),
                    torch.empty_like(f1, memory_format=torch.contiguous_format))
        return dist, f0.new_empty((0,)), f1.new_empty((0,))

    def _lpips_setup(ctx, inputs, output):
        ctx.save_for_backward(output[1], output[2])
        ctx.mark_non_differentiable(output[1], output[2])

    def _lpips_backward(ctx, grad_dist, _g0, _g1):
        g0, g1 = ctx.saved_tensors
        if g0.numel() == 0 and grad_dist.numel():
            raise RuntimeError("fastunlearn: lpips_layer_fwd ran with need_grad=False; no gradient saved")
        return scale_grad(g0, grad_dist), scale_grad(g1, grad_dist), None, None

    torch.library.register_autograd(_LPIPS_OP, _lpips_backward, setup_context=_lpips_setup)


def noise_loss(student, targets, coeffs, weights, reduction):
    """torch.ops.fastunlearn.noise_loss_fwd with autograd; inputs already validated."""
    need_grad = torch.is_grad_enabled() and student.requires_grad
    loss, _ = torch.ops.fastunlearn.noise_loss_fwd(student, list(targets), coeffs, weights,
                                                   REDUCTIONS[reduction], need_grad)
    return loss


def lpips_distance(feats0, feats1, lin_weights):
    """Sum over layers of torch.ops.fastunlearn.lpips_layer_fwd; inputs already validated."""
    total = None
    for f0, f1, w in zip(feats0, feats1, lin_weights):
        need_grad = torch.is_grad_enabled() and (f0.requires_grad or f1.requires_grad)
        d = torch.ops.fastunlearn.lpips_layer_fwd(f0, f1, w, need_grad)[0]
        total = d if total is None else total + d
    return total
