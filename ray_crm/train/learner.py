"""The learner layer: one rank of `world` holding a model's trainable tensors in a DeepSpeed engine, for every
model this project trains: reward models and DPO policies (`ray_crm.train.rm_trainer`, on Ray Train workers,
stepping `engine.backward(loss)`), and the RL policy and critic (`ray_crm.rl.policy_learner`, on the
`LearnerGroup`'s actors, stepping with global gradients as below). Both write one checkpoint format.

No Ray. An RL learner computes the global gradient itself (accumulated over its micro-batches, then summed over
ranks by one flat all-reduce, so every rank holds the same tensor) and hands it to DeepSpeed as the gradient of
a surrogate, sum(p * g), through `engine.backward`: ZeRO-1/2 reduce and partition it in their own hooks
(averaging identical tensors leaves it unchanged), then `engine.step()` clips it to `rl.grad_clip` and steps
Adam on each rank's partition. Weights and Adam stay fp32 (DeepSpeed's bf16 is off).

Under ZeRO-3 every weight is sharded too. DeepSpeed's module hooks gather each layer's weights for its forward
and backward passes; wherever the learner itself reads or writes trainable tensors (a snapshot, GR's
perturbation and restore, the reference swapped in, the surrogate's backward, a checkpoint) it gathers them
with `whole`/`edit`, collectives every rank enters in step, and it reads the whole policy (weight sync,
export) in one gather. Writes go back through rank 0's copy, which every rank computed identically.

A checkpoint (no pickle) holds each rank's optimizer partition (`<prefix>optim_rank{r}`, with its fp32 master
copy, so bf16 weights resume exactly) and, from rank 0, the trainable tensors (`<prefix>params.safetensors`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from ray_crm.checkpoint import load_state_tree, load_tensors, save_state_tree, save_tensors
from ray_crm.train.deepspeed_config import prepare_deepspeed_env

# What ZeRO-1/2's `load_state_dict` reads of the optimizer's state dict, the fp32 master partition included;
# the rest is a loss scaler object and parameter-slice maps (rebuilt at start-up).
ZERO_STATE_KEYS = ("base_optimizer_state", "clip_grad", "ds_version", "param_alignment_paddings",
                   "single_partition_of_fp32_groups")
# ZeRO-3's: Adam's state and the fp32 master partition of this rank (the trainable tensors' shards).
ZERO3_STATE_KEYS = ("optimizer_state_dict", "fp32_flat_groups", "partition_count")


def join_process_group(use_gpu: bool, rank: int, world: int) -> None:
    """DeepSpeed's distributed set-up on the group the ranks already joined (Ray Train's, or
    `ray_crm.rl.learner_group`'s); a lone learner gets a process group of its own, in memory (DeepSpeed needs one)."""
    backend = prepare_deepspeed_env(use_gpu)
    import deepspeed

    if not dist.is_initialized():
        if world > 1:
            raise RuntimeError(f"rank {rank} of {world}: join the process group before building the learner")
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1)
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed's device index: each rank sees one device (Ray's GPU)
    deepspeed.init_distributed(dist_backend=backend)  # adopts the group


def trainable(model: torch.nn.Module) -> list[Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


class DeepSpeedLearner:
    """A model's trainable tensors in a DeepSpeed engine built from `ds_config` around `optimizer` (a torch
    optimizer over `trainable(model)`): stepped by `engine.backward(loss)` or with global gradients (`apply`)."""

    prefix = ""  # the names of its checkpoint files start with this

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, ds_config: dict[str, Any],
                 rank: int, world: int):
        import deepspeed

        self.rank, self.world = rank, world
        self.names = [n for n, p in model.named_parameters() if p.requires_grad]
        self.params = trainable(model)
        self.shapes = [p.shape for p in self.params]  # whole: ZeRO-3 empties the tensors it shards
        self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        self.model = self.engine.module

    @property
    def sharded(self) -> bool:
        """ZeRO-3: every weight is sharded over the ranks, and module hooks gather each layer's for its pass."""
        return self.engine.zero_optimization_stage() == 3

    def whole(self, params: Sequence[Tensor] | None = None, edit: bool = False) -> contextlib.AbstractContextManager:
        """`params` (default: every weight) whole on every rank for the block. Under ZeRO-3 a collective (every
        rank enters it) whose writes are lost unless `edit`: then rank 0's values (every rank writes the same)
        are sharded back on leaving. A no-op below ZeRO-3, where every rank holds every weight."""
        if not self.sharded:
            return contextlib.nullcontext()
        import deepspeed

        params = list(self.model.parameters() if params is None else params)
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if edit else None)

    def edit(self, params: Sequence[Tensor]) -> contextlib.AbstractContextManager:
        """`params` whole and writable in place for the block (GR's perturbation and its restore)."""
        return self.whole(params, edit=True)

    @contextlib.contextmanager
    def swapped_in(self, weights: dict[str, Tensor] | None):
        """The trainable tensors replaced by `weights` (by name) for the block, then restored bit for bit; for
        forward passes without gradient (a reference policy's log-probs). In place, not `functional_call`, so
        it also holds under ZeRO-3, whose module hooks fetch the parameters themselves."""
        if not weights:
            yield
            return
        saved = self.snapshot()
        self._write(weights)
        try:
            yield
        finally:
            self._write(saved)

    @torch.no_grad()
    def _write(self, weights: dict[str, Tensor]) -> None:
        with self.edit(self.params):
            for name, p in zip(self.names, self.params, strict=True):
                p.copy_(weights[name])

    def snapshot(self) -> dict[str, Tensor]:
        """A copy of the trainable tensors by name (whole, under ZeRO-3 too)."""
        with self.whole(self.params):
            return {n: p.detach().clone() for n, p in zip(self.names, self.params, strict=True)}

    def gradients(self, loss: Tensor) -> tuple[Tensor, ...]:
        """d loss / d trainable tensors, whole, by `torch.autograd.grad` (not accumulated into .grad: DeepSpeed
        sees only the global gradient, in `apply`); under ZeRO-3 the weights its hooks gathered for the backward
        pass are then released, as DeepSpeed's own backward does."""
        grads = torch.autograd.grad(loss, self.params)
        if self.sharded:
            self.engine.optimizer.parameter_offload.release_backward_leftovers()
        return grads

    def zeros(self) -> list[Tensor]:
        """Zero tensors shaped like the whole trainable tensors: gradient accumulators."""
        return [torch.zeros(shape, dtype=p.dtype, device=p.device) for shape, p in zip(self.shapes, self.params)]

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
        with self.whole(self.params):  # ZeRO-3's gradient hooks partition what arrives for whole tensors
            surrogate = torch.stack([(p * g.detach()).sum() for p, g in zip(self.params, grads, strict=True)]).sum()
            self.engine.backward(surrogate)
        self.engine.step()

    def save_engine(self, folder: Path) -> None:
        """This rank's optimizer partition and, from rank 0, the trainable tensors."""
        folder.mkdir(parents=True, exist_ok=True)
        params = self.snapshot()  # a collective under ZeRO-3: before rank 0 goes its own way
        optimizer = self.engine.optimizer.state_dict()
        if self.engine.zero_optimization():
            keys = ZERO3_STATE_KEYS if self.sharded else ZERO_STATE_KEYS
            optimizer = {key: optimizer[key] for key in keys if key in optimizer}
        save_state_tree(folder, f"{self.prefix}optim_rank{self.rank}", optimizer)
        if self.rank == 0:
            save_tensors(folder / f"{self.prefix}params.safetensors", params)

    def load_engine(self, folder: Path) -> None:
        """The weights first, then the optimizer with its fp32 master partition (exact under bf16 weights too)."""
        self._write(load_tensors(folder / f"{self.prefix}params.safetensors"))
        optimizer: Any = load_state_tree(folder, f"{self.prefix}optim_rank{self.rank}")
        if self.sharded:  # ZeRO-3 reads its own rank's entry, and the loss-scaler settings fp32 does not use
            live = self.engine.optimizer
            optimizer.update(loss_scaler=live.loss_scaler, dynamic_loss_scale=live.dynamic_loss_scale, overflow=False)
            self.engine.optimizer.load_state_dict([optimizer] * self.world, load_from_fp32_weights=True)
        elif self.engine.zero_optimization():  # ZeRO-1/2's loader takes every rank's state and picks its own
            ranks = [optimizer if r == self.rank else load_state_tree(folder, f"{self.prefix}optim_rank{r}")
                     for r in range(self.world)]
            self.engine.optimizer.load_state_dict(ranks, load_from_fp32_weights=True)
        else:
            self.engine.optimizer.load_state_dict(optimizer)
