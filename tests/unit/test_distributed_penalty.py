"""The global-batch penalty across 2 real gloo processes equals the 1-process penalty: loss and gradients."""

from __future__ import annotations

import socket
from dataclasses import replace
from datetime import timedelta
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from ray_crm.losses import MMDConfig, binned_mmd_penalty, crm_loss, gather_global

WORLD, B, FEATURES, M, LAM = 2, 16, 6, 4, 0.7
MMD = MMDConfig(num_bins=M)  # median bandwidth: it too must see the global batch
UNEQUAL = [5, 11]  # local sizes for the penalty-only case
VARIANTS = ("unconditional", "conditional", "unconditional-rbf", "conditional-rbf")


def _problem():
    g = torch.Generator().manual_seed(0)
    feats = torch.randn(2, B, FEATURES, generator=g, dtype=torch.float64)
    bins = torch.stack([torch.randint(0, M, (B,), generator=g), torch.randint(-1, M, (B,), generator=g)])
    model = torch.nn.Linear(FEATURES, 1, dtype=torch.float64)
    with torch.no_grad():
        model.weight.copy_(torch.randn(1, FEATURES, generator=g, dtype=torch.float64))
        model.bias.fill_(0.1)
    return feats, bins, model


def _z_values() -> torch.Tensor:
    """Z's measured values of every (side, pair): bin id plus noise, one NaN (unknown) per side."""
    _, bins, _ = _problem()
    z = bins.double() + torch.rand(bins.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z[:, 3] = float("nan")
    return z


def _crm_step(rows: slice, variant: str, global_batch: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """One reward-model step on the pairs `rows`: the CRM loss and the parameter gradients. Variant
    "<variant>-rbf" compares Z by its values (HSIC) instead of its bins."""
    feats, bins, model = _problem()
    rewards = model(feats[:, rows]).squeeze(-1)
    variant, _, kernel = variant.partition("-")
    z = _z_values()[:, rows] if kernel else (None, None)
    loss, _ = crm_loss(
        rewards[0], rewards[1], bins[0, rows], bins[1, rows], LAM, variant,
        replace(MMD, z_kernel="rbf") if kernel else MMD, global_batch=global_batch, chosen_z=z[0], rejected_z=z[1],
    )
    loss.backward()
    return loss.detach(), [p.grad for p in model.parameters()]


def _penalty_step(rows: slice) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """Penalty alone over the chosen rewards `rows`, gathered: penalty, global bins, parameter gradients."""
    feats, bins, model = _problem()
    values, global_bins = gather_global(model(feats[0, rows]).squeeze(-1), bins[0, rows])
    penalty, _ = binned_mmd_penalty(values, global_bins, MMD)
    penalty.backward()
    return penalty.detach(), global_bins, [p.grad for p in model.parameters()]


def _mean_over_ranks(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """What DDP / DeepSpeed do to gradients: all-reduce and divide by the world size."""
    for t in tensors:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return tensors


def _worker(rank: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD, timeout=timedelta(seconds=60)
    )
    try:
        results = {}
        shard = B // WORLD
        for variant in VARIANTS:
            loss, grads = _crm_step(slice(rank * shard, (rank + 1) * shard), variant, global_batch=True)
            results[variant] = _mean_over_ranks([loss, *grads])
        start = sum(UNEQUAL[:rank])
        penalty, global_bins, grads = _penalty_step(slice(start, start + UNEQUAL[rank]))
        results["unequal"] = [penalty, global_bins, *_mean_over_ranks(grads)]
        torch.save(results, Path(out) / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("gloo")
    with socket.socket() as s:  # a free port; the tiny race until the workers bind it is acceptable in tests
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_worker, args=(port, str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt") for r in range(WORLD)]


@pytest.mark.parametrize("variant", VARIANTS)
def test_two_workers_match_one_worker(ranks, variant):
    loss, grads = _crm_step(slice(0, B), variant, global_batch=True)
    for result in ranks:
        torch.testing.assert_close(result[variant][0], loss, rtol=1e-6, atol=1e-9)
        for got, want in zip(result[variant][1:], grads):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_unequal_local_sizes_gather_in_rank_order(ranks):
    penalty, _, grads = _penalty_step(slice(0, sum(UNEQUAL)))
    _, bins, _ = _problem()
    for result in ranks:
        assert torch.equal(result["unequal"][1], bins[0, : sum(UNEQUAL)])
        torch.testing.assert_close(result["unequal"][0], penalty, rtol=1e-6, atol=1e-9)
        for got, want in zip(result["unequal"][2:], grads):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)


def test_local_penalty_differs_from_global():
    """Why the gather exists: per-rank penalties on B/2 samples are another estimate than on B."""
    loss, _ = _crm_step(slice(0, B), "unconditional", global_batch=False)
    halves = [_crm_step(slice(r * B // 2, (r + 1) * B // 2), "unconditional", global_batch=False)[0] for r in range(2)]
    assert not torch.allclose(sum(halves) / 2, loss)


def test_without_a_process_group_gather_is_the_identity():
    values, bins = torch.randn(5, requires_grad=True), torch.arange(5)
    got_values, got_bins = gather_global(values, bins)
    assert got_values is values and got_bins is bins
