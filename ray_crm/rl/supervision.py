"""Remote calls that cannot hang a training run: a timeout on each, a restart of a dead or hung actor, one retry.

Generation and weight-sync calls that never return are what RLHF users on Ray most complain about. Every
call from a pool to its rollout or reward actors goes through `ActorGroup.call`: a call that outlives its
timeout gets its actor killed and restarted by Ray (`max_restarts`), an actor that died is waited for until
Ray has restarted it, and in both cases the pool's `on_restart` hook runs (the rollout pool re-sends the
latest weights) before the call is retried once. A second failure, an actor out of restarts, or an error
raised by the actor's own code ends in an `ActorCallError` naming the actor and the call.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import ray
from ray.exceptions import ActorDiedError, ActorUnavailableError, GetTimeoutError, RayActorError, RayTaskError

logger = logging.getLogger(__name__)


class ActorCallError(RuntimeError):
    """A remote call that failed for good; the message names the actor and the call."""


@dataclass
class Member:
    name: str
    handle: Any  # ray.actor.ActorHandle
    restarts: int = 0


@dataclass
class _Pending:
    index: int
    deadline: float
    attempt: int


class ActorGroup:
    """Named actors of one kind, each created with Ray's `max_restarts` and `max_task_retries=0`.

    The actors must define `ready()` (returns once constructed) and `shutdown()`.
    """

    def __init__(
        self,
        members: list[Member],
        start_timeout_s: float,
        max_restarts: int,
        on_restart: Callable[[int], None] | None = None,
    ):
        self.members = members
        self.start_timeout_s = start_timeout_s
        self.max_restarts = max_restarts
        self.on_restart = on_restart

    def __len__(self) -> int:
        return len(self.members)

    def wait_ready(self) -> list[Any]:
        """Block until every actor is constructed; what each `ready()` returned."""
        return [self._ready(i) for i in range(len(self.members))]

    def call(self, method: str, args: Mapping[int, tuple], timeout_s: float, retry: bool = True) -> dict[int, Any]:
        """Run `method(*args[i])` on actor i for every i in `args`, concurrently; results by index.

        `retry=False` is for collectives (an NCCL rendezvous) that a restarted actor cannot rejoin.
        """
        pending = {self._submit(i, method, a): _Pending(i, time.monotonic() + timeout_s, 0) for i, a in args.items()}
        results: dict[int, Any] = {}
        while pending:
            wait_s = max(0.0, min(p.deadline for p in pending.values()) - time.monotonic())
            done, _ = ray.wait(list(pending), num_returns=1, timeout=wait_s)
            failed: list[tuple[_Pending, str]] = []
            if done:
                job = pending.pop(done[0])
                try:
                    results[job.index] = ray.get(done[0])
                except RayActorError as exc:
                    failed.append((job, f"died during {method}: {_reason(exc)}"))
                except RayTaskError as exc:  # the actor's own code failed: a retry would fail the same way
                    cause = exc.cause or exc
                    name = self.members[job.index].name
                    raise ActorCallError(f"{name}.{method} raised {type(cause).__name__}: {cause}") from exc
            now = time.monotonic()
            for ref, job in list(pending.items()):
                if job.deadline <= now:
                    del pending[ref]
                    failed.append((job, f"did not finish {method} within {timeout_s:.0f} s"))
                    ray.kill(self.members[job.index].handle, no_restart=False)
            for job, reason in failed:
                name = self.members[job.index].name
                if not retry or job.attempt > 0:
                    raise ActorCallError(f"{name} {reason}" + (" again after a restart" if job.attempt else ""))
                self._recover(job.index, reason)
                ref = self._submit(job.index, method, args[job.index])
                pending[ref] = _Pending(job.index, time.monotonic() + timeout_s, job.attempt + 1)
        return results

    def shutdown(self, timeout_s: float = 60.0) -> None:
        """Let each actor release its engine, then end it for good (no restart)."""
        refs = [m.handle.shutdown.remote() for m in self.members]
        try:
            ray.get(refs, timeout=timeout_s)
        except (RayActorError, RayTaskError, GetTimeoutError) as exc:
            logger.warning("actors did not shut down cleanly, killing them: %s", _reason(exc))
        for m in self.members:
            ray.kill(m.handle, no_restart=True)

    def _submit(self, index: int, method: str, args: tuple):
        return getattr(self.members[index].handle, method).remote(*args)

    def _recover(self, index: int, reason: str) -> None:
        member = self.members[index]
        member.restarts += 1
        if member.restarts > self.max_restarts:
            raise ActorCallError(f"{member.name} {reason}, and has used all {self.max_restarts} restarts")
        logger.warning(
            "%s %s; restart %d of %d, then one retry", member.name, reason, member.restarts, self.max_restarts
        )
        self._ready(index)
        if self.on_restart is not None:
            self.on_restart(index)

    def _ready(self, index: int) -> Any:
        """`ready()` of actor i, waiting through a Ray restart in progress."""
        member = self.members[index]
        deadline = time.monotonic() + self.start_timeout_s
        while True:
            try:
                return ray.get(member.handle.ready.remote(), timeout=max(1.0, deadline - time.monotonic()))
            except GetTimeoutError:
                raise ActorCallError(f"{member.name} did not start within {self.start_timeout_s:.0f} s") from None
            except (ActorUnavailableError, ActorDiedError) as exc:  # the old process is still being replaced
                if exc.actor_init_failed:
                    raise ActorCallError(f"{member.name} failed to start: {exc}") from exc
                if time.monotonic() > deadline:
                    raise ActorCallError(f"{member.name} could not be (re)started: {_reason(exc)}") from exc
                time.sleep(1.0)
            except RayTaskError as exc:
                raise ActorCallError(f"{member.name} failed to start: {exc}") from exc


def start_together(*factories: Callable[[], AbstractContextManager]) -> list[Any]:
    """Build several actor groups at once, each factory returning once its actors are ready: their start-ups
    (a vLLM engine's compile, a learner's model load, the reward models) overlap instead of adding up. If any
    fails, the ones that started are closed and the first failure (in argument order) is raised."""
    with ThreadPoolExecutor(max_workers=len(factories)) as threads:
        futures = [threads.submit(factory) for factory in factories]
    failures = [f.exception() for f in futures if f.exception() is not None]
    if failures:
        for f in futures:
            if f.exception() is None:
                f.result().__exit__(None, None, None)
        raise failures[0]
    return [f.result() for f in futures]


def contiguous_slices(total: int, parts: int) -> list[tuple[int, int]]:
    """`parts` contiguous [start, end) slices of range(total), sizes differing by at most one."""
    size, extra = divmod(total, parts)
    bounds = [0]
    for i in range(parts):
        bounds.append(bounds[-1] + size + (i < extra))
    return list(itertools.pairwise(bounds))


def _reason(exc: BaseException) -> str:
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
