"""One progress line per stage on the console; everything the stages print goes to a log file.

A stage of the main job prints hundreds of lines nobody reads on a terminal: Ray's worker logs (forwarded to the
driver's stdout and stderr), Ray Data progress bars, model load reports. `StageConsole` points file descriptors
1 and 2 at the run's log file while a stage runs, so what Ray's threads, C extensions and child processes write
lands there too (redirecting `sys.stdout` alone would miss them), and keeps a handle on the real terminal for its
own lines. Verbose, it leaves the descriptors alone.

A logging handler made during a stage (Ray Data's, the first time a stage uses it) takes `sys.stderr`, the stage's
log stream, as its own; that stream is closed when the stage ends, so such handlers are then pointed at whatever
`sys.stderr` is when they write (the next stage's log, or the terminal): otherwise every later record is a
"Logging error" traceback.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")


class _CurrentStderr:
    """Writes to whatever `sys.stderr` is at the time, as `logging.lastResort` does."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_CURRENT_STDERR = _CurrentStderr()


def _repoint_handlers(old: IO[str]) -> None:
    """Every logging stream handler writing to `old` writes to the current `sys.stderr` from now on."""
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    for handler in (h for lg in loggers for h in lg.handlers):
        if isinstance(handler, logging.StreamHandler) and handler.stream is old:
            handler.setStream(_CURRENT_STDERR)


class StageConsole:
    def __init__(self, log: Path, total: int, verbose: bool = False) -> None:
        self.log, self.total, self.verbose = log, total, verbose
        self.done = 0
        if not verbose:
            log.parent.mkdir(parents=True, exist_ok=True)
            log.write_text("")  # this run's log
        self.seconds: dict[str, float] = {}
        # a duplicate of the terminal's stdout, made before any redirect: the progress lines' own channel
        self.terminal: IO[str] = os.fdopen(os.dup(sys.stdout.fileno()), "w", buffering=1)

    def say(self, text: str = "", end: str = "\n") -> None:
        self.terminal.write(text + end)
        self.terminal.flush()

    @contextmanager
    def _captured(self) -> Iterator[None]:
        if self.verbose:
            yield
            return
        sys.stdout.flush()
        sys.stderr.flush()
        saved = os.dup(1), os.dup(2)
        streams = sys.stdout, sys.stderr
        with open(self.log, "a", buffering=1) as fh:
            os.dup2(fh.fileno(), 1)
            os.dup2(fh.fileno(), 2)
            sys.stdout = sys.stderr = fh  # for when sys.stdout is not fd 1 (pytest, notebooks)
            try:
                yield
            finally:
                fh.flush()
                sys.stdout, sys.stderr = streams
                _repoint_handlers(fh)
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
                for fd in saved:
                    os.close(fd)

    def stage(self, name: str, run: Callable[[], T]) -> T:
        """Run one stage: `[i/n] name ... 41 s` on the console, its output in the log."""
        self.done += 1
        self.say(f"[{self.done}/{self.total}] {name:<20}", end="\n" if self.verbose else "")
        start = time.perf_counter()
        try:
            with self._captured():
                result = run()
        except BaseException:
            self.say(f" failed after {time.perf_counter() - start:.0f} s (details: {self.log})")
            raise
        self.seconds[name] = round(time.perf_counter() - start, 1)
        self.say(f" {self.seconds[name]:6.0f} s")
        return result

    def quietly(self, run: Callable[[], T]) -> T:
        """Run `run` with its output in the log, and no progress line."""
        with self._captured():
            return run()

    def close(self) -> None:
        self.terminal.close()
