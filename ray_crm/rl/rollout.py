"""vLLM rollout actors, the pool that drives them, and the learner -> engines weight sync.

Use from the PPO/GRPO driver or learner::

    pool = RolloutPool(policy_dir, cfg.rollout, torch_threads=cfg.ray.torch_threads)
    rollouts = pool.generate(prompts)                  # list[PromptRollout], in prompt order
    ...one real optimizer step of the learner...
    report = pool.sync_weights(policy_state_dict(model), version=step)   # or pool.sync_weights(hf_folder)
    pool.shutdown()

`generate` spreads the prompts over the engines in contiguous slices and gathers them back in order; each
prompt gets `n_samples` completions with per-token logprobs and the policy version that produced them.
Seeds are derived from (`rollout.seed`, call number, prompt index), so a run is reproducible whatever the
number of engines.

`sync_weights(weights, version)` must be called after every real optimizer step (never with the
gradient-regularisation perturbed weights) and returns once every engine serves the new weights:
- `weights` a state dict (full, on one process; LoRA merged: `ray_crm.rl.weights.policy_state_dict`;
  ZeRO-3 gathered by the learner first): packed into the object store once (`PackedWeights`, cast to the
  engines' dtype), mapped by every engine on the node and loaded in place by the vLLM worker's
  `reload_weights`, then the prefix cache is reset. Engines with tensor parallelism cannot take tensors.
- `partial=True`: `weights` holds only the tensors that differ from the last full sync (or from the initial
  weights), e.g. `policy_state_dict(model, lora_targets_only=True)` after a LoRA step; the engines keep
  the rest. A fused vLLM layer (q/k/v, gate/up) must be sent whole.
- `weights` a folder (an HF checkpoint the engines can read): the worker's `reload_weights(weights_path)`.
- GPU, after `enable_nccl_broadcast(...)` in a process holding the weights on its GPU: the state dict is
  broadcast over NCCL through vLLM's weight-transfer API (`ray_crm.rl.nccl_sync`; train-rl does it from
  learner rank 0 with `rollout.weight_sync=nccl` and reports the sync with `mark_synced`). Written and
  documented, not run on this CPU-only machine (docs/gpu.md).
The returned `WeightSyncReport` carries the seconds taken; it is also logged at INFO for every sync.

Robustness (`ray_crm.rl.supervision`): every remote call has a timeout and errors name the engine; a dead
or hung engine is restarted by Ray (`rollout.max_restarts`), given the latest weights again, and its slice
of the batch retried once. `shutdown()` (or leaving a `with RolloutPool(...)` block) releases the engines.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Self

import ray
import torch
from ray.exceptions import GetTimeoutError
from torch import Tensor

from ray_crm.assets import cache_root
from ray_crm.config import RolloutConfig
from ray_crm.rl.nccl_sync import NCCLWeightBroadcast
from ray_crm.rl.supervision import ActorCallError, ActorGroup, Member, contiguous_slices
from ray_crm.rl.vllm_engine import PromptRollout, RolloutEngine, Sampling, request_seeds
from ray_crm.rl.weights import PackedWeights, pack_state_dict
from ray_crm.runtime import set_threads

logger = logging.getLogger(__name__)

ENGINE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class WeightSyncReport:
    version: int
    seconds: float  # learner call to every engine serving the new weights
    nbytes: int  # bytes shipped (0 for a folder)
    engine_load_s: float  # the slowest engine's in-place reload
    transport: str  # "object_store", "folder" or "nccl"
    partial: bool = False  # only some tensors were sent


class VLLMRolloutActor:
    """A Ray actor holding one vLLM engine; created and driven by `RolloutPool`."""

    def __init__(self, name: str, model_path: str, cfg: RolloutConfig, threads: int, cache_dir: str):
        set_threads(threads)  # before vLLM starts: in-process engines freeze torch's thread count
        self.name = name
        self.engine = RolloutEngine(model_path, cfg, Path(cache_dir))
        self.version = 0

    def ready(self) -> dict[str, Any]:
        return {"name": self.name, "pid": os.getpid(), "version": self.version}

    def generate(self, prompts: list, sampling: Sampling, seeds: list[int | None]) -> list[PromptRollout]:
        rollouts = self.engine.generate(prompts, sampling, seeds)
        return [replace(r, policy_version=self.version, engine=self.name) for r in rollouts]

    def load_weights(self, weights: PackedWeights | str, version: int, partial: bool = False) -> float:
        start = time.perf_counter()
        if partial != (not isinstance(weights, str) and weights.partial):
            raise ValueError(f"{self.name}: sync_weights(partial={partial}) got weights packed with the other flag")
        self.engine.load_weights(weights)
        self.version = version
        return time.perf_counter() - start

    # vLLM's weight-transfer API (GPU, NCCL), reached through `nccl_sync.EngineWeightSyncClient`.
    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self.engine.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.engine.llm.start_weight_update()

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self.engine.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, version: int) -> None:
        self.engine.llm.finish_weight_update()
        self.engine.llm.reset_prefix_cache()
        self.version = version

    def shutdown(self) -> None:
        self.engine.shutdown()


class RolloutPool:
    """`rollout.engines` vLLM actors behind one generate / sync_weights interface (see the module doc)."""

    def __init__(
        self,
        model_path: str | Path,
        cfg: RolloutConfig,
        torch_threads: int = 1,
        placement_group: Any = None,
    ):
        """`placement_group` (GPU): bundles to place the engines in, e.g. the learner's to colocate with it
        (bundle i*tp..(i+1)*tp-1 serves engine i); None creates one.
        """
        self.cfg = cfg
        self.version = 0
        self._calls = 0
        # What a restarted engine must load again, in order: the last full sync, then the last partial one.
        self._latest: ray.ObjectRef | str | None = None
        self._latest_partial: ray.ObjectRef | None = None
        self._nccl: NCCLWeightBroadcast | None = None  # once enabled in this process
        self._placement_group = placement_group
        threads = cfg.engine_threads or torch_threads
        actor_cls = ray.remote(VLLMRolloutActor)
        members = []
        for i in range(cfg.engines):
            name = f"rollout-{i}"
            handle = actor_cls.options(
                max_restarts=cfg.max_restarts, max_task_retries=0, **self._placement(i)
            ).remote(name, str(model_path), cfg, threads, str(cache_root()))
            members.append(Member(name, handle))
        self.group = ActorGroup(members, cfg.start_timeout_s, cfg.max_restarts, on_restart=self._reload_latest)
        try:
            self.group.wait_ready()
        except ActorCallError:
            self.group.shutdown(timeout_s=10.0)
            raise

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    @property
    def actors(self) -> list[Any]:
        return [m.handle for m in self.group.members]

    @property
    def members(self) -> list[Member]:
        """The engines by name, for a process that syncs them itself (train-rl's learner rank 0 over NCCL)."""
        return list(self.group.members)

    def mark_synced(self, version: int, seconds: float, nbytes: int) -> WeightSyncReport:
        """Record a sync another process made (its NCCL broadcast): the engines now serve `version`."""
        self.version = version
        self._latest = self._latest_partial = None  # nothing to give a restarted engine: the next sync finds it
        report = WeightSyncReport(version, seconds, nbytes, 0.0, "nccl")
        logger.info("weight sync v%d: %.3f s (%.0f MB via nccl to %d engines)", version, seconds, nbytes / 2**20,
                    len(self.group))
        return report

    def generate(self, prompts: Sequence[str | list[dict[str, str]]], call: int | None = None,
                 **overrides: Any) -> list[PromptRollout]:
        """Completions for every prompt, in order; `overrides` replace `Sampling` fields for this call
        (e.g. `n=1, temperature=0.0` for greedy evaluation). The requests' seeds derive from the sampling seed
        and `call` (default: this pool's count of calls): a caller that names its calls (train-rl: the step)
        samples the same whatever other calls came between, and after a restart."""
        sampling = Sampling.from_config(self.cfg, **overrides)
        seeds = request_seeds(sampling.seed, self._calls if call is None else call, count=len(prompts))
        self._calls += 1
        prompts = list(prompts)
        args = {
            i: (prompts[a:b], sampling, seeds[a:b])
            for i, (a, b) in enumerate(contiguous_slices(len(prompts), len(self.group)))
            if b > a
        }
        results = self.group.call("generate", args, self.cfg.generate_timeout_s)
        return [rollout for i in sorted(results) for rollout in results[i]]

    def sync_weights(
        self,
        weights: Mapping[str, Tensor] | PackedWeights | ray.ObjectRef | str | Path,
        version: int | None = None,
        partial: bool = False,
    ) -> WeightSyncReport:
        """Make every engine serve `weights` (see the module doc); `version` defaults to one more than the last.

        `weights` may also be `PackedWeights` (their own `partial` flag must agree), or a ref to them that the
        learner put in the object store itself (so the driver never holds the tensors).
        """
        start = time.perf_counter()
        version = self.version + 1 if version is None else version  # self.version only once it is served
        if self._nccl is not None and isinstance(weights, Mapping):
            if partial:
                raise ValueError("the NCCL broadcast sends full state dicts")
            self._nccl.send(weights, version)
            nbytes, load_s, transport = _nbytes(weights), 0.0, "nccl"
        else:
            payload, nbytes, transport = _payload(weights, ENGINE_DTYPES[self.cfg.dtype], partial)
            calls = {i: (payload, version, partial) for i in range(len(self.group))}
            load_s = max(self.group.call("load_weights", calls, self.cfg.sync_timeout_s).values())
            if partial:
                self._latest_partial = payload
            else:
                self._latest, self._latest_partial = payload, None
        self.version = version
        report = WeightSyncReport(version, time.perf_counter() - start, nbytes, load_s, transport, partial)
        logger.info(
            "weight sync v%d: %.3f s (%.0f MB%s via %s to %d engines)", report.version, report.seconds,
            report.nbytes / 2**20, " partial" if partial else "", report.transport, len(self.group),
        )
        return report

    def enable_nccl_broadcast(self, master_address: str, master_port: int) -> None:
        """GPU: make later `sync_weights(state_dict)` calls broadcast over NCCL from this process.

        Call it once, in a process that owns a GPU and holds the state dict on it; every engine worker joins one
        NCCL group with it (`ray_crm.rl.nccl_sync`).
        """
        self._nccl = NCCLWeightBroadcast(self.group, self.cfg, master_address, master_port, self.version)

    def shutdown(self) -> None:
        if self._nccl is not None:
            self._nccl.shutdown()
            self._nccl = None
        self.group.shutdown()

    def _reload_latest(self, index: int) -> None:
        """A restarted engine starts from the initial weights: give it the latest ones before the retry.

        (After NCCL syncs there is no copy to give; the next broadcast finds the engine stale.)
        """
        for payload, partial in ((self._latest, False), (self._latest_partial, True)):
            if payload is not None:
                args = {index: (payload, self.version, partial)}
                self.group.call("load_weights", args, self.cfg.sync_timeout_s, retry=False)

    def _placement(self, index: int) -> dict[str, Any]:
        """Ray options placing engine `index`: CPUs on a CPU box; a placement-group slice on GPUs."""
        if not self.cfg.use_gpu:
            return {"num_cpus": self.cfg.cpus_per_engine}
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        tp = self.cfg.tensor_parallel_size
        if self._placement_group is None:
            bundle = {"GPU": 1.0, "CPU": self.cfg.cpus_per_engine}
            self._placement_group = placement_group([bundle] * (self.cfg.engines * tp), strategy="PACK")
            try:
                ray.get(self._placement_group.ready(), timeout=self.cfg.start_timeout_s)
            except GetTimeoutError:
                raise ActorCallError(f"the placement group of the rollout engines ({self.cfg.engines * tp} "
                                     f"GPU bundles) was not ready within {self.cfg.start_timeout_s:.0f} s") from None
        bundles = list(range(index * tp, (index + 1) * tp))
        strategy = PlacementGroupSchedulingStrategy(
            self._placement_group, placement_group_bundle_index=bundles[0], placement_group_capture_child_tasks=True
        )
        # With tensor parallelism vLLM starts its own GPU workers in these bundles; the engine holds none.
        env = {"VLLM_RAY_BUNDLE_INDICES": ",".join(map(str, bundles))} if tp > 1 else {}
        return {
            "num_cpus": self.cfg.cpus_per_engine,
            "num_gpus": 0 if tp > 1 else self.cfg.gpu_fraction,
            "scheduling_strategy": strategy,
            "runtime_env": {"env_vars": env},
        }


def _payload(weights: Any, dtype: torch.dtype, partial: bool) -> tuple[ray.ObjectRef | str, int, str]:
    """What `load_weights` receives, the bytes shipped (0 if unknown here) and the transport's name."""
    if isinstance(weights, str | Path):
        if partial:
            raise ValueError("a folder sync is never partial")
        return str(Path(weights).resolve()), 0, "folder"
    if isinstance(weights, ray.ObjectRef):
        return weights, 0, "object_store"
    if isinstance(weights, PackedWeights) and weights.partial != partial:
        raise ValueError(f"sync_weights(partial={partial}) got PackedWeights(partial={weights.partial})")
    packed = weights if isinstance(weights, PackedWeights) else pack_state_dict(weights, dtype, partial)
    return ray.put(packed), packed.nbytes, "object_store"


def _nbytes(weights: Mapping[str, Tensor]) -> int:
    return sum(t.numel() * t.element_size() for t in weights.values())
