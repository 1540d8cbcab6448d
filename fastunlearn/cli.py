"""The training command's command line: flags, the diffusers-style aliases, the config they make, and the
one place where every component checks its own section of that config before a run starts (`check_run`).

    cfg = config_from_args(argv)    # parse, load --config, apply flags and --set, check everything
"""
from __future__ import annotations

import argparse
from pathlib import Path

from . import worlds
from .config import TrainConfig, apply_dict, load_config, set_dotted
from .errors import FastUnlearnError


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
    flag("--method", "saddle | ovw | esd | erasediff | salun | ga | ca (trained) | uce | rece (closed-form edits "
                     "of the cross-attention to_k/to_v, no training steps)")
    flag("--params", "trained parameters: full | attn2 | non-attn2")
    p.add_argument("--forget-prompts", action="append", default=None, metavar="FILE|PROMPT",
                   help="forget prompts: a text file (one per line, or `concept: prompt` lines for several concepts) "
                        "or one prompt; repeatable: one file per concept, named by the file's stem (forget_concepts). "
                        "Default: digits world, from --forget-digit")
    p.add_argument("--retain-prompts", action="append", default=None, metavar="FILE|PROMPT",
                   help="retain prompts: a text file (one per line, or `group: prompt` lines for neighbour groups) or "
                        "one prompt; repeatable: one file per neighbour group, named by the file's stem "
                        "(retain_groups, for saddle.retain constraints|dro). Default: an embedded world's other classes")
    flag("--anchor-prompts", "anchor prompt(s) for forget_target=anchor and ca: a file or one prompt")
    flag("--forget-digit", "digits world: the digit to forget", int)
    flag("--forget-style", "styles world: the style to forget (red, bold, red bold, ...) instead of a digit")
    flag("--output-dir", "where the pipeline, report.json, grid.png, train.log and checkpoints go")
    flag("--max-steps", "optimiser steps (uce, rece: none)", int)
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
    p.add_argument("--init", choices=("original", "uce"), default=None,
                   help="the student's start: the original model, or its UCE edit (a trained method starting from "
                        "the closed-form edit, uce.* settings; the teacher stays the original; docs/methods.md)")
    p.add_argument("--robust", action="store_true", default=None,
                   help="adversarial unlearning, with any method: an inner Concept Inversion attack on the student "
                        "every robust.every steps, whose embeddings the forget term also sees (robust.enabled; "
                        "settings robust.*, docs/methods.md; default: off)")
    p.add_argument("--robust-concept", default=None, metavar="WORD",
                   help="the concept word of the forget prompts that --robust's attack replaces, 'a,b' for either "
                        "(robust.concept; default: the embedded world's, e.g. the digit and its name)")
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
    """The run's config: the built-in defaults, under an embedded world's `method_defaults` for the run's method,
    under the --config file, under the flags, under --set (each layer wins over the ones before it)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    cfg = apply_args(args, load_config(args.config))
    defaults = world_method_defaults(cfg)
    if defaults:  # the same layers again, over the world's defaults: a key the user set in any of them wins
        base = TrainConfig()
        for key, value in defaults.items():
            *parents, last = key.split(".")
            data: dict = {last: value}
            for part in reversed(parents):
                data = {part: data}
            apply_dict(base, data, source=f"method_defaults of the {cfg.model} world")
        cfg = apply_args(args, load_config(args.config, base))
    return check_run(cfg)


def world_method_defaults(cfg: TrainConfig) -> dict:
    """{dotted config key: value}: what the embedded world `cfg.model` (if it is one) sets for `cfg.method` by
    default (`World.method_defaults_for(cfg)`: its `method_defaults`, {method: {key: value}}, and what it sets for
    the run's task); the user's config, flags and --set win over it."""
    world = worlds.get(cfg.model, cfg.cache_dir)
    defaults = dict(world.method_defaults_for(cfg)) if world is not None else {}
    for key in ("model", "method"):
        if key in defaults:
            raise FastUnlearnError(f"method_defaults of the {cfg.model} world cannot set {key}")
    return defaults


def apply_args(args, cfg: TrainConfig) -> TrainConfig:
    """The command line's flags and --set over `cfg` (from the config file)."""
    values = {"forget_prompts": args.forget_prompts, "retain_prompts": args.retain_prompts}
    if args.forget_prompts is not None and len(args.forget_prompts) > 1:  # several concepts, one file each
        files = [Path(v) for v in args.forget_prompts]
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FastUnlearnError(f"--forget-prompts given more than once takes one prompt file per concept; "
                                   f"{missing[0]} is not a file")
        if len({f.stem for f in files}) != len(files):
            raise FastUnlearnError("--forget-prompts files name their concepts by their stems, and two share one: "
                                   + ", ".join(str(f) for f in files))
        cfg.forget_concepts, values["forget_prompts"] = {f.stem: str(f) for f in files}, None
    elif args.forget_prompts is not None:
        values["forget_prompts"] = args.forget_prompts[0]
    if args.retain_prompts is not None and len(args.retain_prompts) > 1:  # neighbour groups, one file each
        from .groups import groups_from_files

        cfg.retain_groups, values["retain_prompts"] = groups_from_files(args.retain_prompts), None
    elif args.retain_prompts is not None:
        values["retain_prompts"] = args.retain_prompts[0]
    named = ("model", "method", "params", "forget_prompts", "retain_prompts", "anchor_prompts", "forget_digit",
             "forget_style", "output_dir", "max_steps", "zero_stage", "seed", "report_to", "save_format", "resume_from_checkpoint")
    for flag in named:
        value = values[flag] if flag in values else getattr(args, flag)
        if value is not None:
            setattr(cfg, flag, value)
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
    if args.robust:
        cfg.robust.enabled = True
    if args.robust_concept is not None:
        cfg.robust.concept = args.robust_concept
    if args.init is not None:
        cfg.init = args.init
    if args.fid_weights is not None:
        cfg.eval.fid, cfg.eval.fid_weights = "inception", args.fid_weights
    if args.lpips_weights is not None:
        cfg.eval.lpips_weights = args.lpips_weights
    for item in args.set:
        if "=" not in item:
            raise FastUnlearnError(f"--set expects KEY=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        set_dotted(cfg, key, value)
    return cfg


def command_line(argv) -> str:
    """The command that reruns these arguments (the launcher's --local_rank left out)."""
    import shlex

    args = [a for i, a in enumerate(argv) if not a.startswith(("--local_rank", "--local-rank"))
            and not (i and argv[i - 1] in ("--local_rank", "--local-rank"))]
    return shlex.join(["python", "fastunlearn/train.py", *args])


def check_run(cfg: TrainConfig) -> TrainConfig:
    """Every key of `cfg` checked, each by the component it belongs to, before anything is loaded or written:
    the config's types and ranges (and the methods' sections), the judges' and metrics' keys, the tracking
    backend, the checkpoint to resume from, --robust's concept word. Returns `cfg`."""
    from .checkpoint import check_resume
    from .judges import check_eval_config
    from .robust import check_robust
    from .tracking import check_available

    cfg.validate()
    check_available(cfg.report_to)
    check_resume(cfg)
    check_eval_config(cfg.eval, "eval.", worlds.get(cfg.model, cfg.cache_dir))
    check_robust(cfg)  # the concept word against the forget prompts
    return cfg
