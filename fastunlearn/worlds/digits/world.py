"""The digits world's cache: `load_world()` returns the cached world, building it first (build.py) when it is
missing, partial or corrupt; `world_problem` says why a cached world cannot be used."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from .. import cache
from ..cache import BuiltWorld
from .build import WORLD_VERSION, Recipe, build_world
from .classifier import DigitClassifier


@dataclass
class DigitsWorld(BuiltWorld):
    classifier: DigitClassifier


def world_problem(path: Path, recipe: Recipe | None = None, version: str = WORLD_VERSION) -> str | None:
    """Why the world at `path` cannot be used (missing, partial, corrupt, stale), or None if it is complete."""
    return cache.world_problem(path, recipe, version)


def world_path(cache_dir=None, recipe: Recipe = Recipe(), version: str = WORLD_VERSION) -> Path:
    """The cache folder of a world: named by its version, plus a hash of the recipe when not the default one."""
    return cache.world_path(cache_dir, recipe, version)


def ensure_world(cache_dir=None, recipe: Recipe = Recipe(), progress: bool = True, rebuild: bool = False) -> Path:
    """Path of a complete world, building it (atomically, under a lock) when missing, partial or corrupt."""
    return cache.ensure_built(world_path(cache_dir, recipe), recipe, build_world, WORLD_VERSION, "digits",
                              lambda info: f"classifier held-out accuracy {info['classifier_heldout_accuracy']:.3f}, "
                                           f"base pipeline draws the prompted digit {info['base_accuracy']:.3f} of "
                                           "the time",
                              progress, rebuild)


def load_world(cache_dir=None, recipe: Recipe = Recipe(), progress: bool = True, device="cpu") -> DigitsWorld:
    return cache.load_built(ensure_world(cache_dir, recipe, progress), DigitsWorld, DigitClassifier, device)
