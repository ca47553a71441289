"""Timeouts, restarts and one retry for remote calls (ray_crm.rl.supervision), on real Ray actors."""

from __future__ import annotations

import os
import time

import pytest
import ray

from ray_crm.rl.supervision import ActorCallError, ActorGroup, Member

pytestmark = pytest.mark.integration


class Worker:
    def ready(self) -> int:
        return os.getpid()

    def work(self, seconds: float, die_once_flag: str | None = None, fail: bool = False) -> int:
        if fail:
            raise ValueError("bad input")
        if die_once_flag is not None and not os.path.exists(die_once_flag):
            open(die_once_flag, "w").close()
            os._exit(1)  # the process dies in the middle of the call
        time.sleep(seconds)
        return os.getpid()

    def shutdown(self) -> None:
        pass


def make_group(n: int, max_restarts: int, hook_calls: list[int] | None = None) -> ActorGroup:
    cls = ray.remote(Worker).options(num_cpus=0.1, max_restarts=max_restarts, max_task_retries=0)
    members = [Member(f"worker-{i}", cls.remote()) for i in range(n)]
    group = ActorGroup(members, start_timeout_s=60, max_restarts=max_restarts,
                       on_restart=hook_calls.append if hook_calls is not None else None)
    group.wait_ready()
    return group


def test_a_dead_actor_is_restarted_and_its_call_retried_once(ray_local, tmp_path):
    hook_calls: list[int] = []
    group = make_group(2, max_restarts=1, hook_calls=hook_calls)
    try:
        before = group.wait_ready()
        out = group.call("work", {0: (0.1, str(tmp_path / "died")), 1: (0.1,)}, timeout_s=60)
        assert out[0] != before[0] and out[1] == before[1]  # worker-0 is a new process, worker-1 untouched
        assert [m.restarts for m in group.members] == [1, 0] and hook_calls == [0]
    finally:
        group.shutdown()


def test_a_hung_call_is_killed_retried_then_reported_by_name(ray_local):
    group = make_group(1, max_restarts=2)
    try:
        start = time.monotonic()
        with pytest.raises(ActorCallError, match=r"worker-0 did not finish work within 2 s again after a restart"):
            group.call("work", {0: (60.0,)}, timeout_s=2)
        assert time.monotonic() - start < 50
        assert group.call("work", {0: (0.0,)}, timeout_s=30)[0] > 0  # the restarted actor serves again
    finally:
        group.shutdown()


def test_an_error_in_the_actors_code_is_not_retried(ray_local):
    group = make_group(1, max_restarts=1)
    try:
        with pytest.raises(ActorCallError, match=r"worker-0.work raised ValueError: bad input"):
            group.call("work", {0: (0.0, None, True)}, timeout_s=30)
        assert group.members[0].restarts == 0
    finally:
        group.shutdown()


def test_an_actor_out_of_restarts_is_reported(ray_local, tmp_path):
    group = make_group(1, max_restarts=0)
    try:
        with pytest.raises(ActorCallError, match=r"worker-0 died during work.*used all 0 restarts"):
            group.call("work", {0: (0.0, str(tmp_path / "died"))}, timeout_s=30)
    finally:
        group.shutdown()
