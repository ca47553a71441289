"""Differentiable all-gather, so that every rank computes the MMD penalty over the global batch.

The penalty is not a mean over samples: computed per rank on B/W samples it is a different (noisier, fewer
samples per bin) estimate than on B. Recipe for data-parallel training with W ranks:

    values, bins = gather_global(local_rewards, local_bins)          # same global tensors on every rank
    loss = local_mean_bt_loss + lam * binned_mmd_penalty(values, bins)[0]

Every rank computes the same global penalty; the gather's backward sums the gradient over ranks, so each rank's
local rewards receive W x their share, and the gradient averaging of DDP / DeepSpeed (divide by W) restores the
single-process gradient of mean-BT(B) + lam * penalty(B). `crm_loss(..., global_batch=True)` does exactly this.
(A framework that sums gradients over ranks instead would need lam / W, and a BT sum instead of a mean.)
It is a collective: every rank must call it, in the same order. The BT mean matches the global mean only when
the local batches have equal sizes; the gather itself accepts unequal sizes.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor


def _gather_rows(x: Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> Tensor:
    """All-gather along dim 0 with unequal lengths: pad to the longest, gather, strip, concatenate by rank."""
    padded = x.new_zeros((max(sizes), *x.shape[1:]))
    padded[: x.shape[0]] = x
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded, group=group)
    return torch.cat([part[:n] for part, n in zip(parts, sizes)])


class _AllGatherRows(torch.autograd.Function):
    """Forward: gather rows from all ranks. Backward: sum the gradient over ranks, keep this rank's rows."""

    @staticmethod
    def forward(ctx, x: Tensor, sizes: list[int], group: dist.ProcessGroup | None) -> Tensor:
        ctx.sizes, ctx.group = sizes, group
        return _gather_rows(x, sizes, group)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None]:
        grad = grad.clone(memory_format=torch.contiguous_format)  # all_reduce is in place
        dist.all_reduce(grad, group=ctx.group)
        rank = dist.get_rank(ctx.group)
        start = sum(ctx.sizes[:rank])
        return grad[start : start + ctx.sizes[rank]], None, None


def gather_global(values: Tensor, bins: Tensor, group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor]:
    """The (values, bins) of all ranks of `group`, concatenated in rank order; values stay differentiable.

    Without an initialised process group (or with one rank) the local tensors are returned unchanged.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return values, bins
    local = torch.tensor([values.shape[0]], device=values.device)
    sizes = [torch.empty_like(local) for _ in range(dist.get_world_size(group))]
    dist.all_gather(sizes, local, group=group)
    sizes = [int(n) for n in sizes]
    return _AllGatherRows.apply(values, sizes, group), _gather_rows(bins, sizes, group)
