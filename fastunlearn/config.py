"""Training configuration: one dataclass tree, read from YAML, overridden from the command line.

Every key is checked: an unknown key, a wrong type or an impossible value is a one-line error.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from .errors import FastUnlearnError

METHODS = ("saddle", "ovw", "esd", "erasediff", "salun", "ga", "ca")
PARAM_SUBSETS = ("full", "attn2", "non-attn2")
FORGET_TARGETS = ("esd", "anchor", "noise")


@dataclass
class SaddleConfig:
    tau: float = 0.2            # constraint level, as a fraction of G0 (the original model's forget gap)
    eta_lambda: float = 0.1     # dual step size, in units of 1/G0
    lambda_init: float = 1.0
    lambda_max: float = 10.0
    gap_ema: float = 0.9        # Ĝ = running mean of G with this decay
    g0_batches: int = 8         # forget batches averaged to measure G0 before training


@dataclass
class MethodConfig:
    alpha: float = 0.25         # OVW: weight of G (0.25: the digits comparison, benchmarks/RESULTS.md)
    eta: float = 1.0            # ESD negative-guidance strength (the paper's eta)
    beta: float = 1.0           # GA: weight of the ascent term
    inner_steps: int = 2        # EraseDiff: inner steps on the forget loss
    inner_lr: float = 1e-3      # EraseDiff: inner SGD step size
    lambda_b: float = 0.1       # EraseDiff: weight of (f(θ) − f̂)
    mask_ratio: float = 0.5     # SalUn: share of parameters in the saliency mask
    salun_alpha: float = 0.5    # SalUn: weight of the retain loss
    retain_target: str = "teacher"  # "teacher" (distillation) or "noise" (data mode only)


@dataclass
class EvalConfig:
    every: int = 50             # in-training evaluation every N steps (0: only at the end)
    forget_samples: int = 100   # final evaluation: samples over the forget prompts
    retain_samples_per_prompt: int = 20
    train_forget_samples: int = 30   # in-training evaluation (cheaper)
    train_retain_samples_per_prompt: int = 6
    num_inference_steps: int = 25
    guidance_scale: float = 4.0
    grid_seeds: int = 4
    stop_when_forgotten: bool = False  # stop at the first evaluation where the forget criterion holds
    forget_threshold: float = 0.10     # digits world: the forget criterion is forget_accuracy <= this
    clip_model: str | None = None      # a local CLIP model folder (transformers) for CLIPScore; none: not computed


@dataclass
class TrainConfig:
    model: str = "digits"
    method: str = "saddle"
    params: str = "full"
    forget_prompts: Any = None       # list of prompts, or a path to a file with one prompt per line
    retain_prompts: Any = None
    anchor_prompts: Any = None       # one per forget prompt, or a single one for all
    forget_digit: int = 3            # digits world only, when forget_prompts is not given
    forget_target: str = "esd"
    forget_data_dir: str | None = None  # data mode: an image folder with metadata.jsonl ({"file_name", "text"})
    retain_data_dir: str | None = None  # data mode for the retain set (else data-free from retain_prompts)
    output_dir: str = "outputs/digits-saddle"
    overwrite: bool = False
    max_steps: int = 400
    seed: int = 0
    lr: float = 2e-4
    weight_decay: float = 0.0
    forget_batch_size: int = 16
    retain_batch_size: int = 16
    gradient_accumulation_steps: int = 1
    zero_stage: int = 0
    deepspeed_config: str | None = None  # a DeepSpeed JSON; default: configs/ds_zero{zero_stage}.json
    mixed_precision: str = "no"      # no | bf16 | fp16
    gradient_checkpointing: bool = False
    teacher: str = "auto"            # auto | copy | shared: shared = no second copy of frozen weights (params != full, ZeRO < 3)
    grad_clip: float = 1.0
    forget_samples_per_prompt: int = 10  # data-free mode: teacher samples cached per forget prompt
    retain_samples_per_prompt: int = 10
    sample_steps: int = 25           # data-free mode: DDIM steps for the teacher samples
    checkpoint_every: int = 100
    keep_checkpoints: int = 1        # DeepSpeed checkpoints kept in output_dir/checkpoints (newest first)
    log_every: int = 10
    max_nonfinite_steps: int = 5     # steps in a row with a non-finite loss/gradient (each skipped) before the run stops
    cache_dir: str | None = None
    saddle: SaddleConfig = field(default_factory=SaddleConfig)
    method_args: MethodConfig = field(default_factory=MethodConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)

    def validate(self) -> TrainConfig:
        if self.method not in METHODS:
            raise FastUnlearnError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.params not in PARAM_SUBSETS:
            raise FastUnlearnError(f"unknown parameter subset {self.params!r}; choose one of {', '.join(PARAM_SUBSETS)}")
        if self.forget_target not in FORGET_TARGETS:
            raise FastUnlearnError(f"unknown forget_target {self.forget_target!r}; choose one of {', '.join(FORGET_TARGETS)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise FastUnlearnError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.teacher not in ("auto", "copy", "shared"):
            raise FastUnlearnError(f"teacher must be auto, copy or shared, got {self.teacher!r}")
        if self.teacher == "shared" and (self.params == "full" or self.zero_stage == 3):
            raise FastUnlearnError("teacher: shared needs a parameter subset (params: attn2 or non-attn2) and ZeRO stage < 3")
        if self.zero_stage not in (0, 1, 2, 3):
            raise FastUnlearnError(f"zero_stage must be 0, 1, 2 or 3, got {self.zero_stage}")
        if self.method_args.retain_target not in ("teacher", "noise"):
            raise FastUnlearnError("method_args.retain_target must be teacher or noise")
        for name in ("max_steps", "forget_batch_size", "retain_batch_size", "gradient_accumulation_steps",
                     "forget_samples_per_prompt", "retain_samples_per_prompt", "sample_steps", "keep_checkpoints",
                     "max_nonfinite_steps"):
            if getattr(self, name) < 1:
                raise FastUnlearnError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.eval.clip_model and not Path(self.eval.clip_model).is_dir():
            raise FastUnlearnError(f"eval.clip_model {self.eval.clip_model} is not a folder (a local CLIP model)")
        if not 0 <= self.forget_digit <= 9:
            raise FastUnlearnError(f"forget_digit must be 0..9, got {self.forget_digit}")
        return self

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _coerce(value, typ, key):
    origin = get_origin(typ)
    if typ is Any:
        return value
    if origin is not None and type(None) in get_args(typ):  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ = next(a for a in get_args(typ) if a is not type(None))
    try:
        if typ is bool:
            if isinstance(value, str):
                if value.lower() in ("1", "true", "yes", "on"):
                    return True
                if value.lower() in ("0", "false", "no", "off"):
                    return False
                raise ValueError
            return bool(value)
        if typ is int and isinstance(value, float) and not value.is_integer():
            raise ValueError
        return typ(value)
    except (TypeError, ValueError):
        raise FastUnlearnError(f"config key {key!r} expects {getattr(typ, '__name__', typ)}, got {value!r}") from None


def apply_dict(obj, data: dict, prefix: str = "", source: str = "config"):
    """Set fields of dataclass `obj` from a (nested) dict; unknown keys are errors."""
    if not isinstance(data, dict):
        raise FastUnlearnError(f"{source}: expected a mapping at {prefix or 'top level'}, got {type(data).__name__}")
    hints = get_type_hints(type(obj))
    for key, value in data.items():
        full = f"{prefix}{key}"
        if key not in hints:
            raise FastUnlearnError(f"{source}: unknown config key {full!r}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            apply_dict(current, value, f"{full}.", source)
        else:
            setattr(obj, key, _coerce(value, hints[key], full))
    return obj


def set_dotted(cfg: TrainConfig, dotted: str, value) -> None:
    *parents, last = dotted.replace("-", "_").split(".")
    data: dict = {last: value}
    for p in reversed(parents):
        data = {p: data}
    apply_dict(cfg, data, source="--set")


def load_config(path: str | None) -> TrainConfig:
    cfg = TrainConfig()
    if path:
        p = Path(path)
        if not p.is_file():
            raise FastUnlearnError(f"config file {path} does not exist")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise FastUnlearnError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from None
        apply_dict(cfg, data, source=str(path))
    return cfg


def read_prompts(value, what: str) -> list[str] | None:
    """A prompt list from a list, a single string, or a path to a text file (one prompt per line)."""
    if value is None:
        return None
    if isinstance(value, str):
        p = Path(value)
        if p.suffix in (".txt", ".csv", ".json") or p.exists():
            if not p.is_file():
                raise FastUnlearnError(f"{what} file {value} does not exist")
            try:
                text = p.read_text()
            except (OSError, UnicodeDecodeError) as exc:
                raise FastUnlearnError(f"{what} file {value} cannot be read: {exc}") from None
            if p.suffix == ".json":
                try:
                    prompts = json.loads(text)
                except ValueError as exc:
                    raise FastUnlearnError(f"{what} file {value} is not valid JSON: {exc}") from None
                if not isinstance(prompts, list):
                    raise FastUnlearnError(f"{what} file {value} must hold a JSON list of prompts")
            else:
                prompts = [ln.strip() for ln in text.splitlines()]
        else:
            prompts = [value]
    else:
        prompts = list(value)
    prompts = [str(x).strip() for x in prompts if str(x).strip()]
    if not prompts:
        raise FastUnlearnError(f"{what} list is empty")
    return prompts
