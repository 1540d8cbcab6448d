"""Typed settings with their valid ranges, shared by the run's config and the methods' own configs."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import field

from .errors import FastUnlearnError


def num(default, lo=None, hi=None, *, above=None):
    """A numeric config field with its valid range (lo <= x <= hi, and x > above), checked by
    `check_ranges` together with finiteness: every range lives next to its key."""
    return field(default=default, metadata={"range": (lo, hi, above)})


def check_ranges(obj, prefix: str = "") -> None:
    """Every numeric field of a config dataclass tree is finite and inside its declared range (`num`);
    a section's own `check()` (relations between its keys) runs after its fields."""
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            check_ranges(value, f"{key}.")
            continue
        if "range" not in f.metadata:
            continue
        lo, hi, above = f.metadata["range"]
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise FastUnlearnError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise FastUnlearnError(f"{key} must be a finite number, got {value}")
        bounds = [f">= {lo}" if lo is not None else None, f"> {above}" if above is not None else None,
                  f"<= {hi}" if hi is not None else None]
        if ((lo is not None and value < lo) or (hi is not None and value > hi)
                or (above is not None and value <= above)):
            raise FastUnlearnError(f"{key} must be {' and '.join(b for b in bounds if b)}, got {value}")
    if hasattr(obj, "check"):
        obj.check(prefix)
