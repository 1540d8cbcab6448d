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
import json  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from fastunlearn import checkpoint, worlds  # noqa: E402
from fastunlearn.config import TrainConfig, load_config, set_dotted  # noqa: E402
from fastunlearn.data import Batches, resolve_prompts, training_latents  # noqa: E402
from fastunlearn.engine import (  # noqa: E402
    DTYPES,
    StepGuard,
    all_reduce,
    all_reduce_sum_,
    deepspeed_config,
    fault,
    init_distributed,
    unet_call,
)
from fastunlearn.errors import FastUnlearnError, cli_errors  # noqa: E402
from fastunlearn.outputs import RunFolder, strict_json  # noqa: E402

log = logging.getLogger("fastunlearn")


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

    flag("--model", f"local diffusers pipeline folder, cached hub id, or an embedded world ({', '.join(worlds.WORLDS)})")
    flag("--method", "saddle | ovw | esd | erasediff | salun | ga | ca")
    flag("--params", "trained parameters: full | attn2 | non-attn2")
    p.add_argument("--forget-prompts", action="append", default=None, metavar="FILE|PROMPT",
                   help="forget prompts: a text file (one per line, or `concept: prompt` lines for several concepts) "
                        "or one prompt; repeatable: one file per concept, named by the file's stem (forget_concepts). "
                        "Default: digits world, from --forget-digit")
    flag("--retain-prompts", "retain prompts: a text file (one per line) or one prompt; digits world: the other digits")
    flag("--anchor-prompts", "anchor prompt(s) for forget_target=anchor and ca: a file or one prompt")
    flag("--forget-digit", "digits world: the digit to forget", int)
    flag("--forget-style", "styles world: the style to forget (red, bold, red bold, ...) instead of a digit")
    flag("--output-dir", "where the pipeline, report.json, grid.png, train.log and checkpoints go")
    flag("--max-steps", "optimiser steps", int)
    flag("--zero-stage", "DeepSpeed ZeRO stage 0-3", int)
    flag("--seed", "seed of data order, noise and timesteps", int)
    flag("--report-to", "training curves (loss terms, lambda, lr, in-training evaluations) into output_dir/logs: "
                        "tensorboard | wandb | none")
    flag("--save-format", "what the output folder holds: pipeline (the whole diffusers pipeline) | unet (unet/ only) | "
                          "trained (unlearned.safetensors: only the trained parameters, see fastunlearn.load_unlearned)")
    flag("--resume-from-checkpoint", "latest (the last complete checkpoint in output_dir: what a rerun does anyway) or "
                                     "a checkpoint folder of output_dir/checkpoints (step-N)")
    p.add_argument("--lora-rank", type=int, default=None, metavar="R",
                   help="train LoRA adapters of rank R (PEFT) instead of the weights; the teacher is the same UNet "
                        "with its adapters off (lora.rank; default: 0, no LoRA)")
    p.add_argument("--fid-weights", default=None, metavar="PATH",
                   help="torch-fidelity's InceptionV3 weights file: report Inception FID/KID of the retain images "
                        "(sets eval.fid=inception and eval.fid_weights; default: eval.fid none)")
    p.add_argument("--lpips-weights", default=None, metavar="PATH",
                   help="torchvision's alexnet weights file for LPIPS-alex (eval.lpips_weights; default: the torch "
                        "hub cache, downloaded there when online)")
    p.add_argument("--overwrite", action="store_true", help="replace a finished run in --output-dir (default: refuse)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="any other config key, dotted for sections, e.g. --set saddle.tau=0.1 --set lr=1e-4")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    g = p.add_argument_group("diffusers-style flags", "the flags of the diffusers training scripts, each an alias of "
                                                      "the option named in its help (underscored or hyphenated)")
    for name, (keys, aliased) in DIFFUSERS_FLAGS.items():
        names = [name] + ([name.replace("_", "-")] if name.replace("_", "-") not in p._option_string_actions else [])
        if keys == ("gradient_checkpointing",):
            g.add_argument(*names, dest=f"alias_{name[2:]}", action="store_true", default=None,
                           help=f"= {aliased}")
        else:
            g.add_argument(*names, dest=f"alias_{name[2:]}", default=None, help=f"= {aliased}",
                           metavar=aliased.rsplit("=", 1)[1] if "=" in aliased else keys[0].upper())
    return p


# diffusers' flag -> (the config keys it sets, the option it aliases)
DIFFUSERS_FLAGS = {
    "--pretrained_model_name_or_path": (("model",), "--model"),
    "--learning_rate": (("lr",), "--set lr=LR"),
    "--max_train_steps": (("max_steps",), "--max-steps"),
    "--train_batch_size": (("forget_batch_size", "retain_batch_size"),
                           "--set forget_batch_size=N --set retain_batch_size=N"),
    "--gradient_accumulation_steps": (("gradient_accumulation_steps",), "--set gradient_accumulation_steps=N"),
    "--mixed_precision": (("mixed_precision",), "--set mixed_precision=no|fp16|bf16"),
    "--gradient_checkpointing": (("gradient_checkpointing",), "--set gradient_checkpointing=true"),
    "--report_to": (("report_to",), "--report-to"),
    "--resume_from_checkpoint": (("resume_from_checkpoint",), "--resume-from-checkpoint"),
    "--checkpointing_steps": (("checkpoint_every",), "--set checkpoint_every=N"),
    "--checkpoints_total_limit": (("keep_checkpoints",), "--set keep_checkpoints=N"),
    "--output_dir": (("output_dir",), "--output-dir"),
}


def config_from_args(argv=None) -> TrainConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = load_config(args.config)
    if args.forget_prompts is not None and len(args.forget_prompts) > 1:  # several concepts, one file each
        files = [Path(v) for v in args.forget_prompts]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FastUnlearnError(f"--forget-prompts given more than once takes one prompt file per concept; "
                                   f"{missing[0]} is not a file")
        if len({f.stem for f in files}) != len(files):
            raise FastUnlearnError("--forget-prompts files name their concepts by their stems, and two share one: "
                                   + ", ".join(str(f) for f in files))
        cfg.forget_concepts, args.forget_prompts = {f.stem: str(f) for f in files}, None
    elif args.forget_prompts is not None:
        args.forget_prompts = args.forget_prompts[0]
    named = ("model", "method", "params", "forget_prompts", "retain_prompts", "anchor_prompts", "forget_digit",
             "forget_style", "output_dir", "max_steps", "zero_stage", "seed", "report_to", "save_format", "resume_from_checkpoint")
    for flag in named:
        if getattr(args, flag) is not None:
            setattr(cfg, flag, getattr(args, flag))
    for name, (keys, aliased) in DIFFUSERS_FLAGS.items():  # diffusers-style aliases: as the option they alias
        value = getattr(args, f"alias_{name[2:]}")
        if value is None:
            continue
        primary = getattr(args, keys[0], None) if keys[0] in named else None
        if primary is not None and str(primary) != str(value):
            raise FastUnlearnError(f"{name} {value} and {aliased} {primary} disagree: give one of them")
        for key in keys:
            set_dotted(cfg, key, value)
    if args.lora_rank is not None:
        cfg.lora.rank = args.lora_rank
    if args.overwrite:
        cfg.overwrite = True
    if args.fid_weights is not None:
        cfg.eval.fid, cfg.eval.fid_weights = "inception", args.fid_weights
    if args.lpips_weights is not None:
        cfg.eval.lpips_weights = args.lpips_weights
    for item in args.set:
        if "=" not in item:
            raise FastUnlearnError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        set_dotted(cfg, key, value)
    return cfg.validate()


def command_line(argv) -> str:
    """The command that reruns these arguments (the launcher's --local_rank left out)."""
    import shlex

    args = [a for i, a in enumerate(argv) if not a.startswith(("--local_rank", "--local-rank"))
            and not (i and argv[i - 1] in ("--local_rank", "--local-rank"))]
    return shlex.join(["python", "fastunlearn/train.py", *args])


# ---------------------------------------------------------------------------------------------------------
# The trainer


class Trainer:
    def __init__(self, cfg: TrainConfig, command: str | None = None):
        """`command`: the command line that reproduces the run, for the model card (default: the saved config)."""
        from fastunlearn.methods import make_method

        self.cfg = cfg
        self.command = command or f"python fastunlearn/train.py --config {Path(cfg.output_dir) / 'config.json'}"
        self.t_start = time.time()
        self.method = make_method(cfg)
        forget, retain, anchors, self.world_info, self.concepts = resolve_prompts(cfg)
        self.embedded_world = worlds.get(cfg.model, cfg.cache_dir)  # None for a model folder or hub id
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
        from fastunlearn.models import (
            AdapterTeacher,
            Conditioner,
            SharedTeacher,
            add_lora,
            fingerprint,
            load_pipeline,
            param_subset,
            prompt_overflow,
            set_attention,
        )

        cfg = self.cfg
        self.dtype = DTYPES[cfg.mixed_precision]
        self.pipe = load_pipeline(cfg.model, torch_dtype=self.dtype, cache_dir=cfg.cache_dir)  # bad paths fail first
        from fastunlearn.evaluate import training_metrics

        # LPIPS / Inception weights: found, or downloaded, now; a missing file fails the run here, not after training
        self.metric_nets = training_metrics(cfg.eval, self.pipe, self.world_info, self.note)
        for msg in prompt_overflow(self.pipe, forget + retain + anchors):
            self.warn(msg)
            self.note(msg)
        self.device, self.rank, self.world = init_distributed()
        self.ds_config = deepspeed_config(cfg, self.world)  # a contradictory config fails before any sampling
        self.pipe.to(self.device)
        self.forget, self.retain, self.anchors = forget, retain, anchors

        # teacher: the original model, made before DeepSpeed sees the student. With a parameter subset it
        # shares every frozen weight with the student (SharedTeacher); else a frozen copy in the working dtype.
        self.student = self.pipe.unet
        set_attention(self.student, cfg.attention)  # the trainer's and the sampler's UNet calls alike
        if cfg.lora.rank:  # LoRA: the teacher is the student with its adapters off, at no memory cost
            trained = set(add_lora(self.student, cfg.lora.rank, cfg.lora.alpha, cfg.lora.target_modules, cfg.params))
            self.teacher = AdapterTeacher(self.student)
        else:
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
        lat_f, rows_f = self.latents("forget", forget, cfg.forget_data_dir, cfg.forget_samples_per_prompt, key)
        anchor_of = dict(zip(forget, anchors))
        lat_r, ids_r = None, None
        if retain:
            lat_r, rows_r = self.latents("retain", retain, cfg.retain_data_dir, cfg.retain_samples_per_prompt, key)
            ids_r = self.cond.ids(rows_r)
        self.batches = Batches(cfg, self.pipe.scheduler, lat_f, self.cond.ids(rows_f),
                               self.cond.ids([anchor_of[p] for p in rows_f]), lat_r, ids_r, self.rank, self.device,
                               self.dtype, self.student_call, self.teacher_call)

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
        """(x_0 latents (N, C, h, w) fp32 CPU, the prompt of each row): data mode or data-free."""
        return training_latents(which, prompts, folder, per_prompt, key, self.pipe, self.teacher_pipe(), self.cfg,
                                self.rank)

    # ---- model calls -----------------------------------------------------------------------------
    def _call(self, model, items, grad):
        return unet_call(model, items, self.cond, self.device, self.dtype, grad)

    def student_call(self, *items, grad=True):
        return self._call(self.engine, items, grad)

    def teacher_call(self, *items):
        return self._call(self.teacher, items, False)

    def module_call(self, items, params=None, grad=True):
        """The student's module itself (no DeepSpeed hooks) on `items`, with `params` substituted if given."""
        module = self.engine.module
        if params is not None:
            from torch.func import functional_call

            def model(x, t, **kwargs):
                return functional_call(module, params, (x, t), kwargs)
        else:
            model = module
        return unet_call(model, items, self.cond, self.device, self.dtype, grad)

    def context(self):
        """The narrow view of the run a method gets at setup (fastunlearn.methods.Context)."""
        from fastunlearn.methods import Context

        return Context(module=self.engine.module, make_step=self.make_step, call=self.module_call,
                       teacher=self.teacher_call, all_reduce=all_reduce, all_reduce_sum_=all_reduce_sum_)

    def make_step(self, step: int, micro: int):
        """The micro-batch of (step, micro, rank): a pure function of the seed, so a resumed run sees the same data."""
        return self.batches.step(step, micro)

    # ---- evaluation ------------------------------------------------------------------------------
    def build_evaluator(self, final: bool):
        """The in-training (`final=False`, cheaper) or final evaluation sets (fastunlearn.evaluate)."""
        from fastunlearn.evaluate import training_evaluator
        from fastunlearn.judges import make_judge

        clip = self.clip_scorer()
        if not hasattr(self, "_judge"):  # the forget judge (None: none, or the digits world's own classifier)
            self._judge = make_judge(self.cfg.eval, self.world_info is not None, self.device, clip, self.note)
        return training_evaluator(self.cfg.eval, self.teacher_pipe(), self.forget, self.retain, final,
                                  self.embedded_world, self.world_info, clip, self.note, judge=self._judge,
                                  judge_contrast=self.anchors, metrics=self.metric_nets, concepts=self.concepts)

    def note(self, text: str):
        if text not in self.notes:
            self.notes.append(text)

    def clip_scorer(self):
        """CLIPScore (and the clip judge's model): eval.clip_model, else the embedded world's own CLIP (digits),
        else none."""
        path = self.cfg.eval.clip_model
        if not path and self.world_info is not None and hasattr(self.embedded_world, "clip_path"):
            path = str(self.embedded_world.clip_path())
        if not path:
            self.note("CLIPScore not computed: no local CLIP model given (eval.clip_model)")
            return None
        if not hasattr(self, "_clip"):
            from fastunlearn.metrics import CLIPScore

            self._clip = CLIPScore(path, device=self.device)
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
        """The forget criterion: forget accuracy (digits world), else the judge's forget rate, <= the threshold;
        with several concepts, for every concept."""
        for key in ("forget_accuracy", "forget_rate"):  # forget_rate: a judge (fastunlearn.judges) outside the world
            if metrics.get(key) is not None:
                rates = list(metrics.get(f"{key}_by_concept", {}).values()) or [metrics[key]]
                return max(rates) <= self.cfg.eval.forget_threshold
        return False

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self):
        """A DeepSpeed checkpoint with the run's state, committed only once complete (fastunlearn.checkpoint):
        a kill at any moment leaves the last complete checkpoint intact."""
        state = {"step": self.step, "method": self.method.state_dict(), "history": self.history,
                 "steps_to_converge": self.steps_to_converge, "torch_rng": torch.get_rng_state(),
                 "nonfinite_in_row": self.nonfinite_in_row, "skipped_steps": self.skipped_steps}
        checkpoint.save(self.engine, self.out / "checkpoints", self.step, state, self.cfg.keep_checkpoints,
                        self.rank, self.world)

    def maybe_resume(self) -> bool:
        """Continue from the last complete checkpoint in output_dir (weights, optimizer, method state,
        step and so data order, RNG); partial ones from a killed run are ignored with a warning.
        `resume_from_checkpoint` names another complete checkpoint of output_dir/checkpoints to continue from."""
        spec, ckpt_dir = self.cfg.resume_from_checkpoint, self.out / "checkpoints"
        tag = checkpoint.resolve_checkpoint(ckpt_dir, spec) if spec not in (None, "latest") else None
        found = checkpoint.resume(self.engine, ckpt_dir, self.rank, self.world, self.warn, tag=tag)
        if found is None:
            if spec == "latest":
                self.warn(f"resume_from_checkpoint latest: no complete checkpoint in {ckpt_dir}; starting a new run")
            return False
        path, state = found
        self.step = state["step"]
        self.method.load_state_dict(state["method"])
        self.history = state["history"]
        self.steps_to_converge = state["steps_to_converge"]
        self.nonfinite_in_row = state.get("nonfinite_in_row", 0)
        self.skipped_steps = state.get("skipped_steps", [])
        torch.set_rng_state(state["torch_rng"])
        self.log(f"resumed from {path} at step {self.step}")
        if self.rank == 0:
            print(f"fastunlearn: resuming from {path} (step {self.step} of {self.cfg.max_steps})", file=sys.stderr)
        return True

    @property
    def tracker(self):
        """Training curves (report_to, fastunlearn.tracking) into output_dir/logs, opened at the first value."""
        if getattr(self, "_tracker", None) is None:
            from fastunlearn.tracking import Tracker

            self._tracker = Tracker(self.cfg.report_to, self.out / "logs", self.cfg.to_dict(), rank0=self.rank == 0)
        return self._tracker

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
            self.tracker.close()
            self.folder.release()

    def _train(self):
        cfg = self.cfg
        self.method.setup(self.context())
        self.maybe_resume()
        self.log(f"method {cfg.method} on {cfg.model}, params {cfg.params}, ZeRO {cfg.zero_stage}, "
                 f"{self.world} process(es), {sum(p.numel() for p in self.student.parameters() if p.requires_grad)} trained parameters")
        group = self.engine.basic_optimizer.param_groups[0]
        self.log(f"optimizer {type(self.engine.basic_optimizer).__name__} (built by "
                 f"{'DeepSpeed' if 'optimizer' in self.ds_config else 'fastunlearn'}), lr {group['lr']:g}, "
                 f"weight_decay {group.get('weight_decay', 0):g}, gradient_clipping {self.ds_config['gradient_clipping']:g}")
        evaluator = self.build_evaluator(final=False) if cfg.eval.every or cfg.eval.early_every else None
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"unlearning ({cfg.method})", disable=self.rank != 0)
        while self.step < cfg.max_steps:
            logs, bad_terms = {}, []
            for micro in range(cfg.gradient_accumulation_steps):
                st = self.make_step(self.step, micro)
                fault("batch", self.step, self.rank, st, self.engine.module)
                loss, terms = self.method.loss(st)
                values = {**{k: float(v.detach()) for k, v in terms.items()}, "loss": float(loss.detach())}
                nonfinite = [k for k, v in values.items() if not math.isfinite(v)]
                if all_reduce(float(bool(nonfinite)), "max") > 0:  # every rank skips together
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
            logs = {k: all_reduce(v) for k, v in logs.items()}
            self.method.after_step(logs, self.step)
            self.tracker.log({**logs, "lr": group["lr"]}, self.step, "train/")
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k in ("loss", "lam", "probe", "G", "R")})
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self.log(f"step {self.step} " + " ".join(f"{k}={v:.5g}" for k, v in logs.items()))
            if evaluator is not None and cfg.eval.due(self.step) and self.step < cfg.max_steps:
                metrics, _ = self.evaluate(evaluator)
                self.history.append({"step": self.step, **metrics,
                                     **{k: logs[k] for k in ("lam", "lam_P", "lam_I", "gap", "probe") if k in logs}})
                self.log(f"eval step {self.step} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
                self.tracker.log(metrics, self.step, "eval/")
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
        shared = hasattr(self.teacher, "extra_bytes")  # SharedTeacher, or AdapterTeacher (LoRA)
        report = {
            "method": cfg.method, "model": cfg.model, "params": cfg.params, "forget_target": cfg.forget_target,
            "forget_prompts": self.forget, "forget_concepts": self.concepts, "retain_prompts_count": len(self.retain), "anchor_prompts": sorted(set(self.anchors)),
            "steps": self.step, "steps_to_converge": self.steps_to_converge,
            "wall_time_s": round(time.time() - self.t_start, 1),
            **metrics, **base,
            "perceptual_network": evaluator.perceptual.name if evaluator.perceptual else None,
            "judge": (self._judge.name if getattr(self, "_judge", None) is not None
                      else "digit classifier" if self.world_info is not None else None),
            "clip_model": getattr(evaluator.clip, "name", None),
            "eval": {"forget_samples": len(evaluator.forget[0]), "retain_samples": len(evaluator.retain[0]),
                     "sampler": evaluator.sampler.to_dict()},
            "zero_stage": cfg.zero_stage, "world_size": self.world, "mixed_precision": cfg.mixed_precision,
            "history": self.history, "notes": self.notes, "skipped_steps": self.skipped_steps,
            "teacher": "adapters off" if cfg.lora.rank else "shared" if shared else "copy",
            "lora": {"rank": cfg.lora.rank, "alpha": cfg.lora.alpha or cfg.lora.rank,
                     "trained_parameters": sum(p.numel() for p in self.student.parameters() if p.requires_grad)}
            if cfg.lora.rank else None,
            "teacher_extra_bytes": (self.teacher.extra_bytes() if shared else
                                    sum(p.numel() * p.element_size() for p in self.teacher.parameters())),
            "unet_bytes": sum(getattr(p, "ds_numel", p.numel()) * p.element_size() for p in self.student.parameters()),
        }
        if self.world_info is not None:
            report.update(self.embedded_world.report_fields(self.world_info))
        report.update(self.method.report())
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
        from fastunlearn.card import write_model_card
        from fastunlearn.evaluate import comparison_rows, save_comparison_grid, with_unet
        from fastunlearn.export import TRAINED_FILE, save_trained, trained_names

        cfg = self.cfg
        tmp = self.folder.tmp_dir()  # everything is written here first, then moved into place
        names = trained_names(self.student, lora=bool(cfg.lora.rank))  # as named in the merged UNet
        if cfg.lora.rank:  # the adapter (pipe.load_lora_weights(dir)), then the pipeline with it merged
            from fastunlearn.models import merge_lora, save_lora

            save_lora(self.pipe, unet, tmp)
            unet = merge_lora(unet)
        report["save_format"] = cfg.save_format
        if cfg.save_format == "pipeline":
            with_unet(self.pipe, unet).save_pretrained(str(tmp), safe_serialization=True)
        elif cfg.save_format == "unet":
            unet.save_pretrained(str(tmp / "unet"), safe_serialization=True)
        else:  # only the trained parameters: fastunlearn.load_unlearned(base_pipeline, dir) applies them
            save_trained(unet, names, tmp / TRAINED_FILE, {
                "base_model": str(Path(cfg.model).resolve()) if Path(cfg.model).is_dir() else cfg.model,
                "method": cfg.method, "params": cfg.params, "lora_rank": cfg.lora.rank,
                "steps": self.step, "dtype": str(self.dtype).replace("torch.", "")})
        self.tracker.log({k: v for k, v in self.history[-1].items() if k != "step"}, self.step, "eval/")
        rows = comparison_rows(evaluator, t_imgs, s_imgs, self.cfg.eval.grid_seeds)
        title = f"{self.cfg.method}: original vs unlearned, same seeds"
        if report.get("integrity_retain") is not None:
            title += f" (I_retain {report['integrity_retain']:.3f}, I_forget {report['integrity_forget']:.3f})"
        save_comparison_grid(tmp / "grid.png", rows, title)
        write_model_card(tmp, report, cfg.to_dict(), self.command)
        (tmp / "report.json").write_text(strict_json(report))
        self.folder.publish(tmp)  # and the run --overwrite replaced, kept until now, is deleted
        self.log("finished: " + json.dumps({k: v for k, v in report.items() if not isinstance(v, (list, dict))}))


@cli_errors
def main(argv=None) -> int:
    cfg = config_from_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    trainer = Trainer(cfg, command_line(sys.argv[1:] if argv is None else argv))
    trainer.train()
    if trainer.rank == 0:
        report = json.loads((trainer.out / "report.json").read_text())
        keys = ("forget_accuracy", "retain_accuracy", "base_forget_accuracy", "base_retain_accuracy",
                "cross_domain_retain_accuracy", "base_cross_domain_retain_accuracy", "integrity_retain",
                "integrity_forget", "steps_to_converge", "wall_time_s")
        print(" ".join(f"{k}={report[k]:.4g}" if isinstance(report.get(k), float) else f"{k}={report.get(k)}"
                       for k in keys if k in report))
        print(f"wrote {trainer.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
