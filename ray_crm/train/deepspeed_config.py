"""DeepSpeed configs: the reward model's (TrainConfig: ZeRO stage, offload, precision) and the RL policy
learner's (RLConfig: ZeRO stage, gradient clipping, fp32 weights and Adam); CPU (gloo) vs GPU (NCCL)."""

from __future__ import annotations

import os
from typing import Any

from ray_crm.config import ModelConfig, RLConfig, TrainConfig

# Both stacks pass a torch optimizer (DeepSpeedCPUAdam compiles for minutes on CPU) and never print progress.
_COMMON = {"zero_allow_untested_optimizer": True, "steps_per_print": 10**9, "wall_clock_breakdown": False}


def micro_batch_size(train: TrainConfig, world_size: int) -> int:
    """Pairs per worker per micro-step; the global batch must split evenly."""
    per_step = world_size * train.grad_accum
    if train.batch_size % per_step:
        raise ValueError(
            f"train.batch_size={train.batch_size} must be divisible by num_workers x grad_accum = {per_step}"
        )
    return train.batch_size // per_step


def deepspeed_config(train: TrainConfig, model: ModelConfig, world_size: int) -> dict[str, Any]:
    zero: dict[str, Any] = {"stage": train.zero_stage}
    if train.offload and train.zero_stage > 0:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": train.use_gpu}
        if train.zero_stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": train.use_gpu}
    return {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(train, world_size),
        "gradient_accumulation_steps": train.grad_accum,
        "gradient_clipping": 1.0,
        "zero_optimization": zero,
        "bf16": {"enabled": model.precision == "bf16"},
        **_COMMON,
    }


def policy_deepspeed_config(rl: RLConfig, world_size: int) -> dict[str, Any]:
    """The RL learner's engine: one backward per optimizer step (the learner accumulates its micro-batches
    itself, so the batch sizes here are nominal), DeepSpeed's gradient clipping at `rl.grad_clip`, and fp32
    weights and Adam whatever `rl.precision` (bf16 there is autocast: GR perturbs fp32 weights). Under ZeRO-3
    no tensor persists whole: the learner gathers the trainable ones itself wherever it reads or writes them."""
    zero: dict[str, Any] = {"stage": rl.zero_stage}
    if rl.zero_stage == 3:
        zero["stage3_param_persistence_threshold"] = 0
    return {
        "train_batch_size": world_size,
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": rl.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": False},
        **_COMMON,
    }


def prepare_deepspeed_env(use_gpu: bool) -> str:
    """Process set-up before importing deepspeed; returns the torch.distributed backend to use."""
    if not use_gpu:
        os.environ["DS_ACCELERATOR"] = "cpu"
    import deepspeed

    # The CPU accelerator otherwise JIT-compiles a shared-memory comm op (~100 s) that ZeRO never uses.
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    return "nccl" if use_gpu else "gloo"
