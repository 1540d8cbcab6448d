"""Where fastunlearn keeps its caches: the digits world, teacher samples, teacher features."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

from .errors import FastUnlearnError

CACHE_ENV = "FASTUNLEARN_CACHE"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache directory: the argument, else $FASTUNLEARN_CACHE, else $XDG_CACHE_HOME/fastunlearn, else ~/.cache/fastunlearn."""
    if cache_dir:
        return Path(cache_dir).expanduser()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "fastunlearn"


def ensure_writable_dir(path: Path, what: str = "cache directory") -> Path:
    """Create `path` if needed and prove it is writable, or raise a one-line FastUnlearnError."""
    hint = f" (set {CACHE_ENV} or pass --cache-dir)" if what == "cache directory" else ""
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as exc:
        raise FastUnlearnError(f"{what} {path} is not writable: {exc.strerror or exc}{hint}") from None
    return path
