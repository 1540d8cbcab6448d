"""Neighbour groups of the retain prompts (issue 26): where they come from and which group each retain row is in.

Saddle's `retain: constraints | dro` (fastunlearn.saddle_groups, docs/methods.md, "Saddle with neighbour groups")
measures the retain loss per group. The groups come from, in this order:

* the user: `--retain-prompts` given more than once (one file per group, named by the file's stem), a retain
  prompt file whose every line reads `group: prompt` (as forget `concept: prompt` lines), or `retain_groups:
  {name: prompts or a file}` in the YAML;
* else an embedded world, for a run that is one of its tasks (`world.retain_groups(info, retain)`: the digits
  world groups by the digit a prompt names; the styles world by the other style for a style task, by the other
  digit for a digit task);
* else none, which is a one-line error when the run needs them.

A group's prompts always belong to the retain set; `GroupIndex` maps the conditioning id of every retain prompt
to its group, so that the rows of a micro-batch (their `c_r` ids) carry their group with no change to the data.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from .config import check_disjoint, named_lines, read_prompts
from .errors import FastUnlearnError


def _check_names(names) -> None:
    """Group names are keys of train.log, the tracker and report.json: no two may read alike there."""
    seen = {}
    for name in names:
        key = log_key(name)
        if not key:
            raise FastUnlearnError("a retain group has an empty name")
        if key in seen:
            raise FastUnlearnError(f"retain group {name!r} is named twice ({seen[key]!r} and {name!r})")
        seen[key] = name


def log_key(name: str) -> str:
    """A group's name as it appears in train.log and the tracker (`R_g/<key>`): its blanks as underscores."""
    return re.sub(r"\s+", "_", str(name).strip())


def groups_from_files(files) -> dict[str, str]:
    """`--retain-prompts` given more than once: {file stem: file}, one group per file."""
    paths = [Path(v) for v in files]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FastUnlearnError(f"--retain-prompts given more than once takes one prompt file per neighbour group; "
                               f"{missing[0]} is not a file")
    stems: dict[str, Path] = {}
    for p in paths:
        if p.stem in stems:
            raise FastUnlearnError(f"retain group {p.stem!r} is named twice: {stems[p.stem]} and {p} (the groups of "
                                   "--retain-prompts are named by the files' stems)")
        stems[p.stem] = p
    return {stem: str(p) for stem, p in stems.items()}


def read_retain_groups(retain_prompts, retain_groups) -> dict[str, list[str]] | None:
    """{group name: prompts} given by the user, or None: from `retain_groups` ({name: prompts or a file}), or from a
    retain prompt file whose every line reads `group: prompt` (name: letters, digits, `_.-`)."""
    if retain_groups is not None:
        if retain_prompts is not None:
            raise FastUnlearnError("give retain_prompts or retain_groups, not both")
        if not isinstance(retain_groups, dict) or not retain_groups:
            raise FastUnlearnError("retain_groups must map neighbour group names to prompts or prompt files")
        out = {}
        for name, value in retain_groups.items():
            try:
                out[str(name)] = read_prompts(value, f"retain prompt (group {name})")
            except FastUnlearnError as exc:
                if "list is empty" not in str(exc):
                    raise
                raise FastUnlearnError(f"retain group {name!r} is empty: it has no prompts") from None
    else:
        out = named_lines(retain_prompts)
        if out is None:
            return None
    _check_names(out)
    check_disjoint(out, "retain prompt", "groups")
    return out


def retain_prompts_of(cfg) -> list[str] | None:
    """The run's retain prompt list as the user gave it (data.resolve_prompts): all the groups' prompts when given
    in groups, else the prompts of `retain_prompts`."""
    groups = read_retain_groups(cfg.retain_prompts, cfg.retain_groups)
    if groups is None:
        return read_prompts(cfg.retain_prompts, "retain prompt")
    return list(dict.fromkeys(q for prompts in groups.values() for q in prompts))


@dataclass
class RetainGroups:
    """The run's neighbour groups: names, each one's prompts, and where they came from."""

    names: list[str]
    prompts: list[list[str]]
    source: str  # "user" | "world"

    def index(self, prompt_index: dict[str, int]) -> GroupIndex:
        """Bound to the run's conditioning table (prompt -> id, fastunlearn.models.Conditioner.index)."""
        of_id = torch.full((max(prompt_index.values()) + 1,), -1, dtype=torch.long)
        for k, prompts in enumerate(self.prompts):
            for q in prompts:
                of_id[prompt_index[q]] = k
        return GroupIndex(list(self.names), of_id, self.source)


@dataclass
class GroupIndex:
    """What a method sees of the groups (fastunlearn.step.Context.retain_groups): the names, and the group of each
    conditioning id (-1: not a retain prompt)."""

    names: list[str]
    of_id: torch.Tensor
    source: str = "user"

    def rows(self, c_r: torch.Tensor) -> torch.Tensor:
        """The group of each retain row of a micro-batch, from its prompt ids."""
        g = self.of_id[c_r.cpu()]
        if len(g) and int(g.min()) < 0:
            raise RuntimeError("a retain row's prompt is in no neighbour group")
        return g


def resolve_groups(cfg, retain: list[str], world, info) -> RetainGroups | None:
    """The neighbour groups of the run's retain prompts `retain` (see the module's docstring) when the run uses them
    (Saddle with `retain: constraints | dro`), else None. A one-line error when there are none, or one is empty."""
    if not (cfg.method == "saddle" and cfg.saddle.retain != "mean"):
        return None  # no method of this run uses them (a user's groups are still read: their prompts are the retain set)
    given = read_retain_groups(cfg.retain_prompts, cfg.retain_groups)
    if given is not None:
        groups = RetainGroups(list(given), [list(dict.fromkeys(p)) for p in given.values()], "user")
    else:
        names = None
        if world is not None and info is not None and hasattr(world, "retain_groups") and retain:
            names = world.retain_groups(info, retain)
        if names is None:
            raise FastUnlearnError(
                f"saddle.retain {cfg.saddle.retain} needs neighbour groups of the retain prompts: give "
                "--retain-prompts once per group (one file each), or a retain file of `group: prompt` lines")
        by_name: dict[str, list[str]] = {}
        for q, name in zip(retain, names):
            by_name.setdefault(str(name), []).append(q)
        groups = RetainGroups(list(by_name), [list(dict.fromkeys(p)) for p in by_name.values()], "world")
    _check_names(groups.names)
    for name, prompts in zip(groups.names, groups.prompts):
        if not prompts:
            raise FastUnlearnError(f"retain group {name!r} is empty: it has no prompts")
    missing = sorted(set(retain) - {q for p in groups.prompts for q in p})
    if missing:  # only when the retain set did not come from the groups: a world's own prompt outside its groups
        raise FastUnlearnError(f"retain prompt {missing[0]!r} is in no neighbour group")
    return groups
