#!/usr/bin/env python
"""Unlearn a concept from a diffusers SD / SDXL pipeline under DeepSpeed ZeRO.

    python fastunlearn/train.py                       # digits world: forget 3 with Saddle
    python fastunlearn/train.py --config configs/digits.yaml --method ovw
    deepspeed --num_gpus 2 fastunlearn/train.py --config configs/sdxl-saddle-zero2.yaml

Reads top to bottom: parse (fastunlearn.cli) -> build: pipeline, teacher and student (DeepSpeed), data
(teacher-sampled latents, or images) -> loop (a closed-form method, fastunlearn.uce: one solve instead, no data or
engine) -> finish: the final evaluation (fastunlearn.report), the
unlearned model (fastunlearn.export), report.json, grid and model card, published at once (fastunlearn.outputs).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # run as a script: keep fastunlearn/ itself off sys.path (its modules are not top-level)
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != _here]

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
from fastunlearn.cli import DIFFUSERS_FLAGS, build_parser, command_line, config_from_args  # noqa: E402, F401
from fastunlearn.config import TrainConfig  # noqa: E402
from fastunlearn.data import Batches, resolve_prompts, training_latents  # noqa: E402
from fastunlearn.engine import (  # noqa: E402
    DTYPES,
    ModelCalls,
    StepGuard,
    all_reduce,
    all_reduce_sum_,
    deepspeed_config,
    fault,
    init_distributed,
    initialize,
)
from fastunlearn.errors import FastUnlearnError, cli_errors  # noqa: E402
from fastunlearn.groups import resolve_groups  # noqa: E402
from fastunlearn.outputs import RunFolder  # noqa: E402
from fastunlearn.robust import make_robust  # noqa: E402
from fastunlearn.sampling import with_unet  # noqa: E402
from fastunlearn.tracking import Tracker  # noqa: E402

log = logging.getLogger("fastunlearn")


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
        self.retain_groups = resolve_groups(cfg, retain, self.embedded_world, self.world_info)  # saddle.retain != mean
        if self.method.needs_full_gradient and cfg.zero_stage == 3:
            raise FastUnlearnError(f"method {cfg.method} needs full gradients/weights on every rank, which ZeRO-3 "
                                   "partitions: use --zero-stage 2")
        self.out = Path(cfg.output_dir)
        self.rank = int(os.environ.get("RANK", "0"))  # the launcher's; the process group comes later
        self.notes, self._pending_log = [], []
        # training curves (report_to) into output_dir/logs, opened at the first value
        self.tracker = Tracker(cfg.report_to, self.out / "logs", cfg.to_dict(), rank0=self.rank == 0)
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
        from fastunlearn.models import fingerprint, load_pipeline, prompt_overflow, teacher_and_student
        from fastunlearn.report import RunEvaluation

        cfg = self.cfg
        self.dtype = DTYPES[cfg.mixed_precision]
        self.pipe = load_pipeline(cfg.model, torch_dtype=self.dtype, cache_dir=cfg.cache_dir)  # bad paths fail first
        # which original this run started from (report.json): two builds of a world, or two releases of a model,
        # give other numbers for the same command, and tables must not mix them
        self.original_fingerprint = fingerprint([self.pipe.unet, self.pipe.text_encoder,
                                                 getattr(self.pipe, "text_encoder_2", None)])
        self.evaluation = RunEvaluation(cfg, self.pipe, self.embedded_world, self.world_info, self.concepts, self.note)
        for msg in prompt_overflow(self.pipe, forget + retain + anchors):
            self.warn(msg)
            self.note(msg)
        self.device, self.rank, self.world = init_distributed()
        self.ds_config = deepspeed_config(cfg, self.world)  # a contradictory config fails before any sampling
        self.pipe.to(self.device)
        self.forget, self.retain, self.anchors = forget, retain, anchors
        edited = self.method.bind(self.pipe, forget, anchors, retain) if self.method.closed_form else None
        self.teacher, self.student = teacher_and_student(self.pipe, cfg, edited)
        self.step, self.history, self.steps_to_converge, self.nonfinite_in_row, self.skipped_steps = 0, [], None, 0, []
        self.engine, self.train_seconds, self.seconds_to_converge = None, 0.0, None  # seconds: training or the solve
        self.init_report = None
        if cfg.init == "uce":  # the student starts from the UCE edit; the solve counts as training time
            from fastunlearn.uce import start_from_uce

            self.init_report = start_from_uce(cfg, self.pipe, self.teacher, forget, anchors, retain)
            self.train_seconds = self.init_report["solve_seconds"]
        if not self.method.closed_form:  # UCE, RECE (fastunlearn.uce) are solved on the weights: no data, no engine
            self._build_training(forget, retain, anchors)
        self.robust = make_robust(self)  # --robust: the adversarial pool (fastunlearn.robust), else a no-op

    def _build_training(self, forget, retain, anchors):
        """What a trained method needs: the conditioning table, the data, the DeepSpeed engine."""
        from fastunlearn.models import Conditioner, fingerprint

        cfg = self.cfg
        self.cond = Conditioner(self.pipe, forget + retain + anchors, self.device, self.dtype)
        self.calls = ModelCalls(self.teacher, self.cond, self.device, self.dtype)

        # data: x_0 latents per row with the prompt of each row; images (data mode) or teacher samples (data-free)
        key = fingerprint(self.teacher, {"model": cfg.model, "steps": cfg.sample_steps, "g": cfg.eval.guidance_scale})
        self.fingerprint = key
        lat_f, rows_f = training_latents("forget", forget, cfg.forget_data_dir, cfg.forget_samples_per_prompt, key,
                                          self.pipe, self.teacher_pipe(), cfg, self.rank)
        anchor_of = dict(zip(forget, anchors))
        lat_a = None
        if cfg.forget_x0_anchor > 0:  # the anchors' samples, row for row with lat_f (same prompt order, same seeds)
            lat_a, _ = training_latents("anchor", [anchor_of[p] for p in forget], None, cfg.forget_samples_per_prompt,
                                        key, self.pipe, self.teacher_pipe(), cfg, self.rank)
        lat_r, ids_r = None, None
        if retain:
            lat_r, rows_r = training_latents("retain", retain, cfg.retain_data_dir, cfg.retain_samples_per_prompt,
                                              key, self.pipe, self.teacher_pipe(), cfg, self.rank)
            ids_r = self.cond.ids(rows_r)
        self.batches = Batches(cfg, self.pipe.scheduler, lat_f, self.cond.ids(rows_f),
                               self.cond.ids([anchor_of[p] for p in rows_f]), lat_r, ids_r, self.rank, self.device,
                               self.dtype, self.calls.student, self.calls.teacher, lat_a=lat_a)
        self.engine = initialize(self.student, cfg, self.ds_config)
        self.calls.engine = self.engine
        self.guard = StepGuard(self.engine.basic_optimizer)  # the optimizer DeepSpeed steps, whoever built it

    def context(self):
        """The narrow view of the run a method gets at setup (fastunlearn.methods.Context)."""
        from fastunlearn.methods import Context

        return Context(module=self.engine.module, make_step=self.make_step, call=self.calls.module,
                       teacher=self.calls.teacher, all_reduce=all_reduce, all_reduce_sum_=all_reduce_sum_,
                       retain_groups=self.retain_groups.index(self.cond.index) if self.retain_groups else None)

    def make_step(self, step: int, micro: int):
        """The micro-batch of (step, micro, rank): a pure function of the seed, so a resumed run sees the same data."""
        return self.robust.extend(self.batches.step(step, micro), step, micro)  # --robust: + adversarial rows

    # ---- evaluation (fastunlearn.report) -----------------------------------------------------------
    def note(self, text: str):
        if text not in self.notes:
            self.notes.append(text)

    def teacher_pipe(self):
        return with_unet(self.pipe, self.teacher)

    def evaluator(self, final: bool):
        return self.evaluation.evaluator(self.teacher_pipe(), self.forget, self.retain, self.anchors, self.device,
                                         final)

    def evaluate(self, evaluator):
        self.student.eval()  # the engine's module (DeepSpeed wraps the student itself)
        metrics, images = evaluator.evaluate(with_unet(self.pipe, self.student))
        self.student.train()
        return metrics, images

    # ---- checkpoints -----------------------------------------------------------------------------
    def save_checkpoint(self):
        """A DeepSpeed checkpoint with the run's state, committed only once complete (fastunlearn.checkpoint):
        a kill at any moment leaves the last complete checkpoint intact."""
        state = {"step": self.step, "method": self.method.state_dict(), "history": self.history,
                 "steps_to_converge": self.steps_to_converge, "torch_rng": torch.get_rng_state(),
                 "train_seconds": self.train_seconds, "seconds_to_converge": self.seconds_to_converge,
                 "nonfinite_in_row": self.nonfinite_in_row, "skipped_steps": self.skipped_steps, "robust": self.robust.state_dict()}
        checkpoint.save(self.engine, self.out / "checkpoints", self.step, state, self.cfg.keep_checkpoints,
                        self.rank, self.world)

    def maybe_resume(self) -> bool:
        """Continue from the last complete checkpoint in output_dir, or the one `resume_from_checkpoint` names
        (fastunlearn.checkpoint): weights, optimizer, method state, step and so data order, RNG."""
        found = checkpoint.resume_run(self.engine, self.cfg, self.rank, self.world, self.warn)
        if found is None:
            return False
        path, state = found
        self.step, self.history, self.steps_to_converge = state["step"], state["history"], state["steps_to_converge"]
        self.train_seconds, self.seconds_to_converge = state.get("train_seconds", 0.0), state.get("seconds_to_converge")
        self.method.load_state_dict(state["method"])
        self.robust.load_state_dict(state.get("robust"))
        self.nonfinite_in_row, self.skipped_steps = state.get("nonfinite_in_row", 0), state.get("skipped_steps", [])
        torch.set_rng_state(state["torch_rng"])
        self.log(f"resumed from {path} at step {self.step}")
        if self.rank == 0:
            print(f"fastunlearn: resuming from {path} (step {self.step} of {self.cfg.max_steps})", file=sys.stderr)
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
            self.tracker.close()
            self.folder.release()

    def _train(self):
        cfg = self.cfg
        if self.method.closed_form:  # UCE, RECE: one solve on the weights instead of the loop (fastunlearn.uce)
            self.train_seconds = self.method.solve()
            self.log(f"method {cfg.method} on {cfg.model}: solved in {self.train_seconds:.3f} s "
                     + json.dumps(self.method.report()))
            return self.finish()
        self.method.setup(self.context())
        self.maybe_resume()
        self.log(f"method {cfg.method} on {cfg.model}, params {cfg.params}, ZeRO {cfg.zero_stage}, "
                 f"{self.world} process(es), {sum(p.numel() for p in self.student.parameters() if p.requires_grad)} trained parameters")
        group = self.engine.basic_optimizer.param_groups[0]
        self.log(f"optimizer {type(self.engine.basic_optimizer).__name__} (built by "
                 f"{'DeepSpeed' if 'optimizer' in self.ds_config else 'fastunlearn'}), lr {group['lr']:g}, "
                 f"weight_decay {group.get('weight_decay', 0):g}, gradient_clipping {self.ds_config['gradient_clipping']:g}")
        evaluator = self.evaluator(final=False) if cfg.eval.every or cfg.eval.early_every else None
        bar = tqdm(total=cfg.max_steps, initial=self.step, desc=f"unlearning ({cfg.method})", disable=self.rank != 0)
        tick = time.time()
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
            self.robust.refresh(self.step)  # every robust.every steps: the inner attack moves the pool on
            skipped = self.guard.skipped or bool(getattr(self.engine.optimizer, "overflow", False) and cfg.mixed_precision != "fp16")
            if bad_terms or skipped:
                self.nonfinite_step(bad_terms)
                continue
            self.nonfinite_in_row = 0
            logs = {k: all_reduce(v) for k, v in logs.items()}
            self.method.after_step(logs, self.step)
            self.tracker.log({**logs, "lr": group["lr"]}, self.step, "train/")
            bar.set_postfix({k: f"{v:.3g}" for k, v in logs.items() if k in ("loss", "lam", "probe", "G", "R", "R_max", "mu_max", "w_max")} | self.robust.postfix)
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                self.log(f"step {self.step} " + " ".join(f"{k}={v:.5g}" for k, v in logs.items()))
            self.train_seconds += time.time() - tick  # training time: not the evaluations and checkpoints below
            if evaluator is not None and cfg.eval.due(self.step) and self.step < cfg.max_steps:
                metrics, _ = self.evaluate(evaluator)
                self.history.append({"step": self.step, **metrics,
                                     **{k: logs[k] for k in ("lam", "lam_P", "lam_I", "gap", "probe") if k in logs}})
                self.log(f"eval step {self.step} " + " ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
                self.tracker.log(metrics, self.step, "eval/")
                if self.steps_to_converge is None and self.evaluation.forgotten(metrics):
                    self.steps_to_converge, self.seconds_to_converge = self.step, round(self.train_seconds, 3)
                    if cfg.eval.stop_when_forgotten:
                        self.log(f"forget criterion met at step {self.step}: stopping early")
                        break
            if cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 and self.step < cfg.max_steps:
                self.save_checkpoint()
            tick = time.time()
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
        """The final evaluation, then (rank 0) the unlearned model, report.json, grid and model card, written
        to a temporary folder and published into the output folder at once."""
        from fastunlearn.export import save_unlearned, trained_names
        from fastunlearn.models import teacher_facts

        cfg = self.cfg
        evaluator = self.evaluator(final=True)
        metrics, images = self.evaluate(evaluator)
        base = evaluator.base()
        self.history.append({"step": self.step, "final": True, **metrics})
        if self.steps_to_converge is None and self.evaluation.forgotten(metrics):
            self.steps_to_converge, self.seconds_to_converge = self.step, round(self.train_seconds, 3)
        unet = self.final_unet()  # collective under ZeRO-3
        if self.rank != 0:
            return
        t_imgs, _ = evaluator.teacher()
        run = {"forget": self.forget, "retain": self.retain, "anchors": self.anchors, "step": self.step,
               "steps_to_converge": self.steps_to_converge, "seconds_to_converge": self.seconds_to_converge,
               "world_size": self.world, "history": self.history,
               "notes": self.notes, "skipped_steps": self.skipped_steps}
        report = self.evaluation.report(run, metrics, base, evaluator, teacher_facts(cfg, self.teacher, self.student),
                                        self.t_start)
        report.update(**self.method.report(), **self.robust.report(), original_fingerprint=self.original_fingerprint)
        if self.init_report is not None:
            report["init_uce"] = self.init_report
        tmp = self.folder.tmp_dir()  # everything is written here first, then moved into place
        names = trained_names(self.student, lora=bool(cfg.lora.rank))  # as named in the merged UNet
        save_unlearned(tmp, cfg, self.pipe, unet, names, self.step, self.dtype)
        report["save_format"] = cfg.save_format
        self.tracker.log({k: v for k, v in self.history[-1].items() if k != "step"}, self.step, "eval/")
        self.evaluation.write(tmp, report, evaluator, t_imgs, images, self.command)
        self.folder.publish(tmp)  # and the run --overwrite replaced, kept until now, is deleted
        self.log("finished: " + json.dumps({k: v for k, v in report.items() if not isinstance(v, (list, dict))}))

    def final_unet(self):
        """The trained UNet with full weights (gathered from all ranks under ZeRO-3; None off rank 0)."""
        if self.cfg.zero_stage != 3 or self.engine is None:
            return self.student  # the engine's module
        state = self.engine._zero3_consolidated_16bit_state_dict()
        if self.rank != 0:
            return None
        unet = copy.deepcopy(self.teacher)
        unet.load_state_dict(state)
        return unet


@cli_errors
def main(argv=None) -> int:
    cfg = config_from_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    trainer = Trainer(cfg, command_line(sys.argv[1:] if argv is None else argv))
    trainer.train()
    if trainer.rank == 0:
        from fastunlearn.report import summary_line

        print(summary_line(json.loads((trainer.out / "report.json").read_text())))
        print(f"wrote {trainer.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
