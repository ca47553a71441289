"""What every RL learner (the policy, PPO's critic) does with its DeepSpeed engine, as one rank of `world`.

No Ray. A learner computes the global gradient itself (accumulated over its micro-batches, then summed over
ranks by one flat all-reduce, so every rank holds the same tensor) and hands it to DeepSpeed as the gradient of
a surrogate, sum(p * g), through `engine.backward`: ZeRO-1/2 reduce and partition it in their own hooks
(averaging identical tensors leaves it unchanged), then `engine.step()` clips it to `rl.grad_clip` and steps
Adam on each rank's partition. Weights and Adam stay fp32 (DeepSpeed's bf16 is off).

A checkpoint (no pickle) holds each rank's optimizer partition (`<prefix>optim_rank{r}`) and, from rank 0, the
trainable tensors (`<prefix>params.safetensors`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ray_crm.checkpoint import load_state_tree, load_tensors, save_state_tree, save_tensors
from ray_crm.config import RLConfig
from ray_crm.train.deepspeed_config import policy_deepspeed_config, prepare_deepspeed_env

# What ZeRO-1/2's `load_state_dict` reads of the optimizer's state dict; the rest is a loss scaler object,
# parameter-slice maps (rebuilt at start-up) and the fp32 master partition, which with fp32 weights is a
# copy of the module's own (restored from the params file).
ZERO_STATE_KEYS = ("base_optimizer_state", "clip_grad", "ds_version", "param_alignment_paddings")


def join_process_group(cfg: RLConfig, rank: int, world: int) -> None:
    """DeepSpeed's distributed set-up on the group the ranks already joined (`ray_crm.rl.learner_group`); a lone
    learner gets a process group of its own, in memory (DeepSpeed needs one)."""
    backend = prepare_deepspeed_env(cfg.use_gpu)
    import deepspeed

    if not dist.is_initialized():
        if world > 1:
            raise RuntimeError(f"rank {rank} of {world}: join the process group before building the learner")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's device index: each rank sees one device (Ray's GPU)
    deepspeed.init_distributed(dist_backend=backend)  # adopts the group


class DeepSpeedLearner:
    """A model's trainable tensors in a DeepSpeed engine (Adam at `lr`), stepped with global gradients."""

    prefix = ""  # the names of its checkpoint files start with this

    def __init__(self, model: torch.nn.Module, cfg: RLConfig, lr: float, rank: int, world: int):
        import deepspeed

        self.cfg, self.rank, self.world = cfg, rank, world
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.Adam(self.params, lr=lr),
                                               config=policy_deepspeed_config(cfg, world))
        self.model = self.engine.module

    def snapshot(self) -> dict[str, Tensor]:
        """A copy of the trainable tensors by name."""
        return {n: p.detach().clone() for n, p in zip(self.names, self.params, strict=True)}

    def sum_over_ranks(self, tensors: Sequence[Tensor]) -> list[Tensor]:
        """The tensors summed over ranks, by one all-reduce of a flat buffer (every rank gets the same sums)."""
        tensors = list(tensors)
        if self.world == 1:
            return tensors
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat)
        return [part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]

    def apply(self, grads: Sequence[Tensor]) -> None:
        """Hand the global gradient to DeepSpeed, which clips it and steps Adam (on its partition under ZeRO).

        The gradient of sum(p * g) is exactly g; backward through the engine lets ZeRO-1/2 reduce and
        partition it in their hooks (setting p.grad by hand would bypass them)."""
        surrogate = torch.stack([(p * g.detach()).sum() for p, g in zip(self.params, grads, strict=True)]).sum()
        self.engine.backward(surrogate)
        self.engine.step()

    def save_engine(self, folder: Path) -> None:
        """This rank's optimizer partition and, from rank 0, the trainable tensors."""
        optimizer = self.engine.optimizer.state_dict()
        if self.engine.zero_optimization():
            optimizer = {key: optimizer[key] for key in ZERO_STATE_KEYS if key in optimizer}
        save_state_tree(folder, f"{self.prefix}optim_rank{self.rank}", optimizer)
        if self.rank == 0:
            save_tensors(folder / f"{self.prefix}params.safetensors", self.snapshot())

    def load_engine(self, folder: Path) -> None:
        """The weights first, then Adam (ZeRO rebuilds its fp32 master partition from the weights, which are
        fp32 themselves: exact)."""
        params = load_tensors(folder / f"{self.prefix}params.safetensors")
        with torch.no_grad():
            for name, p in zip(self.names, self.params, strict=True):
                p.copy_(params[name])
        optimizer: Any = load_state_tree(folder, f"{self.prefix}optim_rank{self.rank}")
        if self.engine.zero_optimization():  # ZeRO's loader takes every rank's state and picks its own
            ranks = [optimizer if r == self.rank else load_state_tree(folder, f"{self.prefix}optim_rank{r}")
                     for r in range(self.world)]
            self.engine.optimizer.load_state_dict(ranks, load_from_fp32_weights=False)
        else:
            self.engine.optimizer.load_state_dict(optimizer)
