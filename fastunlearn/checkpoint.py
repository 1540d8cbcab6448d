"""Crash-safe files: atomic writes, committed DeepSpeed checkpoints, and a pickle check before loading.

A checkpoint is written by DeepSpeed under a hidden `.partial-<tag>` folder, renamed to `<tag>` once
every rank has finished, and only then named in `latest` (itself replaced atomically). So a process
killed at any moment leaves either the previous complete checkpoint or a `.partial-*` folder, which
resuming ignores with a warning and removes.

DeepSpeed loads its checkpoint files with `torch.load(weights_only=False)`. Before it does, every
file is scanned without unpickling (`torch.serialization.get_unsafe_globals_in_checkpoint`): only
tensors, plain containers and the DeepSpeed bookkeeping classes below may appear; a file that
names any other Python callable could run code when loaded, and is refused.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .errors import FastUnlearnError

PARTIAL = ".partial-"
# what DeepSpeed's ZeRO optimizer states pickle besides tensors (data classes, no code on load)
ALLOWED_GLOBALS = {
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
}


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` so that readers see the old file or the new one, never half of one."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def check_no_code(folder: Path) -> None:
    """Refuse a checkpoint folder whose pickles reference anything but tensors and known data classes."""
    for f in sorted(Path(folder).rglob("*.pt")):
        try:
            names = torch.serialization.get_unsafe_globals_in_checkpoint(str(f))
        except Exception as exc:  # not a torch zip file: a truncated or foreign file
            raise FastUnlearnError(f"checkpoint file {f} is unreadable ({type(exc).__name__}); "
                                   "delete it or start a fresh --output-dir") from None
        bad = sorted(set(names) - ALLOWED_GLOBALS)
        if bad:
            raise FastUnlearnError(f"checkpoint file {f} contains pickled code or objects ({', '.join(bad[:3])}); "
                                   "refusing to load it")


def partial_checkpoints(ckpt_dir: Path) -> list[Path]:
    return sorted(p for p in Path(ckpt_dir).glob(PARTIAL + "*") if p.is_dir()) if Path(ckpt_dir).is_dir() else []


def latest_complete(ckpt_dir: Path) -> str | None:
    """The tag named in `latest` if its folder exists, else None."""
    latest = Path(ckpt_dir) / "latest"
    if not latest.is_file():
        return None
    tag = latest.read_text().strip()
    return tag if tag and (Path(ckpt_dir) / tag).is_dir() else None


def commit(ckpt_dir: Path, tag: str, keep: int) -> None:
    """Rank 0, after every rank wrote `.partial-<tag>`: rename it to `<tag>`, point `latest` at it,
    then delete all but the newest `keep` complete checkpoints."""
    ckpt_dir = Path(ckpt_dir)
    final = ckpt_dir / tag
    if final.exists():
        shutil.rmtree(final)
    os.replace(ckpt_dir / (PARTIAL + tag), final)
    atomic_write_text(ckpt_dir / "latest", tag)
    tags = sorted((p for p in ckpt_dir.glob("step-*") if p.is_dir()), key=lambda p: int(p.name.split("-")[1]))
    for old in tags[: max(0, len(tags) - keep)]:
        shutil.rmtree(old, ignore_errors=True)


def save(engine, ckpt_dir: Path, step: int, state: dict, keep: int, rank: int, world: int) -> None:
    """A DeepSpeed checkpoint of `step` under `.partial-step-N`, renamed to `step-N` and named in
    `latest` once every rank has written its shard; `state` (the run's own state) travels with it.
    Rank 0 keeps the newest `keep` (an SDXL optimizer state is tens of GB)."""
    import torch.distributed as dist

    from .engine import fault

    tag = f"step-{step}"
    engine.save_checkpoint(str(ckpt_dir), tag=PARTIAL + tag, client_state=state, save_latest=False)  # ends in a barrier
    fault("checkpoint-written", step, rank)
    if rank == 0:
        commit(ckpt_dir, tag, keep)
    if world > 1:
        dist.barrier()


def resume_run(engine, cfg, rank: int, world: int, warn):
    """The checkpoint a run continues from, loaded into `engine`: `cfg.resume_from_checkpoint` when it names one
    of output_dir/checkpoints, else the last complete one there (partial ones from a killed run are ignored
    with a warning). Returns (path, the run's saved state) or None."""
    ckpt_dir = Path(cfg.output_dir) / "checkpoints"
    found = resume(engine, ckpt_dir, rank, world, warn, tag=check_resume(cfg))
    if found is None and cfg.resume_from_checkpoint == "latest":
        warn(f"resume_from_checkpoint latest: no complete checkpoint in {ckpt_dir}; starting a new run")
    return found


def check_resume(cfg) -> str | None:
    """The tag of the checkpoint `resume_from_checkpoint` (of a TrainConfig) names: a complete one of the run's
    output_dir/checkpoints, or a one-line error before anything is loaded. None: unset or `latest`."""
    if cfg.resume_from_checkpoint in (None, "latest"):
        return None
    return resolve_checkpoint(Path(cfg.output_dir) / "checkpoints", cfg.resume_from_checkpoint)


def resolve_checkpoint(ckpt_dir: Path, spec: str) -> str:
    """The tag of the complete checkpoint `spec` names (a path, or a folder name in `ckpt_dir`), or a
    one-line error when it is not a complete checkpoint of `ckpt_dir`."""
    ckpt_dir = Path(ckpt_dir)
    path = Path(spec).expanduser()
    if not path.exists() and len(path.parts) == 1:
        path = ckpt_dir / spec
    complete = sorted((p.name for p in ckpt_dir.glob("step-*") if p.is_dir()), key=lambda n: int(n.split("-")[1])
                      if n.split("-")[1].isdigit() else -1) if ckpt_dir.is_dir() else []
    have = f"the complete ones in {ckpt_dir}: {', '.join(complete)}" if complete else f"{ckpt_dir} holds none"
    if not path.is_dir():
        raise FastUnlearnError(f"resume_from_checkpoint {spec}: no such checkpoint folder ({have})")
    if path.resolve().parent != ckpt_dir.resolve():
        raise FastUnlearnError(f"resume_from_checkpoint {spec} is not a checkpoint of this run's output_dir "
                               f"({have}); a run resumes only from its own checkpoints")
    if path.name.startswith(PARTIAL):
        raise FastUnlearnError(f"resume_from_checkpoint {spec} is an incomplete checkpoint (its run was killed while "
                               f"writing it); {have}")
    if not (path.name.startswith("step-") and path.name[5:].isdigit() and any(path.rglob("*.pt"))):
        raise FastUnlearnError(f"resume_from_checkpoint {spec} is not a complete checkpoint (no DeepSpeed "
                               f"step-N folder with model states); {have}")
    return path.name


def resume(engine, ckpt_dir: Path, rank: int, world: int, warn, tag: str | None = None) -> tuple[str, dict] | None:
    """Load the last complete checkpoint (or the complete checkpoint `tag`) into `engine`: (its path, the run
    state saved with it), or None. Partial checkpoints of a killed run are removed with a warning. Which
    checkpoint to load is decided on rank 0 (every rank follows), and its files are scanned for pickled code first."""
    import torch.distributed as dist

    from .engine import from_rank0

    partial, latest = from_rank0((partial_checkpoints(ckpt_dir), latest_complete(ckpt_dir)) if rank == 0 else None)
    tag = tag or latest
    if partial:
        warn(f"ignoring incomplete checkpoint(s) {', '.join(p.name for p in partial)} left by an interrupted run")
        if world > 1:
            dist.barrier()  # every rank has listed them before rank 0 removes them
        if rank == 0:
            for p in partial:
                shutil.rmtree(p, ignore_errors=True)
    if tag is None:
        return None
    check_no_code(Path(ckpt_dir) / tag)
    path, state = engine.load_checkpoint(str(ckpt_dir), tag=tag)
    if path is None:
        raise FastUnlearnError(f"checkpoint {Path(ckpt_dir) / tag} could not be loaded; delete it to start over")
    return str(Path(ckpt_dir) / tag), state
