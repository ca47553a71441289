"""Guarantees of the bin-stratified sampler, as properties over random strata, batch sizes and seeds."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_crm.data.sampler import StratifiedBatchSampler

strata_lists = st.lists(st.integers(0, 12), min_size=1, max_size=300)
cases = st.tuples(strata_lists, st.integers(1, 40), st.integers(0, 2**31 - 1), st.booleans())


def plan(strata, batch_size, seed, drop_last, epoch=0):
    sampler = StratifiedBatchSampler(np.array(strata), batch_size, seed=seed, drop_last=drop_last)
    return sampler, list(sampler.batches(epoch))


@settings(max_examples=150, deadline=None)
@given(cases)
def test_batches_cover_the_epoch_once(case):
    strata, batch_size, _, drop_last = case
    sampler, batches = plan(*case)
    assert len(batches) == len(sampler)
    seen = np.concatenate(batches) if batches else np.zeros(0, int)
    assert len(np.unique(seen)) == len(seen)  # no index twice in an epoch
    assert all(len(b) == batch_size for b in (batches if drop_last else batches[:-1]))
    if not drop_last:
        assert len(seen) == len(strata)
    else:
        assert len(seen) == len(strata) // batch_size * batch_size


@settings(max_examples=150, deadline=None)
@given(cases)
def test_each_batch_holds_two_of_as_many_strata_as_fit(case):
    """#strata with >= 2 examples in a batch >= min(batch // 2, #strata that still have >= 2 examples)."""
    strata = np.array(case[0])
    _, batches = plan(*case)
    left = np.bincount(strata, minlength=13)
    for batch in batches:
        counts = np.bincount(strata[batch], minlength=13)
        assert (counts >= 2).sum() >= min(len(batch) // 2, int((left >= 2).sum()))
        # a stratum with examples to spare shows up alone only once the strata picked for the batch ran dry
        if len(batch) >= 2 and ((counts == 1) & (left >= 2)).any():
            assert ((counts >= 2) & (counts == left)).any()
        left -= counts


@settings(max_examples=60, deadline=None)
@given(cases, st.integers(0, 5))
def test_deterministic_by_seed_and_epoch(case, epoch):
    _, first = plan(*case, epoch=epoch)
    _, again = plan(*case, epoch=epoch)
    assert all(np.array_equal(a, b) for a, b in zip(first, again)) and len(first) == len(again)


@settings(max_examples=60, deadline=None)
@given(cases, st.integers(1, 4))
def test_worker_shards_make_up_the_global_batch(case, world_size):
    """Every worker builds the same plan and takes rank::world_size; together they see the global batch."""
    strata, batch_size, seed, drop_last = case
    sampler = StratifiedBatchSampler(np.array(strata), batch_size, seed=seed, drop_last=drop_last)
    for batch in sampler.batches(1):
        shards = [sampler.shard(batch, rank, world_size) for rank in range(world_size)]
        assert sorted(np.concatenate(shards).tolist()) == sorted(batch.tolist())
        assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_epochs_differ_and_large_strata_are_spread():
    strata = np.repeat(np.arange(10), 100)
    sampler = StratifiedBatchSampler(strata, 16, seed=3)
    e0, e1 = list(sampler.batches(0)), list(sampler.batches(1))
    assert not all(np.array_equal(a, b) for a, b in zip(e0, e1))
    assert all(len(np.unique(strata[b])) == 8 for b in e0)  # 8 strata x 2 examples in every batch of 16


def test_arbitrary_stratum_keys():
    strata = np.array([7, 7, 1000, 1000, -3, -3] * 5)
    batches = list(StratifiedBatchSampler(strata, 6, seed=0).batches(0))
    assert all(sorted(np.bincount(np.unique(strata, return_inverse=True)[1][b])) == [2, 2, 2] for b in batches)
