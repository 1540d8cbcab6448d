"""The cache of built worlds, shared by every embedded world: a world is built into a temporary folder and
moved into place under a lock (`ensure_built`), in a folder named by its version and recipe (`world_path`), checked
against the SHA-256 of every file its world.json lists (`world_problem`, `files_problem`) and loaded as a
`BuiltWorld` (`load_built`)."""
from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import sys
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from ..paths import cache_root, ensure_writable_dir
from ..sampling import SamplerConfig


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def files_problem(root: Path, files: dict[str, str]) -> str | None:
    """Why the files a manifest lists under `root` ({relative path: sha256}) are unusable, or None."""
    for rel, digest in files.items():
        if not (root / rel).is_file():
            return f"partial ({rel} missing)"
        if _sha256(root / rel) != digest:
            return f"corrupt ({rel} does not match its checksum)"
    return None


def file_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): _sha256(p) for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "world.json"}


@dataclass
class BuiltWorld:
    """A world loaded from its cache folder: world.json's dict, the pipeline and the classifier (the judge)."""

    path: Path
    info: dict
    pipeline: object
    classifier: object

    @property
    def pipeline_path(self) -> Path:
        return self.path / "pipeline"

    @property
    def sampler(self) -> SamplerConfig:
        return SamplerConfig(**self.info["sampler"])


def world_problem(path: Path, recipe, version: str) -> str | None:
    """Why the world at `path` cannot be used (missing, partial, corrupt, stale), or None if it is complete."""
    manifest = path / "world.json"
    if not path.exists():
        return "missing"
    if not manifest.is_file():
        return "partial (no world.json)"
    try:
        info = json.loads(manifest.read_text())
        files = info["files"]
    except (OSError, ValueError, KeyError):
        return "corrupt world.json"
    if info.get("version") != version:
        return f"built by another version ({info.get('version')})"
    if recipe is not None and info.get("recipe") != asdict(recipe):
        return "built with another recipe"
    return files_problem(path, files)


def start_rebuild(path: Path, tmp: Path, problem: str, what: str) -> Path:
    """`tmp`, emptied for a build of `what` that will replace `path`; says why `path` is rebuilt unless missing."""
    if problem != "missing":
        print(f"fastunlearn: {what} at {path} is {problem}; rebuilding", file=sys.stderr)
    shutil.rmtree(tmp, ignore_errors=True)
    return tmp


@contextmanager
def lock(path: Path):
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def world_path(cache_dir, recipe, version: str) -> Path:
    """The cache folder of a world: named by its version, plus a hash of the recipe when not the default one."""
    name = version if recipe == type(recipe)() else f"{version}-{hashlib.sha256(json.dumps(asdict(recipe), sort_keys=True).encode()).hexdigest()[:10]}"
    return cache_root(cache_dir) / name


def ensure_built(path: Path, recipe, build, version: str, name: str, summary, progress: bool = True,
                 rebuild: bool = False) -> Path:
    """`path` once it holds a complete world: built by `build(tmp, recipe, progress)` into a temporary folder and
    moved into place (atomically, under a lock) when missing, partial or corrupt. `summary(info)`: what to print."""
    root = ensure_writable_dir(path.parent)
    with lock(root / f".{path.name}.lock"):
        problem = "rebuild requested" if rebuild else world_problem(path, recipe, version)
        if problem is None:
            return path
        tmp = start_rebuild(path, root / f".{path.name}.tmp-{os.getpid()}", problem, f"{name} world")
        tmp.mkdir()
        try:
            info = build(tmp, recipe, progress)
            if path.exists():
                shutil.rmtree(path)
            os.replace(tmp, path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        if progress:
            print(f"fastunlearn: built the {name} world in {info['build_seconds']:.0f} s at {path}: {summary(info)}",
                  file=sys.stderr)
    return path


def load_built(path: Path, world_type, classifier_type, device="cpu"):
    """The `world_type` (a BuiltWorld) at `path`, a complete world: its pipeline, loaded with `from_pretrained` as
    SD 1.5 is, world.json, and its `classifier_type` classifier."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(path / "pipeline", safety_checker=None,
                                                   requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    info = json.loads((path / "world.json").read_text())
    return world_type(path, info, pipe, classifier_type.load(path / "classifier").to(device))
