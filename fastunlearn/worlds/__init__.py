"""Embedded worlds: tiny but real diffusers pipelines built offline, each with its prompts, a judge
and evaluation sets. A world is chosen by naming it as the model (`--model digits`); `get` is the one
place where such names are resolved. The rest of fastunlearn uses a world only through this
interface:

    world.pipeline_path()                        the pipeline folder (built and cached on first use)
    world.prompts(forget, retain, cfg, concepts) default forget/retain prompts, and the world's info
                                                 about the run (None: the prompts are not the world's)
    world.evaluation(info, n_forget, n_retain)   evaluation sets, perceptual network and judge
    world.report_fields(info)                    what the world adds to a run's report
    world.retain_groups(info, retain)            the neighbour group of each retain prompt (Saddle's
                                                 retain: constraints | dro), or None
    world.anchor_prompts(info, forget)           the anchor of each forget prompt when the user gives none
                                                 (methods.forget_target anchor, ca, uce), or None: ""
    world.method_defaults_for(cfg)               {config key: value}: the world's own defaults for the run's
                                                 method (and task), under the user's config (fastunlearn.cli)
    world.eval_prompts(), world.perceptual()     defaults of `python -m fastunlearn.evaluate`
"""
from __future__ import annotations

from pathlib import Path

WORLDS = {"digits": "fastunlearn.worlds.digits", "styles": "fastunlearn.worlds.styles"}


def get(name: str, cache_dir=None):
    """The embedded world called `name`, or None when `name` is not a world (a model path or hub id)."""
    if name not in WORLDS:
        return None
    import importlib

    return importlib.import_module(WORLDS[name]).World(cache_dir)


def of_pipeline(path: str, cache_dir=None):
    """The world whose built pipeline folder `path` is (or is named), else None."""
    world = get(path, cache_dir)
    if world is not None:
        return world
    manifest = Path(path).expanduser() / ".." / "world.json"
    if manifest.is_file():
        import json

        version = str(json.loads(manifest.read_text()).get("version", ""))
        return next((get(name, cache_dir) for name in WORLDS if version.startswith(name)), None)
    return None
