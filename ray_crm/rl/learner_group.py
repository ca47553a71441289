"""The RL learner on Ray: `rl.num_workers` actors, each one rank of a torch.distributed group holding a
`PolicyLearner` (a DeepSpeed engine), driven by the single-controller driver as one learner.

The ranks sit in one placement group (PACK: `rl.learner_cpus` and a GPU each). Inside a Tune trial, whose
own placement group already reserves them (`grpo_trainer.trial_bundles`) and captures its child actors, they
are scheduled into the trial's group instead: a second group could never be granted on a full cluster.
Rendezvous as OpenRLHF does it: rank 0 reports its node's IP and a free port, then every rank joins
`tcp://ip:port` (gloo on CPU, NCCL on GPU) and builds its learner. Every call has a timeout
(`LEARNER_TIMEOUT_S`, through `ActorGroup`) and an error naming the call and the rank; ranks are never
restarted (a restarted rank could not rejoin the collective, and its state would be lost).
"""

from __future__ import annotations

import os
import socket
from pathlib import Path
from typing import Any, Self

import ray
import torch
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ray_crm.config import Config, RLConfig, RolloutConfig
from ray_crm.rl.policy_learner import PolicyBatch, PolicyLearner
from ray_crm.rl.supervision import ActorCallError, ActorGroup, Member
from ray_crm.rl.weights import pack_state_dict
from ray_crm.runtime import set_threads

# No config field bounds the learner's calls (start-up, step, save, load, export): a hung learner must still
# end the run, and one step of a large policy under GR on a CPU can take many minutes.
LEARNER_TIMEOUT_S = 3600.0


class LearnerWorker:
    """One rank: joins the process group, then holds a `PolicyLearner` (on a GPU when `rl.use_gpu`)."""

    def __init__(self, rank: int, world: int, threads: int):
        set_threads(threads)
        self.rank, self.world = rank, world
        self.learner: PolicyLearner | None = None
        self.broadcast: Any = None  # rank 0 with rollout.weight_sync=nccl: a `NCCLWeightBroadcast`

    def ready(self) -> dict[str, Any]:
        """The pid and, for the rendezvous, this node's IP and a port free on it."""
        with socket.socket() as sock:
            sock.bind(("", 0))
            port = sock.getsockname()[1]
        return {"pid": os.getpid(), "ip": ray.util.get_node_ip_address(), "port": port}

    def setup(self, ip: str, port: int, model_path: str, rl: RLConfig) -> None:
        """Join the group (once per process), then build a learner from `model_path` (again: a fresh one)."""
        from ray_crm.train.deepspeed_config import prepare_deepspeed_env

        backend = prepare_deepspeed_env(rl.use_gpu)
        if not torch.distributed.is_initialized():
            torch.distributed.init_process_group(backend, init_method=f"tcp://{ip}:{port}", rank=self.rank,
                                                 world_size=self.world)
        self.learner = PolicyLearner(model_path, rl, self.rank, self.world)

    def step(self, batch: PolicyBatch) -> dict[str, float | str]:
        return self.learner.step(batch)

    def params(self) -> dict[str, torch.Tensor]:
        """The trainable tensors by name (for tests and checks; small with LoRA)."""
        return self.learner.snapshot()

    def engine_weights(self, dtype: torch.dtype) -> tuple[list[ray.ObjectRef], bool]:
        """The weights for the engines, put in the object store by this process (the driver never holds them)."""
        state, partial = self.learner.engine_weights()
        return [ray.put(pack_state_dict(state, dtype, partial))] if self.rank == 0 else [], partial

    def enable_weight_broadcast(self, engines: list[Member], rollout: RolloutConfig, version: int) -> None:
        """Become rank 0 of an NCCL group with every engine worker (GPU; `ray_crm.rl.nccl_sync`)."""
        from ray_crm.rl.nccl_sync import NCCLWeightBroadcast

        group = ActorGroup(engines, rollout.start_timeout_s, max_restarts=0)
        self.broadcast = NCCLWeightBroadcast(group, rollout, ray.util.get_node_ip_address(), self.ready()["port"],
                                             version)

    def broadcast_weights(self, version: int, dtype: torch.dtype) -> int:
        """Broadcast the full policy (LoRA merged, in the engines' dtype) to the engines; the bytes sent."""
        state = {k: v.to(dtype) for k, v in self.learner.policy_weights().items()}
        if self.broadcast is None:  # a rank > 0 under ZeRO-3: it took part in gathering the weights
            return 0
        self.broadcast.send(state, version)
        return sum(t.numel() * t.element_size() for t in state.values())

    def save(self, folder: str) -> None:
        self.learner.save(Path(folder))

    def load(self, folder: str) -> None:
        self.learner.load(Path(folder))

    def save_policy(self, folder: str) -> str:
        return str(self.learner.save_policy(Path(folder)))

    def shutdown(self) -> None:
        """Only the NCCL weight group, if any: a torch collective with a dead peer would hang, so the learners'
        group is not torn down."""
        if self.broadcast is not None:
            self.broadcast.shutdown()


class LearnerGroup:
    """The learner ranks as one learner: every call goes to all of them (or to rank 0 for what it alone
    holds), with a timeout; `close()` ends them and frees their placement group."""

    def __init__(self, policy: str, cfg: Config, timeout_s: float = LEARNER_TIMEOUT_S):
        rl = cfg.rl
        self.timeout_s = timeout_s
        self.world = rl.num_workers
        self.holders: list[int] | None = [0]
        bundle = {"CPU": rl.learner_cpus, **({"GPU": 1.0} if rl.use_gpu else {})}
        self._own_pg = None
        pg = ray.util.get_current_placement_group()  # a Tune trial's, which reserved the ranks' resources
        if pg is None:
            self._own_pg = pg = placement_group([bundle] * self.world, strategy="PACK")
            if not pg.wait(timeout_seconds=timeout_s):
                remove_placement_group(pg)
                raise ActorCallError(f"the learner's {self.world} bundles of {bundle} were not granted within "
                                     f"{timeout_s:.0f} s: the cluster lacks the resources (rl.learner_cpus x "
                                     "rl.num_workers)")
        threads = rl.learner_threads or cfg.ray.torch_threads
        members = []
        for rank in range(self.world):
            handle = ray.remote(LearnerWorker).options(
                num_cpus=rl.learner_cpus, num_gpus=1 if rl.use_gpu else 0, max_restarts=0, max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    pg, placement_group_bundle_index=rank if self._own_pg else -1),
            ).remote(rank, self.world, threads)
            members.append(Member(f"learner rank {rank}", handle))
        self.actors = ActorGroup(members, timeout_s, max_restarts=0)
        try:
            self.master = self.actors.wait_ready()[0]
            self.setup(policy, rl)
        except BaseException:
            self.close()
            raise

    def setup(self, policy: str, rl: RLConfig) -> None:
        """(Re)build every rank's learner from `policy` under `rl` (same ranks, same process group)."""
        # who takes part in reading the whole policy: rank 0 holds it, unless ZeRO-3 shards it over every rank
        self.holders = None if rl.zero_stage == 3 else [0]
        self.call("setup", self.master["ip"], self.master["port"], policy, rl, during="starting the learner")

    def call(self, method: str, *args: Any, during: str, ranks: list[int] | None = None,
             timeout_s: float | None = None) -> list[Any]:
        """`method(*args)` on each rank of `ranks` (default all) at once; results in rank order. A hung rank is
        killed, and the error says what the driver was doing and which rank failed."""
        ranks = list(range(self.world)) if ranks is None else ranks
        args = tuple(ray.put(a) for a in args)  # one copy in the object store for all ranks (a batch, a config)
        try:
            results = self.actors.call(method, dict.fromkeys(ranks, args), timeout_s or self.timeout_s, retry=False)
        except ActorCallError as exc:
            raise ActorCallError(f"{during}: {exc}") from exc
        return [results[r] for r in ranks]

    def step(self, batch: PolicyBatch, during: str) -> dict[str, float | str]:
        """One optimizer step of every rank on `batch`; the statistics (the same on every rank) of rank 0."""
        return self.call("step", batch, during=during)[0]

    def engine_weights(self, dtype: torch.dtype, during: str, timeout_s: float) -> tuple[list[ray.ObjectRef], bool]:
        """Rank 0's weights after the step (under ZeRO-3 every rank helps gather them)."""
        return self.call("engine_weights", dtype, during=during, ranks=self.holders, timeout_s=timeout_s)[0]

    def enable_weight_broadcast(self, engines: list[Member], rollout: RolloutConfig, version: int, during: str) -> None:
        """Rank 0 joins an NCCL group with the engines; later syncs go through `broadcast_weights`."""
        self.call("enable_weight_broadcast", engines, rollout, version, during=during, ranks=[0],
                  timeout_s=rollout.start_timeout_s)

    def broadcast_weights(self, version: int, dtype: torch.dtype, during: str, timeout_s: float) -> int:
        """Rank 0 broadcasts the stepped weights over NCCL; the bytes sent."""
        return self.call("broadcast_weights", version, dtype, during=during, ranks=self.holders,
                         timeout_s=timeout_s)[0]

    def save(self, folder: Path, during: str) -> None:
        """Every rank writes its part of a checkpoint into `folder` (shared by the ranks and the driver)."""
        self.call("save", str(folder), during=during)

    def load(self, folder: Path, during: str) -> None:
        self.call("load", str(folder), during=during)

    def save_policy(self, folder: Path, during: str) -> str:
        return self.call("save_policy", str(folder), during=during, ranks=self.holders)[0]

    def close(self) -> None:
        self.actors.shutdown()
        if self._own_pg is not None:
            remove_placement_group(self._own_pg)
            self._own_pg = None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
