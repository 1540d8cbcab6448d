#!/usr/bin/env python
"""Unlearn a concept from a diffusers SD / SDXL pipeline under DeepSpeed ZeRO.

    python fastunlearn/train.py                       # digits world: forget 3 with Saddle
    python fastunlearn/train.py --config configs/digits.yaml --method ovw
    deepspeed --num_gpus 2 fastunlearn/train.py --config configs/sdxl-saddle-zero2.yaml

Reads top to bottom: config -> pipeline -> teacher (frozen copy) and student (DeepSpeed) ->
data (teacher-sampled latents, or images) -> loop -> evaluation -> save_pretrained + report.
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as a script: keep fastunlearn/ itself off sys.path (its modules are not top-level)
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

import argparse  # noqa: E402
import copy  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import shutil  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from fastunlearn.config import TrainConfig, load_config, read_prompts, set_dotted  # noqa: E402
from fastunlearn.errors import FastUnlearnError, cli_errors  # noqa: E402
from fastunlearn.models import SharedTeacher  # noqa: E402
from fastunlearn.outputs import RunFolder, strict_json  # noqa: E402

log = logging.getLogger("fastunlearn")
DTYPES = {"no": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------------------
# Command line


def build_parser() -> argparse.ArgumentParser:
    d = TrainConfig()
    p = argparse.ArgumentParser(
        prog="fastunlearn/train.py",
        description="Make a diffusers Stable Diffusion / SDXL pipeline forget a concept. With no arguments: the "
                    "embedded digits world, forgetting the digit 3 with Saddle. Flags override the config file.")
    p.add_argument("--config", default=None, help="YAML config file (keys as in fastunlearn/config.py; default: none, the built-in defaults)")
    def flag(name, help, type=str):
        key = name.lstrip("-").replace("-", "_")
        p.add_argument(name, type=type, default=None, help=f"{help} (default: {getattr(d, key)!r})")

    flag("--model", "local diffusers pipeline folder, cached hub id, or 'digits'")
    flag("--method", "saddle | ovw | esd | erasediff | salun | ga | ca")
    flag("--params", "trained parameters: full | attn2 | non-attn2")
    flag("--forget-prompts", "forget prompts: a text file (one per line) or one prompt; digits world: from --forget-digit")
    flag("--retain-prompts", "retain prompts: a text file (one per line) or one prompt; digits world: the other digits")
    flag("--anchor-prompts", "anchor prompt(s) for forget_target=anchor and ca: a file or one prompt")
    flag("--forget-digit", "digits world: the digit to forget", int)
    flag("--output-dir", "where the pipeline, report.json, grid.png, train.log and checkpoints go")
    flag("--max-steps", "optimiser steps", int)
    flag("--zero-stage", "DeepSpeed ZeRO stage 0-3", int)
    flag("--seed", "seed of data order, noise and timesteps", int)
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --output-dir (default: refuse)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config key, dotted for sections, e.g. --set saddle.tau=0.1 --set lr=1e-4")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    return p


def config_from_args(argv=None) -> TrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    for flag in ("model", "method", "params", "forget_prompts", "retain_prompts", "anchor_prompts", "forget_digit",
                 "output_dir", "max_steps", "zero_stage", "seed"):
        if getattr(args, flag) is not None:
            setattr(cfg, flag, getattr(args, flag))
    if args.overwrite:
        cfg.overwrite = True
    for item in args.set:
        if "=" not in item:
            raise FastUnlearnError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        set_dotted(cfg, key, value)
    return cfg.validate()


# ---------------------------------------------------------------------------------------------------------
# Distributed setup


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


# ---------------------------------------------------------------------------------------------------------
# Prompts and data


def resolve_prompts(cfg: TrainConfig):
    """(forget, retain, anchors, digits-info). The digits world has defaults from --forget-digit."""
    forget = read_prompts(cfg.forget_prompts, "forget prompt")
    retain = read_prompts(cfg.retain_prompts, "retain prompt")
    for which, folder in (("forget", cfg.forget_data_dir), ("retain", cfg.retain_data_dir)):
        if folder:
            from fastunlearn.data import read_image_folder

            captions = list(dict.fromkeys(read_image_folder(folder, which)[1]))
            if which == "forget":
                if forget is not None:
                    raise FastUnlearnError("give forget prompts or a forget image folder (its captions), not both")
                forget = captions
            else:
                if retain is not None:
                    raise FastUnlearnError("give retain prompts or a retain image folder (its captions), not both")
                retain = captions
    digits = None
    if cfg.model == "digits":
        from fastunlearn.digits import digit_of_prompt, digit_prompts

        if forget is None:
            forget = digit_prompts(cfg.forget_digit)
        labels = {digit_of_prompt(p) for p in forget}
        if len(labels) == 1 and None not in labels:
            d = labels.pop()
            if retain is None:
                retain = [p for k in range(10) if k != d for p in digit_prompts(k)]
            digits = {"forget_digit": d}
    if forget is None:
        raise FastUnlearnError(f"no forget prompts given for model {cfg.model!r}: use --forget-prompts FILE")
    retain = retain or []
    if cfg.method != "esd" and not retain:
        raise FastUnlearnError(f"method {cfg.method} needs retain prompts: use --retain-prompts FILE")
    both = sorted(set(forget) & set(retain))
    if both:
        raise FastUnlearnError(f"prompt {both[0]!r} is in both the forget and the retain set")
    anchors = read_prompts(cfg.anchor_prompts, "anchor prompt") if cfg.anchor_prompts is not None else [""]
    if len(anchors) == 1:
        anchors = anchors * len(forget)
    if len(anchors) != len(forget):
        raise FastUnlearnError(f"got {len(anchors)} anchor prompts for {len(forget)} forget prompts (give one, or one each)")
    return forget, retain, anchors, digits


def teacher_latents(pipe, prompts, per_prompt, steps, guidance, cache_key, cfg: TrainConfig, rank):
    """Data-free mode: x_0 latents sampled once from the teacher per prompt, cached on disk, reused."""
    from safetensors.torch import load_file, save_file

    from fastunlearn.evaluate import sample_sharded
    from fastunlearn.paths import cache_root, ensure_writable_dir
    from fastunlearn.sampling import SamplerConfig

    folder = ensure_writable_dir(cache_root(cfg.cache_dir) / "teacher-latents") if rank == 0 else None
    path = cache_root(cfg.cache_dir) / "teacher-latents" / f"{cache_key}.safetensors"
    lat = None
    if rank == 0 and path.is_file():
        try:
            lat = load_file(str(path))["latents"]
        except Exception:  # a partial file from an interrupted run: sample again
            lat = None
    lat = _from_rank0(lat)  # rank 0 decides for all: caches may be node-local, and sampling is collective
    if lat is not None:
        return lat
    all_prompts = [p for p in prompts for _ in range(per_prompt)]
    seeds = [10_000 + i for p in prompts for i in range(per_prompt)]
    lat = sample_sharded(pipe, all_prompts, seeds, SamplerConfig(steps, guidance), output_type="latent")
    if rank == 0:
        tmp = folder / f".{path.name}.tmp-{os.getpid()}"
        save_file({"latents": lat.contiguous()}, str(tmp))
        os.replace(tmp, path)
    return lat


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


# ---------------------------------------------------------------------------------------------------------
# Numerical guard and fault injection


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
            bad = _all_reduce(float(bad), "max") > 0
            self.skip_next, self.skipped = False, bad
            return None if bad else inner(*args, **kwargs)

        optimizer.step = step


def _fault(point: str, step: int, rank: int, batch=None, model=None):
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


# ---------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    def __init__(self, cfg: TrainConfig):
        from fastunlearn.methods import make_method

        self.cfg = cfg
        self.t_start = time.time()
        self.method = make_method(cfg)
        forget, retain, anchors, self.digits = resolve_prompts(cfg)
        if self.method.needs_full_gradient and cfg.zero_stage == 3:
            raise FastUnlearnError(f"method {cfg.method} needs full gradients/weights on every rank, which ZeRO-3 "
                                   "partitions: use --zero-stage 2")
        self.out = Path(cfg.output_dir)
        self.rank = int(os.environ.get("RANK", "0"))  # the launcher's; the process group comes later
        self.notes, self._pending_log = [], []
        # The output folder is locked for the life of the run, but nothing in it is moved or deleted
        # until every input below has been checked (RunFolder.prepare, at the start of train()).
        self.folder = RunFolder(self.out, cfg.to_dict(), cfg.overwrite, rank0=self.rank == 0)
        self.folder.check_path()
        self.folder.lock()
        try:
            self.folder.plan()
            self._build(forget, retain, anchors)
        except BaseException:
            self.folder.abandon()
            raise

    def _build(self, forget, retain, anchors):
        """Load and check everything the run needs: pipeline, process group, DeepSpeed config, teacher,
        conditioning, data, engine. Writes nothing to the output folder."""
        from fastunlearn.models import Conditioner, fingerprint, load_pipeline, param_subset, prompt_overflow

        cfg = self.cfg
        self.dtype = DTYPES[cfg.mixed_precision]
        self.pipe = load_pipeline(cfg.model, torch_dtype=self.dtype, cache_dir=cfg.cache_dir)  # bad paths fail first
        for msg in prompt_overflow(self.pipe, forget + retain + anchors):
            self.warn(msg)
            self.note(msg)
        self.device, self.rank, self.world = init_distributed()
        self.ds_config = deepspeed_config(cfg, self.world)  # a contradictory config fails before any sampling
        self.pipe.to(self.device)
        self.forget, self.retain, self.anchors = forget, retain, anchors
        self.scheduler = self.pipe.scheduler
        self.prediction_type = self.scheduler.config.prediction_type

        # teacher: the original model, made before DeepSpeed sees the student. With a parameter subset it
        # shares every frozen weight with the student (SharedTeacher); else a frozen copy in the working dtype.
        self.student = self.pipe.unet
        trained = set(param_subset(self.student, cfg.params))
        share = cfg.teacher == "shared" or (cfg.teacher == "auto" and cfg.params != "full" and cfg.zero_stage < 3)
        self.teacher = (SharedTeacher(self.student, trained) if share
                        else copy.deepcopy(self.pipe.unet).eval().requires_grad_(False))
        for name, p in self.student.named_parameters():
            p.requires_grad_(name in trained)
        if cfg.gradient_checkpointing:
            self.student.enable_gradient_checkpointing()
        self.student.train()
        self.cond = Conditioner(self.pipe, forget + retain + anchors, self.device, self.dtype)

        # data: x_0 latents per row with the prompt of each row; images (data mode) or teacher samples (data-free)
        key = fingerprint(self.teacher, {"model": cfg.model, "steps": cfg.sample_steps, "g": cfg.eval.guidance_scale})
        self.fingerprint = key
        self.lat_f, rows_f = self.latents("forget", forget, cfg.forget_data_dir, cfg.forget_samples_per_prompt, key)
        self.ids_f = self.cond.ids(rows_f)
        anchor_of = dict(zip(forget, anchors))
        self.anchor_ids = self.cond.ids([anchor_of[p] for p in rows_f])
        self.lat_r, self.ids_r = None, None
        if retain:
            self.lat_r, rows_r = self.latents("retain", retain, cfg.retain_data_dir, cfg.retain_samples_per_prompt, key)
            self.ids_r = self.cond.ids(rows_r)

        import deepspeed

        params = [p for p in self.student.parameters() if p.requires_grad]
        optimizer = None  # with an "optimizer" section DeepSpeed builds it (lr and weight decay from cfg)
        if "optimizer" not in self.ds_config:
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        try:
            self.engine, self.optimizer, _, _ = deepspeed.initialize(
                model=self.student, model_parameters=params, optimizer=optimizer, config=self.ds_config)
        except (ValueError, AssertionError, TypeError) as exc:
            raise FastUnlearnError(f"invalid DeepSpeed config: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
        self.guard = StepGuard(self.engine.basic_optimizer)  # the optimizer DeepSpeed steps, whoever built it
        self.step = 0
        self.history = []
        self.steps_to_converge = None
        self.nonfinite_in_row = 0
        self.skipped_steps = []

    def latents(self, which, prompts, folder, per_prompt, key):
        """(x_0 latents (N, C, h, w) fp32 CPU, the prompt of each row)."""
        if folder:
            from fastunlearn.data import encode_latents, load_images, read_image_folder

            paths, captions = read_image_folder(folder, which)
            size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
            return encode_latents(self.pipe, load_images(paths, size)), captions
        lat = teacher_latents(self.teacher_pipe(), prompts, per_prompt, self.cfg.sample_steps,
                              self.cfg.eval.guidance_scale, f"{key}-{which[0]}-{_hash(prompts, per_prompt)}",
                              self.cfg, self.rank)
        return lat, [p for p in prompts for _ in range(per_prompt)]

    # ---- model calls -----------------------------------------------------------------------------
    def _call(self, model, items, grad):
        return unet_call(model, items, self.cond, self.device, self.dtype, grad)

    def student_call(self, *items, grad=True):
        return self._call(self.engine, items, grad)

    def teacher_call(self, *items):
        return self._call(self.teacher, items, False)

    def inner_forget_value(self, fn, items_f, steps, lr):
        """EraseDiff's f̂: K SGD steps on the forget loss from the current weights, on a functional copy."""
        from torch.func import functional_call

        module = self.engine.module
        params = {n: p.detach().clone() for n, p in module.named_parameters() if p.requires_grad}
        x, t, ids = items_f
        kwargs = self.cond.kwargs(ids)
        x = x.to(self.device, self.dtype)
        for _ in range(steps):
            for p in params.values():
                p.requires_grad_(True)
            out = functional_call(module, params, (x, t.to(self.device)), {**kwargs, "return_dict": False})[0]
            grads = torch.autograd.grad(fn(out), list(params.values()))
            params = {n: (p - lr * g).detach() for (n, p), g in zip(params.items(), grads)}
        with torch.no_grad():
            out = functional_call(module, params, (x, t.to(self.device)), {**kwargs, "return_dict": False})[0]
            return fn(out).detach()

    # ---- batches ---------------------------------------------------------------------------------
    def _output_target(self, x0, noise, t):
        if self.prediction_type == "v_prediction":
            return self.scheduler.get_velocity(x0, noise, t)
        if self.prediction_type == "sample":
            return x0
        return noise

    def make_step(self, step: int, micro: int):
        """The micro-batch of (step, micro, rank): a pure function of the seed, so a resumed run sees the same data."""
        from fastunlearn.methods import Step

        g = torch.Generator().manual_seed(hash((self.cfg.seed, step, micro, self.rank)) & (2 ** 63 - 1))
        cfg, T = self.cfg, self.scheduler.config.num_train_timesteps
        i_f = torch.randint(0, len(self.lat_f), (cfg.forget_batch_size,), generator=g)
        x0_f = self.lat_f[i_f]
        if self.lat_r is not None:
            i_r = torch.randint(0, len(self.lat_r), (cfg.retain_batch_size,), generator=g)
            x0_r, c_r = self.lat_r[i_r], self.ids_r[i_r]
        else:
            x0_r, c_r = x0_f[:0], self.ids_f[:0]
        n_f, n_r, fresh = (torch.randn(x.shape, generator=g) for x in (x0_f, x0_r, x0_f))
        t_f = torch.randint(0, T, (len(x0_f),), generator=g)
        t_r = torch.randint(0, T, (len(x0_r),), generator=g)
        alt = (self.ids_r[torch.randint(0, len(self.ids_r), (len(x0_f),), generator=g)]
               if self.ids_r is not None else self.ids_f[i_f])
        items_f = (self.scheduler.add_noise(x0_f, n_f, t_f), t_f, self.ids_f[i_f])
        dev = lambda x: x.to(self.device, self.dtype)  # noqa: E731
        return Step(
            x_f=items_f[0], x_r=self.scheduler.add_noise(x0_r, n_r, t_r), t_f=t_f, t_r=t_r, c_f=self.ids_f[i_f],
            c_r=c_r, a_f=self.anchor_ids[i_f], alt_r=alt, eps_f=dev(self._output_target(x0_f, n_f, t_f)),
            eps_r=dev(self._output_target(x0_r, n_r, t_r)), fresh_f=dev(self._output_target(x0_f, fresh, t_f)),
            student=self.student_call, teacher=self.teacher_call,
            inner_forget_value=lambda fn, k, lr: self.inner_forget_value(fn, items_f, k, lr))

    def measure_forget_gap(self, batches: int) -> float:
        """G at θ0 (student = teacher), averaged over `batches` fixed forget batches and all ranks."""
        from fastunlearn.methods import mse

        total = 0.0
        for b in range(batches):
            st = self.make_step(-1 - b, 0)
            T_c, T_null, *extra = self.teacher_call((st.x_f, st.t_f, st.c_f), (st.x_f, st.t_f, st.null(len(st.x_f))),
                                                    *self.method.forget_teacher_items(st))
            targets, coeffs = self.method.forget_target(st, extra, T_null)
            total += float(mse(T_c, targets, coeffs))
        return _all_reduce(total / batches)

    def apply_saliency_mask(self, ratio: float, batches: int = 4):
        """SalUn: keep the top `ratio` of weights by |∇ forget loss| (denoising loss on forget data)."""
        from fastunlearn.methods import mse

        module = self.engine.module
        params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
        grads = [torch.zeros_like(p, dtype=torch.float32) for _, p in params]
        for b in range(batches):
            st = self.make_step(-100 - b, 0)
            (s_f,) = self._call(module, [(st.x_f, st.t_f, st.c_f)], True)  # bypass the engine's backward hooks
            for acc, gr in zip(grads, torch.autograd.grad(mse(s_f, [st.eps_f]), [p for _, p in params])):
                acc += gr.float().abs()
        if self.world > 1:
            for gr in grads:
                dist.all_reduce(gr)
        flat = torch.cat([gr.flatten() for gr in grads])
        k = max(1, int(flat.numel() * (1 - ratio)))
        threshold = flat.kthvalue(k).values if k < flat.numel() else flat.max()
        self.masks = [(gr > threshold) for gr in grads]
        for (_, p), m in zip(params, self.masks):
            p.register_hook(lambda g, m=m: g * m.to(g.dtype))
        self.mask_fraction = float(sum(m.sum() for m in self.masks) / flat.numel())

    # ---- evaluation ------------------------------------------------------------------------------
    def build_evaluator(self, final: bool):
        from fastunlearn.evaluate import Evaluator
        from fastunlearn.sampling import SamplerConfig

        e = self.cfg.eval
        sampler = SamplerConfig(e.num_inference_steps, e.guidance_scale)
        n_f = e.forget_samples if final else e.train_forget_samples
        n_r = e.retain_samples_per_prompt if final else e.train_retain_samples_per_prompt
        if self.digits is not None:
            from fastunlearn.digits import eval_pairs, load_world
            from fastunlearn.metrics import DigitsPerceptual

            d = self.digits["forget_digit"]
            world = load_world(self.cfg.cache_dir, progress=False)
            forget = eval_pairs([d], n_f)
            retain = eval_pairs([k for k in range(10) if k != d], n_r)
            from fastunlearn.digits import load_digit_images

            images, labels = load_digit_images()
            real = ((images[labels != d] + 1) / 2).expand(-1, 3, -1, -1)
            return Evaluator(self.teacher_pipe(), forget[:2], retain[:2], sampler, DigitsPerceptual(world.classifier),
                             world.classifier, forget_label=d, retain_labels=retain[2], real_retain=real,
                             clip=self.clip_scorer())
        forget = ([self.forget[i % len(self.forget)] for i in range(n_f)], list(range(n_f)))
        retain = ([p for p in self.retain for _ in range(n_r)], [s for _ in self.retain for s in range(n_r)])
        perceptual = None
        self.note("FID (Inception) not computed: fastunlearn does not ship Inception-FID weights and does not "
                  "download them; fid-digits exists only in the digits world")
        try:
            from fastunlearn.metrics import LPIPS

            perceptual = LPIPS("alex")
            size = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
            if size < 32:
                raise FastUnlearnError(f"{size} px images are too small for LPIPS-alex")
        except FastUnlearnError as exc:
            perceptual = None
            self.note(f"integrity not computed: {exc}")
        return Evaluator(self.teacher_pipe(), forget, retain, sampler, perceptual, clip=self.clip_scorer())

    def note(self, text: str):
        if text not in self.notes:
            self.notes.append(text)

    def clip_scorer(self):
        if not self.cfg.eval.clip_model:
            self.note("CLIPScore not computed: no local CLIP model given (eval.clip_model)")
            return None
        if not hasattr(self, "_clip"):
            from fastunlearn.metrics import CLIPScore

            self._clip = CLIPScore(self.cfg.eval.clip_model, device=self.device)
        return self._clip

    def teacher_pipe(self):
        from fastunlearn.evaluate import with_unet

        return with_unet(self.pipe, self.teacher)

    def student_pipe(self):
        from fastunlearn.evaluate import with_unet

        return with_unet(self.pipe, self.engine.module)

    def evaluate(self, evaluator):
        self.engine.module.eval()
        metrics, images = evaluator.evaluate(self.student_pipe())
        self.engine.module.train()
        return metrics, images

    def forgotten(self, metrics) -> bool:
        if "forget_accuracy" in metrics:
            return metrics["forget_accuracy"] <= self.cfg.eval.forget_threshold
        return False

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self):
        """A DeepSpeed checkpoint under `.partial-step-N`, renamed to `step-N` and named in `latest` once
        every rank has written its shard (fastunlearn.checkpoint): a kill at any moment leaves the last
        complete checkpoint intact."""
        from fastunlearn.checkpoint import PARTIAL, commit

        state = {"step": self.step, "method": self.method.state_dict(), "history": self.history,
                 "steps_to_converge": self.steps_to_converge, "torch_rng": torch.get_rng_state(),
                 "nonfinite_in_row": self.nonfinite_in_row, "skipped_steps": self.skipped_steps}
        ckpt, tag = self.out / "checkpoints", f"step-{self.step}"
        self.engine.save_checkpoint(str(ckpt), tag=PARTIAL + tag, client_state=state, save_latest=False)  # ends in a barrier
        _fault("checkpoint-written", self.step, self.rank)
        if self.rank == 0:  # keep the newest `keep_checkpoints`: SDXL optimizer states are tens of GB each
            commit(ckpt, tag, self.cfg.keep_checkpoints)
        if self.world > 1:
            dist.barrier()

    def maybe_resume(self) -> bool:
        """Continue from the last complete checkpoint in output_dir (weights, optimizer, method state,
        step and so data order, RNG); partial ones from a killed run are ignored with a warning."""
        from fastunlearn.checkpoint import check_no_code, latest_complete, partial_checkpoints

        ckpt = self.out / "checkpoints"
        partial, tag = _from_rank0((partial_checkpoints(ckpt), latest_complete(ckpt)) if self.rank == 0 else None)
        if partial:
            self.warn(f"ignoring incomplete checkpoint(s) {', '.join(p.name for p in partial)} left by an interrupted run")
            if self.world > 1:
                dist.barrier()  # every rank has listed them before rank 0 removes them
            if self.rank == 0:
                for p in partial:
                    shutil.rmtree(p, ignore_errors=True)
        if tag is None:
            return False
        check_no_code(ckpt / tag)
        path, state = self.engine.load_checkpoint(str(ckpt), tag=tag)
        if path is None:
            raise FastUnlearnError(f"checkpoint {ckpt / tag} could not be loaded; delete it to start over")
        self.step = state["step"]
        self.method.load_state_dict(state["method"])
        self.history = state["history"]
        self.steps_to_converge = state["steps_to_converge"]
        self.nonfinite_in_row = state.get("nonfinite_in_row", 0)
        self.skipped_steps = state.get("skipped_steps", [])
        torch.set_rng_state(state["torch_rng"])
        self.log(f"resumed from {path} at step {self.step}")
        if self.rank == 0:
            print(f"fastunlearn: resuming from {ckpt / tag} (step {self.step} of {self.cfg.max_steps})", file=sys.stderr)
        return True

    def warn(self, msg: str):
        if self.rank == 0:
            print(f"fastunlearn: warning: {msg}", file=sys.stderr)
        self.log(f"warning: {msg}")

    # ---- the loop --------------------------------------------------------------------------------
    def log(self, msg: str):
        if self.rank != 0:
            return
        self._pending_log.append(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
        if self.folder.action_done:  # before that the folder may still hold the run being replaced
            with open(self.out / "train.log", "a") as f:
                f.writelines(self._pending_log)
            self._pending_log.clear()

    def train(self):
        """Train, evaluate and publish. Only now is the output folder changed (RunFolder.prepare)."""
        try:
            self.folder.prepare()
            if self.world > 1:
                dist.barrier()  # the folder is ready before any rank writes a checkpoint into it
            self.log("output folder ready")
            self._train()
        finally:
            self.folder.release()

    def _train(self):
        cfg = self.cfg
        self.method.setup(self)
        self.maybe_resume()
        self.log(f"method {cfg.method} on {cfg.model}, params {cfg.params}, ZeRO {cfg.zero_stage}, "
                 f"{self.world} process(es), {sum(p.numel() for p in self.student.parameters() if p.requires_grad)} trained parameters")
        group = self.engine.basic_optimizer.param_groups[0]
        self.log(f"optimizer {type(self.engine.basic_optimizer).__name__} (built by "
                 f"{'DeepSpeed' if 'optimizer' in self.ds_config else 'fastunlearn'}), lr {group['lr']:g}, "
                 f"weight_decay {group.get('weight_decay', 0):g}, gradient_clipping {self.ds_config['gradient_clipping']:g}")
        evaluator = self.build_evaluator(final=False) if cfg.eval.every else None
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"unlearning ({cfg.method})", disable=self.rank != 0)
        while self.step < cfg.max_steps:
            logs, bad_terms = {}, []
            for micro in range(cfg.gradient_accumulation_steps):
                st = self.make_step(self.step, micro)
                _fault("batch", self.step, self.rank, st, self.engine.module)
                loss, terms = self.method.loss(st)
                values = {**{k: float(v.detach()) for k, v in terms.items()}, "loss": float(loss.detach())}
                nonfinite = [k for k, v in values.items() if not math.isfinite(v)]
                if _all_reduce(float(bool(nonfinite)), "max") > 0:  # every rank skips together
                    bad_terms += [k for k in nonfinite if k not in bad_terms] or ["(another rank)"]
                    self.guard.skip_next = True  # backward still runs (DeepSpeed's bookkeeping); the update does not
                self.guard.skipped = False
                self.engine.backward(loss)
                self.engine.step()
                for k, v in values.items():
                    logs[k] = logs.get(k, 0.0) + v / cfg.gradient_accumulation_steps
            self.guard.skip_next = False
            self.step += 1
            bar.update(1)
            skipped = self.guard.skipped or bool(getattr(self.engine.optimizer, "overflow", False) and cfg.mixed_precision != "fp16")
            if bad_terms or skipped:
                self.nonfinite_step(bad_terms)
                continue
            self.nonfinite_in_row = 0
            logs = {k: _all_reduce(v) for k, v in logs.items()}
            self.method.after_step(logs, self.step)
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k in ("loss", "lam", "gap", "G", "R")})
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self.log(f"step {self.step} " + " ".join(f"{k}={v:.5g}" for k, v in logs.items()))
            if evaluator is not None and self.step % cfg.eval.every == 0 and self.step < cfg.max_steps:
                metrics, _ = self.evaluate(evaluator)
                self.history.append({"step": self.step, **metrics, **{k: logs[k] for k in ("lam", "gap") if k in logs}})
                self.log(f"eval step {self.step} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
                if self.steps_to_converge is None and self.forgotten(metrics):
                    self.steps_to_converge = self.step
                    if cfg.eval.stop_when_forgotten:
                        self.log(f"forget criterion met at step {self.step}: stopping early")
                        break
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.max_steps:
                self.save_checkpoint()
        bar.close()
        self.finish()

    def nonfinite_step(self, bad_terms):
        """A step whose loss or gradient was not finite: no update was made; stop after too many in a row."""
        cfg = self.cfg
        self.nonfinite_in_row += 1
        self.skipped_steps.append(self.step)
        what = (f"non-finite loss term {', '.join(bad_terms)}" if bad_terms else "non-finite gradient (loss finite)")
        self.warn(f"step {self.step}: {what} with method {cfg.method}; step skipped, no update "
                  f"({self.nonfinite_in_row} in a row, limit {cfg.max_nonfinite_steps})")
        if self.nonfinite_in_row >= cfg.max_nonfinite_steps:
            raise FastUnlearnError(
                f"stopped at step {self.step}: {self.nonfinite_in_row} steps in a row had a {what} "
                f"(method {cfg.method}); the last complete checkpoint is in {self.out / 'checkpoints'}. "
                "Try a lower lr, mixed_precision=no, or check the data")

    def finish(self):
        cfg = self.cfg
        evaluator = self.build_evaluator(final=True)
        metrics, images = self.evaluate(evaluator)
        base = evaluator.base()
        self.history.append({"step": self.step, "final": True, **metrics})
        if self.steps_to_converge is None and self.forgotten(metrics):
            self.steps_to_converge = self.step
        unet = self.final_unet()  # collective under ZeRO-3
        if self.rank != 0:
            return
        t_imgs, _ = evaluator.teacher()
        shared = isinstance(self.teacher, SharedTeacher)
        report = {
            "method": cfg.method, "model": cfg.model, "params": cfg.params, "forget_target": cfg.forget_target,
            "forget_prompts": self.forget, "retain_prompts_count": len(self.retain), "anchor_prompts": sorted(set(self.anchors)),
            "steps": self.step, "steps_to_converge": self.steps_to_converge,
            "wall_time_s": round(time.time() - self.t_start, 1),
            **metrics, **base,
            "perceptual_network": evaluator.perceptual.name if evaluator.perceptual else None,
            "eval": {"forget_samples": len(evaluator.forget[0]), "retain_samples": len(evaluator.retain[0]),
                     "sampler": evaluator.sampler.to_dict()},
            "zero_stage": cfg.zero_stage, "world_size": self.world, "mixed_precision": cfg.mixed_precision,
            "history": self.history, "notes": self.notes, "skipped_steps": self.skipped_steps,
            "teacher": "shared" if shared else "copy",
            "teacher_extra_bytes": (self.teacher.extra_bytes() if shared else
                                    sum(p.numel() * p.element_size() for p in self.teacher.parameters())),
            "unet_bytes": sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in self.student.parameters()),
        }
        if self.digits is not None:
            report["forget_digit"] = self.digits["forget_digit"]
            report["world"] = "digits (fastunlearn embedded world)"
        if hasattr(self.method, "constraint_met_step"):
            report.update(constraint_met_step=self.method.constraint_met_step, final_lambda=self.method.lam,
                          G0=self.method.g0, tau=self.method.tau)
        if hasattr(self, "mask_fraction"):
            report["salun_mask_fraction"] = self.mask_fraction
        self.save_outputs(report, t_imgs, images, evaluator, unet)

    def final_unet(self):
        """The trained UNet with full weights (gathered from all ranks under ZeRO-3; None off rank 0)."""
        if self.cfg.zero_stage != 3:
            return self.engine.module
        state = self.engine._zero3_consolidated_16bit_state_dict()
        if self.rank != 0:
            return None
        unet = copy.deepcopy(self.teacher)
        unet.load_state_dict(state)
        return unet

    def save_outputs(self, report, t_imgs, s_imgs, evaluator, unet):
        from fastunlearn.evaluate import save_comparison_grid, with_unet

        tmp = self.folder.tmp_dir()  # everything is written here first, then moved into place
        with_unet(self.pipe, unet).save_pretrained(str(tmp), safe_serialization=True)
        rows = []
        g = self.cfg.eval.grid_seeds
        for kind in ("forget", "retain"):
            prompts = evaluator.forget[0] if kind == "forget" else evaluator.retain[0]
            unique = list(dict.fromkeys(prompts))
            shown = unique[:1] if kind == "forget" else unique[:: max(1, len(unique) // 3)][:3]  # spread out
            for p in shown:
                idx = [i for i, q in enumerate(prompts) if q == p][:g]
                rows.append((f"{kind}: {p}", t_imgs[kind][idx], s_imgs[kind][idx]))
        title = f"{self.cfg.method}: original vs unlearned, same seeds"
        if report.get("integrity_retain") is not None:
            title += f" (I_retain {report['integrity_retain']:.3f}, I_forget {report['integrity_forget']:.3f})"
        save_comparison_grid(tmp / "grid.png", rows, title)
        (tmp / "report.json").write_text(strict_json(report))
        self.folder.publish(tmp)  # and the run --overwrite replaced, kept until now, is deleted
        self.log("finished: " + json.dumps({k: v for k, v in report.items() if not isinstance(v, (list, dict))}))


def _hash(prompts, n) -> str:
    import hashlib

    return hashlib.sha256(json.dumps([prompts, n]).encode()).hexdigest()[:10]


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def _comm_device() -> torch.device:
    """Where collective tensors must live: NCCL takes only CUDA tensors, gloo CPU ones."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def _all_reduce(value: float, op: str = "mean") -> float:
    """`value` reduced over all ranks: "mean" or "max" (itself in a single process)."""
    if _distributed():
        t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        return float(t) / (1 if op == "max" else dist.get_world_size())
    return float(value)


def _from_rank0(obj):
    """Rank 0's `obj` on every rank (itself in a single process): decisions that read local files are
    taken once, so ranks with different local views cannot diverge."""
    if _distributed():
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=_comm_device())
        return box[0]
    return obj


@cli_errors
def main(argv=None) -> int:
    cfg = config_from_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    trainer = Trainer(cfg)
    trainer.train()
    if trainer.rank == 0:
        report = json.loads((trainer.out / "report.json").read_text())
        keys = ("forget_accuracy", "retain_accuracy", "base_forget_accuracy", "base_retain_accuracy",
                "integrity_retain", "integrity_forget", "steps_to_converge", "wall_time_s")
        print(" ".join(f"{k}={report[k]:.4g}" if isinstance(report.get(k), float) else f"{k}={report.get(k)}"
                       for k in keys if k in report))
        print(f"wrote {trainer.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
