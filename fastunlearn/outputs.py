"""The output folder of a run: one run at a time, nothing of a finished run lost, outputs published atomically.

Lifecycle (rank 0 does the writing; every rank may read):

1. `RunFolder.check_path()`: the path is usable (not a file, no file among its parents). Nothing written.
2. `lock()`: an exclusive `fcntl.flock` on `<out>/.lock`, held for the life of the run and deleted by
   `release()`, so a finished folder holds no `.lock`. A second run into the same folder is refused with a
   one-line error naming the holder's pid. The folder is
   created here if it did not exist; `abandon()` removes it again if setup fails afterwards.
3. `plan()`: decides, without touching anything, what the run will do with what is there:
   `new`, `resume` (an unfinished run with the same settings), `replace` (a finished run, with
   --overwrite) or `restart` (an unfinished run with other settings, with --overwrite). Every other
   situation is a one-line error.
4. `prepare()`: called only once every input has been checked and training is about to start.
   A finished run being replaced is moved into `.previous-run/` (through `.moving-aside/`, so a kill
   in the middle is rolled back by the next run) and deleted only when the new run has published.
   An unfinished run being restarted is discarded when `.previous-run/` already holds a finished
   run: a finished run is never deleted to make room for an unfinished one.
5. `publish(tmp)`: the finished files move from a per-process `.final-tmp-<pid>/` into the folder,
   each with one atomic rename: components first, then `model_index.json`, `grid.png`, and
   `report.json` last, so a folder with a report always loads as a pipeline.
"""
from __future__ import annotations

import errno
import fcntl
import json
import math
import os
import shutil
from pathlib import Path

from .errors import FastUnlearnError

PREVIOUS = ".previous-run"
MOVING = ".moving-aside"
DISCARD = ".discard-"
FINAL_TMP = ".final-tmp"
LOCK = ".lock"
INTERNAL = (PREVIOUS, MOVING, LOCK)
# config keys that may differ between a run and its resumption
RESUME_IGNORES = {"overwrite", "max_steps", "output_dir", "cache_dir", "log_every", "checkpoint_every",
                  "keep_checkpoints", "max_nonfinite_steps", "eval", "report_to", "save_format",
                  "resume_from_checkpoint"}


def check_output_path(out: Path, what: str = "output directory") -> None:
    """A one-line error when `out` (or one of its parents) is an existing file rather than a folder."""
    for p in [out, *out.parents]:
        if p.exists() and not p.is_dir():
            where = "" if p == out else f" (its parent {p} is a file)"
            raise FastUnlearnError(f"{what} {out} is not a folder{where}: choose another path")
    existing = next((p for p in [out, *out.parents] if p.exists()), None)
    if existing is not None and not os.access(existing, os.W_OK):
        raise FastUnlearnError(f"{what} {out} cannot be created or written ({existing} is not writable)")


def config_difference(old: dict, new: dict, prefix: str = "") -> str | None:
    """The first setting that differs between two config dicts, as "key: old -> new" (None if none). A key the old
    config lacks (a setting or method section added since that run started) is no difference."""
    for key in sorted(set(old) | set(new)):
        if (not prefix and key in RESUME_IGNORES) or key not in old:
            continue
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found = config_difference(a, b, f"{prefix}{key}.")
            if found:
                return found
        elif a != b:
            return f"{prefix}{key}: {a!r} -> {b!r}"
    return None


def strict_json(obj, indent: int = 2) -> str:
    """JSON that every parser accepts: NaN and infinities become null."""
    def clean(x):
        if isinstance(x, float) and not math.isfinite(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return json.dumps(clean(obj), indent=indent, allow_nan=False)


def _same_file(fd: int, path: Path) -> bool:
    """Whether the open file `fd` is still the file at `path`."""
    try:
        st = path.stat()
    except FileNotFoundError:
        return False
    mine = os.fstat(fd)
    return (mine.st_dev, mine.st_ino) == (st.st_dev, st.st_ino)


def is_finished(folder: Path) -> bool:
    return (folder / "report.json").is_file()


class RunFolder:
    def __init__(self, out: Path, config: dict, overwrite: bool, rank0: bool = True):
        self.out, self.config, self.overwrite, self.rank0 = Path(out), config, overwrite, rank0
        self.created = False
        self._lock_fd = None
        self.action = None
        self.action_done = False  # prepare() has run: the folder now belongs to this run

    # ---- 1-2: before anything is loaded ---------------------------------------------------------
    def check_path(self) -> None:
        check_output_path(self.out)

    def lock(self) -> None:
        """Rank 0: take the folder's exclusive lock for the life of this process, or refuse."""
        if not self.rank0:
            return
        self.created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        path = self.out / LOCK
        for _ in range(100):
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise FastUnlearnError(f"cannot lock output directory {self.out}: {exc.strerror}") from None
                try:
                    holder = path.read_text().strip() or "unknown"
                except OSError:
                    holder = "unknown"
                raise FastUnlearnError(f"output directory {self.out} is in use by another run (pid {holder}); "
                                       "wait for it to finish or choose another --output-dir") from None
            # The holder deletes the lock file before it lets go (release()): a lock taken on a file that is
            # no longer the one at `path` guards nothing, so open the new one and try again.
            if _same_file(fd, path):
                break
            os.close(fd)
        else:
            raise FastUnlearnError(f"cannot lock output directory {self.out}: its lock file keeps being replaced")
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._lock_fd = fd

    def abandon(self) -> None:
        """Setup failed before training started: leave the folder as it was found."""
        if not self.rank0 or self._lock_fd is None:
            return
        if self.created:
            shutil.rmtree(self.out, ignore_errors=True)
        self.release()

    def release(self) -> None:
        """Delete the lock file, then let go of the lock: a finished folder holds no bookkeeping file. (A run
        killed outright leaves its `.lock`; the next run takes it over.)"""
        if self._lock_fd is not None:
            (self.out / LOCK).unlink(missing_ok=True)  # while still holding it: see lock()
            os.close(self._lock_fd)  # closing the descriptor drops the flock
            self._lock_fd = None

    # ---- 3: decide, read-only ---------------------------------------------------------------------
    def plan(self) -> str:
        out = self.out
        if is_finished(out):
            if not self.overwrite:
                raise FastUnlearnError(f"output directory {out} holds a finished run; pass --overwrite to replace it")
            self.action = "replace"
            return self.action
        saved = out / "config.json"
        if (out / "checkpoints").is_dir() and saved.is_file():
            try:
                old = json.loads(saved.read_text())
            except ValueError:
                old = {}
            diff = config_difference(old, self.config)
            if not diff:
                self.action = "resume"
                return self.action
            if not self.overwrite:
                kept = (f"; {out / PREVIOUS} holds the finished run it was replacing"
                        if is_finished(out / PREVIOUS) else "")
                raise FastUnlearnError(f"output directory {out} holds an unfinished run with other settings ({diff}): "
                                       f"rerun with its settings to resume it, or pass --overwrite to start over{kept}")
            self.action = "restart"
            return self.action
        self.action = "new"
        return self.action

    # ---- 4: training is about to start --------------------------------------------------------------
    def prepare(self) -> None:
        """Rank 0, under the lock: finish what a killed run left half-done, then make room as planned."""
        self.action_done = True
        if not self.rank0:
            return
        out = self.out
        self.recover()
        if self.action == "replace" or (self.action == "restart" and not is_finished(out / PREVIOUS)):
            self._move_aside()
        elif self.action == "restart":  # .previous-run holds a finished run: the unfinished one goes
            self._discard([e for e in out.iterdir() if e.name not in INTERNAL])
        (out / "config.json").write_text(strict_json(self.config))

    def recover(self) -> None:
        """Undo an interrupted move-aside (its files go back) and delete leftovers of killed runs."""
        out = self.out
        moving = out / MOVING
        if moving.is_dir():
            for entry in moving.iterdir():
                if not (out / entry.name).exists():
                    os.replace(entry, out / entry.name)
            shutil.rmtree(moving, ignore_errors=True)
        for entry in out.iterdir():
            if not entry.name.startswith((DISCARD, FINAL_TMP)):
                continue
            if entry.is_dir():  # no other run can own it: we hold the lock
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def _move_aside(self) -> None:
        out, prev, moving = self.out, self.out / PREVIOUS, self.out / MOVING
        moving.mkdir()
        for entry in list(out.iterdir()):
            if entry.name not in INTERNAL:
                os.replace(entry, moving / entry.name)
        if prev.exists():  # an older run, replaced by the one just moved (finished, or none finished)
            self._discard([prev])
        os.replace(moving, prev)

    def _discard(self, entries) -> None:
        """Delete `entries`: first renamed into one `.discard-*` folder (atomic), then removed."""
        bin_ = self.out / f"{DISCARD}{os.getpid()}"
        bin_.mkdir(exist_ok=True)
        for i, entry in enumerate(entries):
            os.replace(entry, bin_ / f"{i}-{entry.name}")
        shutil.rmtree(bin_, ignore_errors=True)

    # ---- 5: the end ---------------------------------------------------------------------------------
    def tmp_dir(self) -> Path:
        """A fresh folder of this process for the final outputs."""
        tmp = self.out / f"{FINAL_TMP}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        return tmp

    def publish(self, tmp: Path) -> None:
        """Move the finished files from `tmp` into the folder, each with one atomic rename (see module doc),
        then delete the run this one replaced."""
        out = self.out
        last = {"model_index.json": 1, "grid.png": 2, "report.json": 3}
        for entry in sorted(tmp.iterdir(), key=lambda e: (last.get(e.name, 0), e.name)):
            dest = out / entry.name
            if dest.is_dir():
                shutil.rmtree(dest)
            os.replace(entry, dest)
        tmp.rmdir()
        if (out / PREVIOUS).exists():
            self._discard([out / PREVIOUS])
