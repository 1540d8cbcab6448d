"""Training curves for TensorBoard or Weights & Biases (`report_to`, `--report-to`); `train.log` stays.

`Tracker(kind, log_dir, config)` opens nothing until the first `log(values, step)`: the trainer calls it
only once the output folder belongs to the run (RunFolder.prepare), so a run that fails its checks
writes nothing. TensorBoard event files go to `<output_dir>/logs`, which stays in place through
resumption (a resumed run hides the events it repeats, `purge_step`) and through publishing (only the
final files move). Only numbers are logged: None, strings and lists are skipped, and dicts are
flattened (`retain_accuracy_by_digit/7`). Rank 0 only: every other rank gets a tracker that does nothing.
"""
from __future__ import annotations

import json
import math
import numbers
from pathlib import Path

from .errors import FastUnlearnError

KINDS = ("none", "tensorboard", "wandb")


def check_available(kind: str) -> None:
    """A one-line error when `kind` is unknown or its package is not installed."""
    if kind not in KINDS:
        raise FastUnlearnError(f"report_to must be one of {', '.join(KINDS)}, got {kind!r}")
    if kind == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            raise FastUnlearnError('report_to tensorboard needs the tensorboard package: pip install '
                                   '"fastunlearn[tensorboard]" (or --report-to none)') from None
    if kind == "wandb":
        try:
            import wandb  # noqa: F401
        except ImportError:
            raise FastUnlearnError("report_to wandb needs the wandb package: pip install wandb "
                                   "(or --report-to tensorboard|none)") from None


def scalars(values: dict, prefix: str = "") -> dict[str, float]:
    """The finite numbers of `values` (nested dicts flattened with '/'), keyed `prefix + name`."""
    out = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(scalars(value, f"{name}/"))
        elif isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(float(value)):
            out[name] = float(value)
    return out


class Tracker:
    def __init__(self, kind: str, log_dir: Path, config: dict, rank0: bool = True, project: str = "fastunlearn"):
        check_available(kind)
        self.kind = kind if rank0 else "none"
        self.log_dir, self.config, self.project = Path(log_dir), config, project
        self._writer = None
        self._run = None

    @property
    def enabled(self) -> bool:
        return self.kind != "none"

    def _open(self, step: int) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.kind == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter

            resumed = any(self.log_dir.glob("events.out.tfevents.*"))
            # a resumed run repeats the steps since its checkpoint: hide the earlier run's events from `step` on
            self._writer = SummaryWriter(str(self.log_dir), purge_step=step if resumed else None, flush_secs=30)
            if not resumed:
                self._writer.add_text("config", "```\n" + json.dumps(self.config, indent=2, default=str) + "\n```", 0)
        else:
            import wandb

            id_file = self.log_dir / "wandb-run-id"
            run_id = id_file.read_text().strip() if id_file.is_file() else wandb.util.generate_id()
            id_file.write_text(run_id)
            self._run = wandb.init(project=self.project, dir=str(self.log_dir), config=self.config, id=run_id,
                                   resume="allow")

    def log(self, values: dict, step: int, prefix: str = "") -> None:
        """Log the numbers in `values` at `step`, each under `prefix + key`."""
        if not self.enabled:
            return
        data = scalars(values, prefix)
        if not data:
            return
        if self._writer is None and self._run is None:
            self._open(step)
        if self._writer is not None:
            for key, value in data.items():
                self._writer.add_scalar(key, value, step)
        else:
            self._run.log(data, step=step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
        if self._run is not None:
            self._run.finish()
            self._run = None
