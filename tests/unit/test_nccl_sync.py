"""The GPU weight sync's rank layout, bucket settings, staleness check and config rules, on CPU (the NCCL
broadcast itself needs GPUs: docs/gpu.md)."""

from __future__ import annotations

import pytest

from ray_crm.config import ConfigError, RolloutConfig, load_config
from ray_crm.rl.grpo_trainer import RESUMABLE_KEYS
from ray_crm.rl.nccl_sync import engine_rank_offsets, nccl_world_size, stale_engines, trainer_init_info


def test_each_engine_takes_its_tensor_parallel_ranks_after_the_sender():
    assert nccl_world_size(3, 2) == 7 and engine_rank_offsets(3, 2) == [1, 3, 5]
    assert nccl_world_size(1, 1) == 2 and engine_rank_offsets(1, 1) == [1]
    # every worker rank is used exactly once, none is the sender's
    offsets, tp = engine_rank_offsets(4, 4), 4
    assert sorted(r for o in offsets for r in range(o, o + tp)) == list(range(1, nccl_world_size(4, tp)))


def test_the_sender_packs_into_buffers_of_the_configured_size():
    cfg = RolloutConfig(use_gpu=True, weight_sync="nccl", engines=2, tensor_parallel_size=2, sync_bucket_mb=64)
    info = trainer_init_info(cfg, "10.0.0.1", 29500)
    assert info == {"master_address": "10.0.0.1", "master_port": 29500, "world_size": 5, "rank": 0, "packed": True,
                    "packed_buffer_size_bytes": 64 * 2**20}
    from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

    assert NCCLTrainerInitInfo(**info).packed_buffer_size_bytes == 64 * 2**20  # vLLM takes every field


def test_an_engine_behind_the_last_broadcast_version_is_named_as_stale():
    names = ["rollout-0", "rollout-1", "rollout-2"]
    versions = {0: {"version": 7}, 1: {"version": 0}, 2: {"version": 7}}  # rollout-1 restarted: back at 0
    assert stale_engines(names, versions, 7) == ["rollout-1"]
    assert stale_engines(names, {i: {"version": 7} for i in range(3)}, 7) == []


def test_nccl_sync_is_refused_off_gpu_and_its_keys_do_not_block_a_resume():
    with pytest.raises(ConfigError, match="rollout.use_gpu=true"):
        load_config(None, ["rollout.weight_sync=nccl"])
    with pytest.raises(ConfigError, match="rl.use_gpu=true"):
        load_config(None, ["rollout.weight_sync=nccl", "rollout.use_gpu=true"])
    with pytest.raises(ConfigError, match="only rollout.weight_sync=nccl"):
        load_config(None, ["rollout.sync_bucket_mb=64"])
    cfg = load_config(None, ["rollout.weight_sync=nccl", "rollout.use_gpu=true", "rl.use_gpu=true"])
    assert cfg.rollout.weight_sync == "nccl"
    assert {"rollout.weight_sync", "rollout.sync_bucket_mb"} <= RESUMABLE_KEYS
