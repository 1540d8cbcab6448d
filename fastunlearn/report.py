"""A training run's evaluation and what it publishes about itself: the in-training and final evaluations (the
evaluation sets of fastunlearn.evaluate, the forget judge, CLIPScore), the forget criterion, `report.json`, the
comparison grid and the model card (fastunlearn.card). The trainer (fastunlearn/train.py) asks; this module
measures and writes. Nothing here trains or saves weights (fastunlearn.export does that)."""
from __future__ import annotations

import time

from .outputs import strict_json


class RunEvaluation:
    """The evaluation side of one run. Made when the run's pipeline is loaded, before anything else: the
    perceptual and FID networks are found (or downloaded) then, so a missing weights file fails the run before
    training, not after it."""

    def __init__(self, cfg, pipe, world, world_info, concepts, note):
        from .evaluation import training_metrics

        self.cfg, self.world, self.world_info, self.concepts, self.note = cfg, world, world_info, concepts, note
        self.metric_nets = training_metrics(cfg.eval, pipe, world_info, note)
        self.judge, self._judge_built, self._clip = None, False, None

    def clip_scorer(self, device):
        """CLIPScore (and the clip judge's model): eval.clip_model, else the embedded world's own CLIP (digits),
        else none."""
        path = self.cfg.eval.clip_model
        if not path and self.world_info is not None and hasattr(self.world, "clip_path"):
            path = str(self.world.clip_path())
        if not path:
            self.note("CLIPScore not computed: no local CLIP model given (eval.clip_model)")
            return None
        if self._clip is None:
            from .metrics import CLIPScore

            self._clip = CLIPScore(path, device=device)
        return self._clip

    def evaluator(self, teacher_pipe, forget, retain, anchors, device, final: bool):
        """The in-training (`final=False`, cheaper) or final evaluation sets (fastunlearn.evaluate)."""
        from .evaluation import training_evaluator
        from .judges import make_judge

        clip = self.clip_scorer(device)
        if not self._judge_built:  # the forget judge (None: none, or the digits world's own classifier)
            self.judge = make_judge(self.cfg.eval, self.world_info is not None, device, clip, self.note)
            self._judge_built = True
        return training_evaluator(self.cfg.eval, teacher_pipe, forget, retain, final, self.world, self.world_info,
                                  clip, self.note, judge=self.judge, judge_contrast=anchors,
                                  metrics=self.metric_nets, concepts=self.concepts)

    def forgotten(self, metrics) -> bool:
        """The forget criterion: forget accuracy (digits world), else the judge's forget rate, <= the threshold;
        with several concepts, for every concept."""
        for key in ("forget_accuracy", "forget_rate"):  # forget_rate: a judge (fastunlearn.judges) outside the world
            if metrics.get(key) is not None:
                rates = list(metrics.get(f"{key}_by_concept", {}).values()) or [metrics[key]]
                return max(rates) <= self.cfg.eval.forget_threshold
        return False

    def report(self, run: dict, metrics: dict, base: dict, evaluator, models: dict, t_start: float) -> dict:
        """report.json's content. `run`: what the trainer knows of the run (prompts, steps, history, notes,
        ...); `models`: the teacher/student facts (fastunlearn.models); `t_start`: the run's start (time.time)."""
        cfg = self.cfg
        report = {
            "method": cfg.method, "model": cfg.model, "params": cfg.params, "forget_target": cfg.forget_target,
            "forget_prompts": run["forget"], "forget_concepts": self.concepts, "retain_prompts_count": len(run["retain"]),
            "anchor_prompts": sorted(set(run["anchors"])),
            "steps": run["step"], "steps_to_converge": run["steps_to_converge"],
            "seconds_to_converge": run.get("seconds_to_converge"),  # training (or the solve's) seconds up to then
            "wall_time_s": round(time.time() - t_start, 1),
            **metrics, **base,
            "perceptual_network": evaluator.perceptual.name if evaluator.perceptual else None,
            "judge": (self.judge.name if self.judge is not None
                      else "digit classifier" if self.world_info is not None else None),
            "clip_model": getattr(evaluator.clip, "name", None),
            "eval": {"forget_samples": len(evaluator.forget[0]), "retain_samples": len(evaluator.retain[0]),
                     "sampler": evaluator.sampler.to_dict()},
            "zero_stage": cfg.zero_stage, "world_size": run["world_size"], "mixed_precision": cfg.mixed_precision,
            "history": run["history"], "notes": run["notes"], "skipped_steps": run["skipped_steps"],
            **models,
        }
        if self.world_info is not None:
            report.update(self.world.report_fields(self.world_info))
        return report

    def write(self, tmp, report: dict, evaluator, teacher_images, student_images, command: str) -> None:
        """Into the run's unpublished folder `tmp`: the grid, the model card, then report.json."""
        from .card import write_model_card
        from .evaluation import comparison_rows, save_comparison_grid

        rows = comparison_rows(evaluator, teacher_images, student_images, self.cfg.eval.grid_seeds)
        title = f"{self.cfg.method}: original vs unlearned, same seeds"
        if report.get("integrity_retain") is not None:
            title += f" (I_retain {report['integrity_retain']:.3f}, I_forget {report['integrity_forget']:.3f})"
        save_comparison_grid(tmp / "grid.png", rows, title)
        write_model_card(tmp, report, self.cfg.to_dict(), command)
        (tmp / "report.json").write_text(strict_json(report))


SUMMARY = ("forget_accuracy", "retain_accuracy", "base_forget_accuracy", "base_retain_accuracy",
           "cross_domain_retain_accuracy", "base_cross_domain_retain_accuracy", "integrity_retain",
           "integrity_forget", "steps_to_converge", "seconds_to_converge", "solve_seconds", "wall_time_s")


def summary_line(report: dict) -> str:
    """The line the training command prints at the end: the report's headline figures."""
    return " ".join(f"{k}={report[k]:.4g}" if isinstance(report.get(k), float) else f"{k}={report.get(k)}"
                    for k in SUMMARY if k in report)
