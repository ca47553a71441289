"""A stage's output folder: one writer at a time, and the previous output intact until the new one is whole.

Trainers read the folder a stage last wrote, so a failed or killed run must not have touched it, and two runs
writing it at once would interleave their files:
- `output_lock(out)` holds `<parent>/.<name>.lock` with `flock` and writes its holder (pid, host, start time)
  into it; a second run fails at once, naming the holder. The kernel drops a flock when its process dies, so a
  lock file that still names a holder but is not locked is stale: it is taken over, with a warning.
- `staged_output(out, owned)` gives the stage a fresh sibling, `<parent>/.<name>.tmp`, and only when the stage
  succeeds renames the old folder aside, the new one in, and deletes the old one. A failed run's folder stays
  for inspection until the next run.
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import warnings
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path


class OutputBusy(RuntimeError):
    """Another run holds the lock of the output folder."""


def _sibling(out: Path, suffix: str) -> Path:
    return out.parent / f".{out.name}.{suffix}"


def _holder(fd: int) -> str | None:
    """Who the lock file says holds it, or None if it names nobody."""
    text = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip()
    if not text:
        return None
    try:
        h = json.loads(text)
        return f"pid {h['pid']} on {h['host']} (started {h['started']})"
    except (ValueError, TypeError, KeyError):
        return repr(text)


@contextmanager
def output_lock(out: Path) -> Iterator[None]:
    """Hold the lock of `out` for the block; raises `OutputBusy` naming the holder if another run has it."""
    path = _sibling(out, "lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise OutputBusy(f"{out} is being written by {_holder(fd) or 'another run (not yet named)'}; wait for "
                             f"it or stop it (lock file {path})") from None
        if stale := _holder(fd):
            warnings.warn(f"taking over the stale lock {path}: {stale} ended without releasing it", stacklevel=3)
        os.ftruncate(fd, 0)
        me = {"pid": os.getpid(), "host": socket.gethostname(),
              "started": datetime.now(UTC).isoformat(timespec="seconds")}
        os.pwrite(fd, json.dumps(me).encode(), 0)
        try:
            yield
        finally:
            os.ftruncate(fd, 0)  # the file stays: unlinking a flocked file lets a waiting opener lock a ghost
    finally:
        os.close(fd)


@contextmanager
def staged_output(out: Path, owned: Collection[str]) -> Iterator[Path]:
    """A fresh folder to write the outputs into, which replaces `out` if the block succeeds. Hold `output_lock`.

    `owned` names what the stage writes; a folder holding anything else is not replaced, since that would
    delete it.
    """
    work, old = _sibling(out, "tmp"), _sibling(out, "old")
    if old.is_dir():  # a run killed while swapping: finish or undo that swap
        if out.exists():
            shutil.rmtree(old)
        else:
            old.rename(out)
    if out.is_dir() and (foreign := sorted(p.name for p in out.iterdir() if p.name not in owned)):
        raise FileExistsError(f"{out} holds {foreign}, which this stage does not write; it replaces the whole "
                              f"folder, so move them or choose another output folder")
    if work.exists():
        shutil.rmtree(work)  # a failed or killed run's
    work.mkdir(parents=True)
    yield work
    if out.exists():
        out.rename(old)
        work.rename(out)
        shutil.rmtree(old)
    else:
        work.rename(out)
