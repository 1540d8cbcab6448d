"""The DeepSpeed side of training: process group, DeepSpeed config, the optimizer step guard, the
batched UNet call, collectives that keep ranks in step, and the fault-injection hook the tests use.
Nothing here knows about methods, prompts or output folders."""
from __future__ import annotations

import functools
import json
import os
import signal
import socket
from pathlib import Path

import torch
import torch.distributed as dist

from .config import TrainConfig
from .errors import FastUnlearnError

DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def init_distributed():
    """Plain `python train.py` gets single-process defaults; the deepspeed/torchrun launchers set their own."""
    import deepspeed

    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(port)))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        device = torch.device("cuda", torch.cuda.current_device())
    else:
        device = torch.device("cpu")
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if device.type == "cuda" else "gloo")
    return device, dist.get_rank(), dist.get_world_size()


def default_deepspeed_config(stage: int) -> dict:
    """The DeepSpeed settings used when no `deepspeed_config` is given: the same as the shipped
    `configs/ds_zero{stage}.json` (a test keeps the two equal)."""
    zero: dict = {"stage": stage}
    if stage >= 2:
        zero.update(overlap_comm=True, contiguous_gradients=True, reduce_bucket_size=5e8)
    if stage == 3:
        zero.update(stage3_gather_16bit_weights_on_model_save=True, stage3_param_persistence_threshold=1e5)
    return {"zero_optimization": zero, "zero_allow_untested_optimizer": True, "steps_per_print": 10 ** 9}


def deepspeed_config(cfg: TrainConfig, world_size: int) -> dict:
    """The DeepSpeed config of the run: the user's JSON (or the shipped default for the ZeRO stage) with
    the keys fastunlearn owns filled in. A key set in both places must agree, or it is a one-line error:
    nothing the user wrote is silently ignored."""
    micro = cfg.forget_batch_size + cfg.retain_batch_size
    if cfg.deepspeed_config:
        path = Path(cfg.deepspeed_config)
        if not path.is_file():
            raise FastUnlearnError(f"DeepSpeed config {path} does not exist")
        try:
            ds = json.loads(path.read_text())
        except ValueError as exc:
            raise FastUnlearnError(f"DeepSpeed config {path} is not valid JSON: {exc}") from None
        if not isinstance(ds, dict):
            raise FastUnlearnError(f"DeepSpeed config {path} must be a JSON object")
    else:
        ds = default_deepspeed_config(cfg.zero_stage)
    zero = ds.setdefault("zero_optimization", {})
    if zero.setdefault("stage", cfg.zero_stage) != cfg.zero_stage:
        raise FastUnlearnError(f"DeepSpeed config {cfg.deepspeed_config} says ZeRO stage {zero['stage']} but "
                               f"zero_stage is {cfg.zero_stage}: make them agree")
    expected = micro * cfg.gradient_accumulation_steps * world_size
    for key, want in (("train_micro_batch_size_per_gpu", micro),
                      ("gradient_accumulation_steps", cfg.gradient_accumulation_steps),
                      ("train_batch_size", expected)):
        if key in ds and ds[key] != want:
            raise FastUnlearnError(
                f"DeepSpeed config {key}={ds[key]} contradicts the run: micro-batch {micro} (forget "
                f"{cfg.forget_batch_size} + retain {cfg.retain_batch_size}) x accumulation "
                f"{cfg.gradient_accumulation_steps} x {world_size} processes = {expected}")
        ds[key] = want
    owned = [(ds, "gradient_clipping", "grad_clip", cfg.grad_clip)]
    if "optimizer" in ds:  # DeepSpeed builds it; lr and weight decay still come from the run's config
        if not isinstance(ds["optimizer"], dict):
            raise FastUnlearnError("invalid DeepSpeed config: \"optimizer\" must be a JSON object")
        params = ds["optimizer"].setdefault("params", {})
        owned += [(params, "lr", "lr", cfg.lr), (params, "weight_decay", "weight_decay", cfg.weight_decay)]
    for where, key, ours, want in owned:
        if key in where and where[key] != want:
            name = key if where is ds else f"optimizer.params.{key}"
            raise FastUnlearnError(f"DeepSpeed config {name}={where[key]} contradicts {ours}={want}: "
                                   f"set it in one place (--set {ours}=...)")
        where[key] = want
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("zero_allow_untested_optimizer", True)
    if cfg.mixed_precision == "bf16":
        ds["bf16"] = {"enabled": True}
    elif cfg.mixed_precision == "fp16":
        ds["fp16"] = {"enabled": True, "initial_scale_power": 16}
    if cfg.zero_stage == 3:
        zero.setdefault("stage3_gather_16bit_weights_on_model_save", True)
    return ds


def unet_call(model, items, cond, device, dtype, grad: bool) -> list:
    """One batched UNet call for several (x, t, prompt ids) items; returns one output per item.
    `cond.kwargs(ids)` gives the conditioning (fastunlearn.models.Conditioner or a stand-in)."""
    sizes = [len(x) for x, _, _ in items]
    x = torch.cat([x for x, _, _ in items]).to(device, dtype)
    t = torch.cat([t for _, t, _ in items]).to(device)
    ids = torch.cat([i for _, _, i in items])
    with torch.set_grad_enabled(grad):
        out = model(x, t, **cond.kwargs(ids), return_dict=False)[0]
    return list(out.split(sizes))


def initialize(student, cfg, ds_config: dict):
    """DeepSpeed's engine around `student`, training its parameters that require grad with fastunlearn's AdamW,
    or with the optimizer the DeepSpeed config's "optimizer" section builds (lr and weight decay from `cfg`).
    A config DeepSpeed rejects is a one-line error."""
    import deepspeed

    params = [p for p in student.parameters() if p.requires_grad]
    optimizer = None if "optimizer" in ds_config else torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    try:
        engine, *_ = deepspeed.initialize(model=student, model_parameters=params, optimizer=optimizer, config=ds_config)
    except (ValueError, AssertionError, TypeError) as exc:
        raise FastUnlearnError(f"invalid DeepSpeed config: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return engine


class ModelCalls:
    """A run's batched UNet calls (`unet_call`): the student under DeepSpeed (`student`), the teacher without
    gradients (`teacher`), and the student's module itself, with parameters substituted if given, for a
    method's setup (`module`). `engine` is set once DeepSpeed has wrapped the student."""

    def __init__(self, teacher, cond, device, dtype):
        self.teacher_model, self.cond, self.device, self.dtype, self.engine = teacher, cond, device, dtype, None

    def _call(self, model, items, grad):
        return unet_call(model, items, self.cond, self.device, self.dtype, grad)

    def student(self, *items, grad=True):
        return self._call(self.engine, items, grad)

    def teacher(self, *items):
        return self._call(self.teacher_model, items, False)

    def module(self, items, params=None, grad=True):
        module = self.engine.module
        if params is not None:
            from torch.func import functional_call

            def model(x, t, **kwargs):
                return functional_call(module, params, (x, t), kwargs)
        else:
            model = module
        return self._call(model, items, grad)


class StepGuard:
    """Turns an optimizer's `step` into a no-op (moments and step count untouched) when asked to
    (`skip_next`, set when a loss term is not finite) or when a gradient it receives is not finite.
    It wraps the instance's `step`, so fastunlearn's AdamW and an optimizer DeepSpeed builds from an
    "optimizer" section are guarded alike. DeepSpeed calls that step on the full parameters (ZeRO 0) or
    on each rank's partition (ZeRO 1-3): the decision is all-reduced, so every rank skips together."""

    def __init__(self, optimizer: torch.optim.Optimizer):
        self.optimizer, self.skip_next, self.skipped = optimizer, False, False
        inner = optimizer.step

        @functools.wraps(inner)
        def step(*args, **kwargs):
            with torch.no_grad():
                grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
                bad = self.skip_next or (bool(grads) and not bool(torch.stack([torch.isfinite(g).all() for g in grads]).all()))
            bad = all_reduce(float(bad), "max") > 0
            self.skip_next, self.skipped = False, bad
            return None if bad else inner(*args, **kwargs)

        optimizer.step = step


def fault(point: str, step: int, rank: int, batch=None, model=None):
    """Test hook: FASTUNLEARN_FAULT="point:step[:rank]" with point `kill` (SIGKILL this process when the
    step starts), `checkpoint-written` (SIGKILL after a checkpoint's files are written, before it is
    committed), `nan` (NaN in that step's forget latents) or `nan-grad` (NaN in one gradient element of
    the first trained parameter, the loss staying finite); step `*` is every step."""
    spec = os.environ.get("FASTUNLEARN_FAULT")
    if not spec:
        return
    name, at, *who = spec.split(":")
    if (at != "*" and int(at) != step) or int(who[0] if who else 0) != rank:
        return
    if name == point == "checkpoint-written" or (name == "kill" and point == "batch"):
        os.kill(os.getpid(), signal.SIGKILL)
    if name == "nan" and point == "batch":
        batch.x_f[0].view(-1)[0] = float("nan")
    if name == "nan-grad" and point == "batch":
        param = next(p for p in model.parameters() if p.requires_grad)

        def poison(grad):
            handle.remove()
            grad = grad.clone()
            grad.view(-1)[0] = float("nan")
            return grad

        handle = param.register_hook(poison)


def distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def comm_device() -> torch.device:
    """Where collective tensors must live: NCCL takes only CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce(value: float, op: str = "mean") -> float:
    """`value` reduced over all ranks: "mean" or "max" (itself in a single process)."""
    if distributed():
        t = torch.tensor([float(value)], dtype=torch.float64, device=comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return float(t) / (1 if op == "max" else dist.get_world_size())
    return float(value)


def all_reduce_sum_(t: torch.Tensor) -> None:
    """Sum `t` over all ranks, in place (nothing in a single process)."""
    if distributed():
        dist.all_reduce(t)


def from_rank0(obj):
    """Rank 0's `obj` on every rank (itself in a single process): decisions that read local files are
    taken once, so ranks with different local views cannot diverge."""
    if distributed():
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=comm_device())
        return box[0]
    return obj
