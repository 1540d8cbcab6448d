"""Public ops (SPEC §2, §4) with a plain PyTorch reference and backend dispatch.

`backend`:
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
from collections.abc import Sequence

import torch

from .errors import FastUnlearnError

BACKENDS = ("auto", "triton", "cuda", "cpu", "torch")
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_warned: set[str] = set()
_triton_modules: dict[str, object] = {}


def _triton_module(name: str):
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
        _triton_module("noise_loss")
        return True
    except FastUnlearnError:
        return False


def _warn_once(key: str, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def resolve_backend(backend: str, device: torch.device, dtype: torch.dtype, op: str) -> str:
    """The concrete backend ("triton", "cuda", "cpu" or "torch") that runs `op` on these tensors."""
    if backend not in BACKENDS:
        raise FastUnlearnError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    from . import _ext

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
            _warn_once("cuda", f"fastunlearn: no Triton and no CUDA extension; {op} runs the PyTorch reference")
            return "torch"
        if device.type == "cpu":
            try:
                _ext.load()
                return "cpu"
            except FastUnlearnError as exc:
                _warn_once("cpu", f"{exc}; {op} falls back to the PyTorch reference")
                return "torch"
        return "torch"
    if dtype not in KERNEL_DTYPES:
        raise FastUnlearnError(f"{op}: backend {backend!r} takes float32, float16 or bfloat16, got {dtype}")
    if backend == "triton":
        mod = _triton_module("noise_loss")
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


def _check_tensor(x, name: str, op: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise FastUnlearnError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise FastUnlearnError(f"{op}: {name} must be a floating-point tensor, got {x.dtype}")


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
    op = "noise_prediction_loss"
    _check_tensor(student, "student", op)
    if reduction not in ("mean", "sum", "none"):
        raise FastUnlearnError(f"noise_prediction_loss: unknown reduction {reduction!r} (use mean, sum or none)")
    if not isinstance(targets, Sequence) or isinstance(targets, torch.Tensor) or not 1 <= len(targets) <= 4:
        raise FastUnlearnError("noise_prediction_loss: targets must be a list of 1 to 4 tensors")
    if student.dim() < 1 or student.shape[0] == 0:
        raise FastUnlearnError(f"noise_prediction_loss: student must be (B, ...) with B >= 1, got {tuple(student.shape)}")
    if student.numel() == 0:
        raise FastUnlearnError(f"noise_prediction_loss: student has no elements per sample, shape {tuple(student.shape)}")
    for k, t in enumerate(targets):
        _check_tensor(t, f"targets[{k}]", op)
        if t.shape != student.shape:
            raise FastUnlearnError(
                f"noise_prediction_loss: targets[{k}] has shape {tuple(t.shape)}, student {tuple(student.shape)}")
        if t.device != student.device:
            raise FastUnlearnError(f"noise_prediction_loss: targets[{k}] is on {t.device}, student on {student.device}")
        if t.dtype != student.dtype:
            raise FastUnlearnError(f"noise_prediction_loss: targets[{k}] is {t.dtype}, student {student.dtype}")
    B, K = student.shape[0], len(targets)
    _check_tensor(coeffs, "coeffs", op)
    if tuple(coeffs.shape) != (B, K):
        raise FastUnlearnError(f"noise_prediction_loss: coeffs must be (B, K) = ({B}, {K}), got {tuple(coeffs.shape)}")
    if weights is not None:
        _check_tensor(weights, "weights", op)
    if weights is not None and tuple(weights.shape) != (B,):
        raise FastUnlearnError(f"noise_prediction_loss: weights must be (B,) = ({B},), got {tuple(weights.shape)}")


def noise_prediction_loss(student, targets, coeffs, weights=None, reduction="mean", backend="auto",
                          check_finite=True):
    """See SPEC §2. Gradients flow to `student` only.

    student: (B, ...) fp32/fp16/bf16; targets: 1-4 tensors like student (same dtype and device);
    coeffs: (B, K); weights: (B,) or None (= ones), negative allowed. Returns fp32: 0-d for
    "mean"/"sum", (B,) for "none".

    check_finite: a non-finite result raises a one-line error naming the input that holds NaN/inf.
    The check reads only the result (one host sync, no extra pass over the inputs unless it fails);
    it is skipped while torch.compile traces. Pass False when the caller handles non-finite losses
    itself (the trainer does: it skips such steps).
    """
    if backend not in BACKENDS:
        raise FastUnlearnError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    _check_noise_loss_inputs(student, targets, coeffs, weights, reduction)
    coeffs = coeffs.detach().to(device=student.device, dtype=torch.float32)
    if weights is not None:
        weights = weights.detach().to(device=student.device, dtype=torch.float32)
    targets = [t.detach() for t in targets]
    impl = resolve_backend(backend, student.device, student.dtype, "noise_prediction_loss")
    if impl == "torch":
        out = noise_prediction_loss_reference(student, targets, coeffs, weights, reduction)
    elif impl == "triton":
        out = _triton_module("noise_loss").triton_noise_prediction_loss(student, targets, coeffs, weights, reduction)
    else:
        from . import _ext

        w = weights if weights is not None else torch.ones(student.shape[0], device=student.device, dtype=torch.float32)
        out = _ext.noise_loss(student, targets, coeffs, w, reduction)
    if check_finite:
        _require_finite(out, "noise_prediction_loss", [("student", student), *((f"targets[{k}]", t) for k, t in
                        enumerate(targets)), ("coeffs", coeffs), ("weights", weights)])
    return out


def _require_finite(out: torch.Tensor, op: str, inputs) -> None:
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
    """Per-layer fused LPIPS distance (SPEC §4): lists of (B, C_l, H_l, W_l) maps and (C_l,) weights -> (B,).

    feats0, feats1: lists of (B, C_l, H_l, W_l) maps (fp32/fp16/bf16, one dtype and device per
    layer); lin_weights: (C_l,) weights (or lpips' (1, C_l, 1, 1) conv weights). Returns (B,) fp32,
    differentiable w.r.t. both feature lists. check_finite: as in noise_prediction_loss."""
    if backend not in BACKENDS:
        raise FastUnlearnError(f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}")
    feats0, feats1, flat_weights = _check_lpips_inputs(feats0, feats1, lin_weights)
    dtype = next((f.dtype for f in feats0 if f.dtype not in KERNEL_DTYPES), feats0[0].dtype)
    impl = resolve_backend(backend, feats0[0].device, dtype, "lpips_distance")
    if impl == "torch":
        out = lpips_distance_reference(feats0, feats1, lin_weights)
    elif impl == "triton":  # the kernels take (C,) fp32 weights as constants
        out = _triton_module("lpips_distance").triton_lpips_distance(feats0, feats1, flat_weights)
    else:
        from . import _ext

        out = _ext.lpips_distance(feats0, feats1, flat_weights)
    if check_finite:
        _require_finite(out, "lpips_distance", [*((f"feats0[{l}]", f) for l, f in enumerate(feats0)),
                                                *((f"feats1[{l}]", f) for l, f in enumerate(feats1)),
                                                *((f"lin_weights[{l}]", w) for l, w in enumerate(flat_weights))])
    return out


def _check_lpips_inputs(feats0, feats1, lin_weights):
    op = "lpips_distance"
    for name, seq in (("feats0", feats0), ("feats1", feats1), ("lin_weights", lin_weights)):
        if isinstance(seq, torch.Tensor) or not isinstance(seq, Sequence):
            raise FastUnlearnError(f"{op}: {name} must be a list of tensors, got {type(seq).__name__}")
    if not (len(feats0) == len(feats1) == len(lin_weights)) or len(feats0) == 0:
        raise FastUnlearnError("lpips_distance: feats0, feats1 and lin_weights must be non-empty lists of one length")
    device, B = None, None
    weights = []
    for l, (f0, f1, w) in enumerate(zip(feats0, feats1, lin_weights)):
        _check_tensor(f0, f"feats0[{l}]", op)
        _check_tensor(f1, f"feats1[{l}]", op)
        _check_tensor(w, f"lin_weights[{l}]", op)
        if f0.dim() != 4 or f0.shape != f1.shape:
            raise FastUnlearnError(f"{op}: layer {l}: feature maps must be two (B, C, H, W) tensors of one shape, "
                                   f"got {tuple(f0.shape)} and {tuple(f1.shape)}")
        if f0.dtype != f1.dtype:
            raise FastUnlearnError(f"{op}: layer {l}: feats0 is {f0.dtype}, feats1 {f1.dtype}")
        device = f0.device if device is None else device
        B = f0.shape[0] if B is None else B
        if f0.device != device or f1.device != device or w.device != device:
            raise FastUnlearnError(f"{op}: layer {l}: tensors on {f0.device}, {f1.device}, {w.device}; "
                                   f"all must be on {device}")
        if f0.shape[0] != B:
            raise FastUnlearnError(f"{op}: layer {l} has batch {f0.shape[0]}, layer 0 has {B}")
        if B == 0 or f0.shape[1] == 0 or f0.shape[2] * f0.shape[3] == 0:
            raise FastUnlearnError(f"{op}: layer {l}: empty feature map {tuple(f0.shape)}")
        if w.numel() != f0.shape[1]:
            raise FastUnlearnError(f"{op}: layer {l}: lin_weights has {w.numel()} values for {f0.shape[1]} channels")
        weights.append(w.detach().reshape(-1).float())
    return list(feats0), list(feats1), weights
