"""Training configuration: one dataclass tree, read from YAML, overridden from the command line.

The bottom layer: it imports nothing from the package but `errors` and `settings`. Every key is checked here
for its type and range (an unknown key, a wrong type or an impossible value is a one-line error); what a key
means to a component (a judge's weights, a checkpoint to resume, a tracking backend, a world's task) is checked
by that component, all together when a run starts (fastunlearn.cli.check_run).

Each method's own settings are a section named after it (`saddle.tau`, `ovw.alpha`, ...), declared by the
method's class in fastunlearn.methods, which registers them here (`register_method`) when it is imported; the
package imports it first (fastunlearn/__init__.py), so the registry is complete before any config is made.
"""
from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from .errors import FastUnlearnError
from .settings import check_ranges, num

METHODS: list[str] = []                    # the registered methods, in registration order
TRAINED_METHODS: list[str] = []            # those that train (the loop of fastunlearn/train.py) ...
CLOSED_FORM_METHODS: list[str] = []        # ... and those solved on the weights instead (UCE, RECE)
METHOD_SECTIONS: dict[str, type] = {}      # method name -> its settings dataclass (methods with settings only)


def register_method(name: str, section: type | None, closed_form: bool = False) -> None:
    """Called by fastunlearn.methods for each method: its name, its settings dataclass (or None), and whether it
    is solved in closed form rather than trained."""
    if name not in METHODS:
        METHODS.append(name)
        (CLOSED_FORM_METHODS if closed_form else TRAINED_METHODS).append(name)
    if section is not None:
        METHOD_SECTIONS[name] = section

PARAM_SUBSETS = ("full", "attn2", "non-attn2")
FORGET_TARGETS = ("esd", "anchor", "noise")
SAVE_FORMATS = ("pipeline", "unet", "trained")


@dataclass
class EvalConfig:
    every: int = num(50, 0)             # in-training evaluation every N steps (0: only at the end) ...
    early_every: int = num(25, 0)       # ... and every N steps up to step early_until (0: no denser start)
    early_until: int = num(150, 0)
    forget_samples: int = num(100, 1)   # final evaluation: samples over the forget prompts
    retain_samples_per_prompt: int = num(20, 1)
    train_forget_samples: int = num(30, 1)   # in-training evaluation (cheaper)
    train_retain_samples_per_prompt: int = num(6, 1)
    num_inference_steps: int = num(25, 1)
    guidance_scale: float = num(4.0, 0)
    grid_seeds: int = num(4, 1)
    stop_when_forgotten: bool = False  # stop at the first evaluation where the forget criterion holds
    forget_threshold: float = num(0.10, 0, 1)     # the forget criterion: forget_accuracy (digits world) or,
                                                  # without it, the judge's forget_rate <= this
    clip_model: str | None = None      # a local CLIP model folder (transformers) for CLIPScore; none: not computed
    judge: Any = None                  # forget judge (fastunlearn.judges): none | digits | clip | classifier;
                                       # default (unset): digits in the digits world, clip with clip_model, else
                                       # none (Any, not str | None: so that "none" stays an explicit choice)
    judge_margin: float = num(0.0, 0, 1)  # clip: shows the concept iff p(concept) > max p(contrast) + margin
    judge_weights: str | None = None   # classifier: torchvision weights file (.safetensors or torch.save state dict)
    judge_arch: str = "resnet50"       # classifier: torchvision architecture name
    judge_classes: Any = None          # classifier: the concept's class index(es), e.g. 954 or "954,955"
    fid: str = "none"                  # none | inception: Inception FID/KID (torchmetrics) of the retain images,
                                       # student vs teacher (the digits world reports fid-digits regardless)
    fid_weights: str | None = None     # inception: torch-fidelity's InceptionV3 weights file (--fid-weights);
                                       # default: the torch hub cache, downloaded there when online
    lpips_weights: str | None = None   # LPIPS-alex's torchvision alexnet weights file (--lpips-weights); default:
                                       # the torch hub cache, downloaded there when online

    def due(self, step: int) -> bool:
        """Whether an in-training evaluation runs after optimiser step `step`."""
        early = self.early_every and step <= self.early_until and step % self.early_every == 0
        return bool(early or (self.every and step % self.every == 0))


@dataclass
class LoRAConfig:
    rank: int = num(0, 0)              # > 0: train PEFT LoRA adapters of this rank instead of the weights (--lora-rank)
    alpha: float | None = None         # LoRA scaling alpha (default: the rank)
    target_modules: str | None = None  # a regex or comma-separated module names; default: the attention
                                       # projections (to_q, to_k, to_v, to_out.0) of the `params` subset


@dataclass
class RobustConfig:
    """`--robust`: an inner Concept Inversion attack during training (fastunlearn.robust, docs/methods.md, "Robust
    unlearning"). The defaults were chosen on the tuning digit 9, the digit that comes back under attack as the 3 does
    (benchmarks/RESULTS.md, "A tuning digit that comes back: the 9"): 24 inner steps every 10 steps."""

    enabled: bool = False              # --robust
    concept: str | None = None         # the word(s) of the forget prompts the attack replaces ("3,three": either);
                                       # default: the embedded world's concept (digits: the digit and its name)
    init_word: str = "the"             # odd pool entries start as this word, even ones as the concept (not "a": the evaluation attack starts there)
    pool: int = num(4, 1)              # adversarial embeddings kept (one row per text encoder each), warm-started
    every: int = num(10, 1)            # refresh the pool after every N optimiser steps ...
    steps: int = num(24, 1)            # ... with this many AdamW steps of the inversion loss on the current student
    batch: int = num(8, 1)             # rows (x_0, noise, t) per inner step, spread over the pool's entries
    lr: float = num(5e-3, above=0)     # the inner AdamW's lr (weight decay 1e-2: the attack's)
    share: float = num(0.5, hi=1, above=0)  # adversarial copies per step, as a share of forget_batch_size
    strength_samples: int = num(16, 0)  # samples judged at each refresh for the pool's strength (0: not measured)

    def check(self, prefix: str) -> None:
        if not str(self.init_word).strip():
            raise FastUnlearnError(f"{prefix}init_word is empty")
        if self.concept is not None and not [w for w in str(self.concept).split(",") if w.strip()]:
            raise FastUnlearnError(f"{prefix}concept is empty: give the concept word of the forget prompts")


@dataclass
class TrainConfig:
    model: str = "digits"
    method: str = "saddle"
    params: str = "full"
    forget_prompts: Any = None       # list of prompts, or a path to a file with one prompt per line (or with
                                     # `concept: prompt` lines: several concepts, see forget_concepts)
    forget_concepts: Any = None      # several concepts in one run: {name: prompts or a prompt file}; from the command
                                     # line, --forget-prompts given more than once (one file per concept, named by
                                     # its stem). Every report gives forget rate and I_forget per concept
    retain_prompts: Any = None       # a path or a list, as forget_prompts (a file of `group: prompt` lines: neighbour
                                     # groups, see retain_groups)
    retain_groups: Any = None        # neighbour groups of the retain prompts, {name: prompts or a prompt file}, for
                                     # saddle.retain constraints | dro; from the command line, --retain-prompts given
                                     # more than once (one file per group, named by its stem)
    anchor_prompts: Any = None       # one per forget prompt, or a single one for all
    forget_digit: int = num(3, 0, 9)            # digits world only, when forget_prompts is not given
    forget_style: str | None = None  # styles world only: erase a style ("red", "bold", "red bold") instead of
                                     # forget_digit (a digit in every style), when forget_prompts is not given
    forget_target: str = "esd"
    forget_eta: float = num(1.0, 0)  # strength of the esd target's negative guidance (the ESD paper's eta)
    forget_t_min: float = num(0.0, 0, 1)  # the forget rows' timesteps are drawn from [forget_t_min * T, T) (T: the
                                     # scheduler's training steps; 0: all of them, uniform): > 0 spends the forget
                                     # term on the noisy steps, where a sample's layout and colour are decided
    forget_x0_anchor: float = num(0.0, 0, 1)  # the share of forget rows whose x_0 is the teacher's sample of the row's
                                     # anchor prompt (same initial noise) instead of the forget prompt's: the forget
                                     # term then also sees the x_t the student visits once it draws the anchor
                                     # (data-free mode; 0: none, today's data bit for bit)
    retain_target: str = "teacher"   # R's retain line against the teacher ("teacher") or the true noise ("noise", data mode)
    forget_data_dir: str | None = None  # data mode: an image folder with metadata.jsonl ({"file_name", "text"})
    retain_data_dir: str | None = None  # data mode for the retain set (else data-free from retain_prompts)
    output_dir: str = "outputs/digits-saddle"
    overwrite: bool = False
    max_steps: int = num(400, 1)
    seed: int = num(0, 0)
    lr: float = num(2e-4, above=0)
    weight_decay: float = num(0.0, 0)
    forget_batch_size: int = num(16, 1)
    retain_batch_size: int = num(16, 1)
    gradient_accumulation_steps: int = num(1, 1)
    zero_stage: int = num(0, 0, 3)
    deepspeed_config: str | None = None  # a DeepSpeed JSON; default: configs/ds_zero{zero_stage}.json
    mixed_precision: str = "no"      # no | bf16 | fp16
    gradient_checkpointing: bool = False
    attention: str = "sdpa"          # sdpa (PyTorch scaled_dot_product_attention, diffusers' default) | xformers
    teacher: str = "auto"            # auto | copy | shared: shared = no second copy of frozen weights (params != full, ZeRO < 3)
    init: str = "original"           # the student's start: original | uce (the UCE edit, fastunlearn.uce; the teacher
                                     # stays the original)
    grad_clip: float = num(1.0, 0)  # 0: no clipping
    forget_samples_per_prompt: int = num(10, 1)  # data-free mode: teacher samples cached per forget prompt
    retain_samples_per_prompt: int = num(10, 1)
    sample_steps: int = num(25, 1)           # data-free mode: DDIM steps for the teacher samples
    checkpoint_every: int = num(100, 0)  # 0: no checkpoints
    keep_checkpoints: int = num(1, 1)        # DeepSpeed checkpoints kept in output_dir/checkpoints (newest first)
    log_every: int = num(10, 1)
    max_nonfinite_steps: int = num(5, 1)     # steps in a row with a non-finite loss/gradient (each skipped) before the run stops
    cache_dir: str | None = None
    report_to: str = "none"          # training curves: none | tensorboard | wandb (into output_dir/logs; rank 0)
    save_format: str = "pipeline"    # pipeline (diffusers folder) | unet (unet/ only) | trained (unlearned.safetensors:
                                     # the trained parameters only; fastunlearn.load_unlearned applies it)
    resume_from_checkpoint: str | None = None  # None or "latest": the last complete checkpoint in output_dir (the
                                               # default behaviour); a path: that checkpoint of output_dir/checkpoints
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    robust: RobustConfig = field(default_factory=RobustConfig)

    def validate(self) -> TrainConfig:
        if self.method not in METHODS:
            raise FastUnlearnError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if self.params not in PARAM_SUBSETS:
            raise FastUnlearnError(f"unknown parameter subset {self.params!r}; choose one of {', '.join(PARAM_SUBSETS)}")
        if self.forget_target not in FORGET_TARGETS:
            raise FastUnlearnError(f"unknown forget_target {self.forget_target!r}; choose one of {', '.join(FORGET_TARGETS)}")
        if self.mixed_precision not in ("no", "bf16", "fp16"):
            raise FastUnlearnError(f"mixed_precision must be no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.attention not in ("sdpa", "xformers"):
            raise FastUnlearnError(f"attention must be sdpa or xformers, got {self.attention!r}")
        if self.teacher not in ("auto", "copy", "shared"):
            raise FastUnlearnError(f"teacher must be auto, copy or shared, got {self.teacher!r}")
        if self.teacher == "shared" and (self.params == "full" or self.zero_stage == 3):
            raise FastUnlearnError("teacher: shared needs a parameter subset (params: attn2 or non-attn2) and ZeRO stage < 3")
        if self.forget_x0_anchor and self.forget_data_dir:
            raise FastUnlearnError("forget_x0_anchor needs data-free forget rows (the teacher's samples of the anchor "
                                   "prompts), not forget_data_dir's images")
        if self.init not in ("original", "uce"):
            raise FastUnlearnError(f"init must be original or uce, got {self.init!r}")
        if self.init == "uce" and (self.lora.rank or self.teacher == "shared" or self.method in CLOSED_FORM_METHODS
                                   or (self.params != "full" and self.teacher != "copy")):
            why = ("--method " + self.method + " is a closed-form edit itself" if self.method in CLOSED_FORM_METHODS
                   else "the teacher must be a copy of the original, which LoRA and a shared teacher are not "
                   "(with --params, set teacher: copy)")
            raise FastUnlearnError(f"--init uce is for trained methods with full weights: {why}")
        check_ranges(self)
        if self.lora.rank:
            if self.zero_stage == 3:
                raise FastUnlearnError("LoRA (lora.rank > 0) runs with ZeRO stages 0-2, not 3: the adapter is what "
                                       "ZeRO partitions, and it is small; use --zero-stage 2")
            if self.lora.alpha is not None and not self.lora.alpha > 0:
                raise FastUnlearnError(f"lora.alpha must be > 0, got {self.lora.alpha}")
            if self.teacher != "auto":
                raise FastUnlearnError(f"teacher: {self.teacher} does not apply with LoRA: the teacher is the student "
                                       "with its adapters switched off (leave teacher at auto)")
        if self.method in CLOSED_FORM_METHODS:
            for given, what in ((self.robust.enabled, "--robust"), (self.lora.rank, "--lora-rank"),
                                (self.params != "full", f"--params {self.params}")):
                if given:
                    raise FastUnlearnError(f"method {self.method} edits the cross-attention to_k/to_v projections in "
                                           f"closed form, without training: {what} does not apply to it")
        if self.robust.enabled and self.zero_stage == 3:
            raise FastUnlearnError("--robust runs with ZeRO stages 0-2, not 3: its inner attack calls the student's "
                                   "module directly, whose weights ZeRO-3 partitions; use --zero-stage 2")
        if self.retain_target not in ("teacher", "noise"):
            raise FastUnlearnError(f"retain_target must be teacher or noise, got {self.retain_target!r}")
        if not str(self.output_dir).strip():
            raise FastUnlearnError("output_dir is empty: give a folder with --output-dir")
        if not str(self.model).strip():
            raise FastUnlearnError("model is empty: give a diffusers folder, a cached hub id or 'digits' with --model")
        if self.save_format not in SAVE_FORMATS:
            raise FastUnlearnError(f"save_format must be one of {', '.join(SAVE_FORMATS)}, got {self.save_format!r}")
        if self.resume_from_checkpoint is not None and not str(self.resume_from_checkpoint).strip():
            raise FastUnlearnError("resume_from_checkpoint is empty: give latest or a checkpoint folder")
        if self.resume_from_checkpoint not in (None, "latest"):
            if self.overwrite:
                raise FastUnlearnError("resume_from_checkpoint continues the unfinished run in output_dir; it cannot "
                                       "be combined with --overwrite (which starts over)")
        for name in METHOD_SECTIONS:
            check_ranges(getattr(self, name), f"{name}.")
        return self

    # One section per method that has settings, named after it and declared by its class (`Method.Config`,
    # registered by fastunlearn.methods): adding a method is adding its class there. The sections are
    # attributes beside the dataclass fields; `sections()` gives their types, `to_dict` includes them.
    def __post_init__(self):
        if not METHODS:
            raise RuntimeError("no method is registered: import fastunlearn (which imports fastunlearn.methods) "
                               "before making a TrainConfig")
        for name, section in METHOD_SECTIONS.items():
            setattr(self, name, section())

    @staticmethod
    def sections() -> dict[str, type]:
        return dict(METHOD_SECTIONS)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), **{n: dataclasses.asdict(getattr(self, n)) for n in METHOD_SECTIONS}}

# keys of earlier versions, named in the error that refuses them
MOVED_KEYS = {"method_args": "method_args was split by method: alpha -> ovw.alpha, beta -> ga.beta, inner_steps/"
                             "inner_lr/lambda_b -> erasediff.*, mask_ratio -> salun.mask_ratio, salun_alpha -> "
                             "salun.alpha, eta -> forget_eta, retain_target -> retain_target"}


def _coerce(value, typ, key):
    origin = get_origin(typ)
    if typ is Any:
        return value
    if origin is not None and type(None) in get_args(typ):  # Optional[X]
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        typ = next(a for a in get_args(typ) if a is not type(None))
    if value is None or (typ in (int, float) and isinstance(value, bool)):
        raise FastUnlearnError(f"config key {key!r} expects {getattr(typ, '__name__', typ)}, got {value!r}")
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
    if isinstance(obj, TrainConfig):
        hints.update(obj.sections())
    for key, value in data.items():
        full = f"{prefix}{key}"
        if not prefix and key in MOVED_KEYS:
            raise FastUnlearnError(f"{source}: config key {key!r} no longer exists: {MOVED_KEYS[key]}")
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


def load_config(path: str | None, cfg: TrainConfig | None = None) -> TrainConfig:
    """The YAML file at `path` over `cfg` (default: the built-in defaults)."""
    cfg = TrainConfig() if cfg is None else cfg
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


def _exists(path: Path) -> bool:
    """Path.exists that answers False for strings no file system accepts as a path (a long prompt)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


CONCEPT_LINE = re.compile(r"^\s*([A-Za-z0-9_.-]+):\s+(\S.*)$")


def read_concepts(forget_prompts, forget_concepts) -> dict[str, list[str]] | None:
    """Several forget concepts, {name: prompts}, or None for a run with one concept. From `forget_concepts`
    ({name: prompts or a file}), or from a forget prompt file whose every line reads `name: prompt` (name:
    letters, digits, `_.-`)."""
    if forget_concepts is not None:
        if forget_prompts is not None:
            raise FastUnlearnError("give forget_prompts or forget_concepts, not both")
        if not isinstance(forget_concepts, dict) or not forget_concepts:
            raise FastUnlearnError("forget_concepts must map concept names to prompts or prompt files")
        out = {str(k): read_prompts(v, f"forget prompt (concept {k})") for k, v in forget_concepts.items()}
    else:
        out = named_lines(forget_prompts)
        if out is None:
            return None
    check_disjoint(out, "forget prompt", "concepts")
    return out


def named_lines(path) -> dict[str, list[str]] | None:
    """{name: prompts} of a .txt file whose every non-empty line reads `name: prompt` (name: letters, digits, `_.-`);
    None for anything else (not such a file, or a line without a name)."""
    if not (isinstance(path, str) and Path(path).suffix == ".txt" and Path(path).is_file()):
        return None
    lines = [ln for ln in Path(path).read_text().splitlines() if ln.strip()]
    matches = [CONCEPT_LINE.match(ln) for ln in lines]
    if not lines or not all(matches):
        return None
    out: dict[str, list[str]] = {}
    for m in matches:
        out.setdefault(m.group(1), []).append(m.group(2).strip())
    return out


def check_disjoint(named: dict[str, list[str]], what: str, kind: str) -> None:
    """A one-line error when a prompt is in two of the named sets."""
    seen: dict[str, str] = {}
    for name, prompts in named.items():
        for q in prompts:
            if q in seen and seen[q] != name:
                raise FastUnlearnError(f"{what} {q!r} is in two {kind} ({seen[q]} and {name})")
            seen[q] = name


def read_prompts(value, what: str) -> list[str] | None:
    """A prompt list from a list, a single string, or a path to a text file (one prompt per line)."""
    if value is None:
        return None
    if isinstance(value, str):
        p = Path(value)
        if p.suffix in (".txt", ".csv", ".json") or _exists(p):
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
