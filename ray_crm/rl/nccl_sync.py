"""GPU weight sync over NCCL through vLLM's weight-transfer API (`rollout.weight_sync=nccl`).

The process that holds the weights on its GPU (train-rl: learner rank 0; or a `RolloutPool` told to with
`enable_nccl_broadcast`) is rank 0 of one NCCL group with every engine worker: engine i's tensor-parallel
workers take ranks 1 + i * tp onwards (`engine_rank_offsets`). A sync broadcasts the full state dict, packed by
vLLM into buffers of `rollout.sync_bucket_mb` (`trainer_init_info`), while each engine receives it in an RPC
run beside the broadcast; the RPCs (start, receive, finish) have `rollout.sync_timeout_s` each and errors that
name the engine. An engine restarted since the group formed cannot rejoin it: the next sync finds it stale
(`stale_engines`) and fails naming it instead of hanging in the collective.

Written for GPUs and not run on the CPU-only machines this project was built on (docs/gpu.md); the rank
layout, the bucket settings and the staleness check are plain functions, tested on CPU.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import Tensor

from ray_crm.config import RolloutConfig
from ray_crm.rl.supervision import ActorCallError, ActorGroup


def nccl_world_size(engines: int, tensor_parallel_size: int) -> int:
    """The sender plus every engine worker."""
    return 1 + engines * tensor_parallel_size


def engine_rank_offsets(engines: int, tensor_parallel_size: int) -> list[int]:
    """The NCCL rank of each engine's first worker: the sender is rank 0."""
    return [1 + i * tensor_parallel_size for i in range(engines)]


def trainer_init_info(cfg: RolloutConfig, master_address: str, master_port: int) -> dict[str, Any]:
    """The sender's `NCCLTrainerInitInfo` fields: the group's size and the packed buffers' size."""
    return {"master_address": master_address, "master_port": master_port,
            "world_size": nccl_world_size(cfg.engines, cfg.tensor_parallel_size), "rank": 0, "packed": True,
            "packed_buffer_size_bytes": int(cfg.sync_bucket_mb * 2**20)}


def stale_engines(names: Sequence[str], versions: Mapping[int, Mapping[str, Any]], expected: int) -> list[str]:
    """The engines whose served version is not the last broadcast one: restarted, so out of the NCCL group."""
    return [names[i] for i, v in sorted(versions.items()) if v["version"] != expected]


class EngineWeightSyncClient:
    """vLLM's `VLLMWeightSyncClient` protocol over the engines (`VLLMRolloutActor`s); no call is retried, since a
    restarted engine cannot rejoin a collective in progress."""

    def __init__(self, group: ActorGroup, cfg: RolloutConfig, version: int = 0):
        self.group, self.cfg, self.version = group, cfg, version

    def _all(self, method: str, args: list[tuple]) -> None:
        self.group.call(method, dict(enumerate(args)), self.cfg.sync_timeout_s, retry=False)

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        offsets = engine_rank_offsets(len(self.group), self.cfg.tensor_parallel_size)
        self._all("init_weight_transfer_engine", [({**init_info, "rank_offset": o},) for o in offsets])

    def start_weight_update(self) -> None:
        self._all("start_weight_update", [()] * len(self.group))

    def update_weights(self, update_info: dict[str, Any]) -> None:
        self._all("update_weights", [(update_info,)] * len(self.group))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("finish_weight_update", [(self.version,)] * len(self.group))


class NCCLWeightBroadcast:
    """This process as rank 0 of the NCCL weight group of the engines in `group` (joined at construction)."""

    def __init__(self, group: ActorGroup, cfg: RolloutConfig, master_address: str, master_port: int, version: int = 0):
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        self.group, self.cfg = group, cfg
        self.client = EngineWeightSyncClient(group, cfg, version)
        init = NCCLTrainerInitInfo(**trainer_init_info(cfg, master_address, master_port))
        self.trainer = WeightTransferTrainerFactory.trainer_init(init, client=self.client, source=_state_dict_source({}))

    def send(self, weights: Mapping[str, Tensor], version: int) -> None:
        """Broadcast `weights` (full, on this process's GPU); returns once every engine serves them as `version`."""
        versions = self.group.call("ready", {i: () for i in range(len(self.group))}, self.cfg.sync_timeout_s)
        stale = stale_engines([m.name for m in self.group.members], versions, self.client.version)
        if stale:
            raise ActorCallError(f"{', '.join(stale)} restarted and left the NCCL weight group; start a new one "
                                 "(rerun the step: train-rl resumes from its last checkpoint)")
        self.trainer.source = _state_dict_source(weights)
        self.client.version = version
        self.trainer.send_weights()

    def shutdown(self) -> None:
        self.trainer.shutdown()


def _state_dict_source(weights: Mapping[str, Tensor]):
    """vLLM's `WeightSource` over a state dict: metadata and iteration in the same (dict) order."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    class StateDictSource(WeightSource):
        def metadata(self) -> list[ParamMeta]:
            return [ParamMeta(name, t.dtype, tuple(t.shape)) for name, t in weights.items()]

        def __iter__(self):
            return iter(weights.items())

    return StateDictSource()
