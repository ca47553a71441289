"""Bin-stratified global batches (pure numpy).

The MMD between two bins is undefined unless each holds >= 2 rewards of the batch, so a batch is built by
first taking `min_per_stratum` examples from as many strata as fit (chosen with probability proportional to
what each has left, so large strata are spread over the epoch), then filling the rest from those same
strata. Only when they run dry do other strata contribute. The plan depends on (strata, batch_size, seed,
epoch) alone: every Ray Train worker builds the same global batches and takes `batch[rank::world_size]`,
so 2 workers with B/2 each see exactly what 1 worker with B sees.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np


class StratifiedBatchSampler:
    def __init__(
        self, strata: np.ndarray, batch_size: int, seed: int = 0, drop_last: bool = True, min_per_stratum: int = 2
    ) -> None:
        if batch_size < 1 or min_per_stratum < 1:
            raise ValueError("batch_size and min_per_stratum must be >= 1")
        self.keys, self.strata = np.unique(np.asarray(strata), return_inverse=True)
        self.strata = self.strata.reshape(-1).astype(np.int64)
        self.batch_size = batch_size
        self.seed = seed
        self.drop_last = drop_last
        self.min_per_stratum = min_per_stratum

    def __len__(self) -> int:
        n = len(self.strata)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batches(self, epoch: int = 0) -> Iterator[np.ndarray]:
        """Index arrays of the global batches of one epoch; each index at most once per epoch."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.strata))
        grouped = order[np.argsort(self.strata[order], kind="stable")]  # shuffled within each stratum
        left = np.bincount(self.strata, minlength=len(self.keys)).astype(np.int64)
        start = np.concatenate([[0], np.cumsum(left)[:-1]])
        used = np.zeros_like(left)
        m = self.min_per_stratum
        for _ in range(len(self)):
            size = min(self.batch_size, int(left.sum()))
            take = np.zeros_like(left)
            eligible = np.flatnonzero(left >= m)
            k = min(size // m, len(eligible))
            if k:
                chosen = rng.choice(eligible, size=k, replace=False, p=left[eligible] / left[eligible].sum())
                take[chosen] = m
                # the rest comes from the chosen strata while they last, then from the others
                for pool in (np.isin(np.arange(len(left)), chosen), np.ones(len(left), bool)):
                    cap = np.where(pool, left - take, 0)
                    rest = min(size - int(take.sum()), int(cap.sum()))
                    if rest > 0:
                        take += rng.multivariate_hypergeometric(cap, rest)
            else:
                take += rng.multivariate_hypergeometric(left, size)
            pos = start + used
            batch = np.concatenate([grouped[p : p + t] for p, t in zip(pos[take > 0], take[take > 0])])
            used += take
            left -= take
            yield rng.permutation(batch)

    @staticmethod
    def shard(batch: np.ndarray, rank: int, world_size: int) -> np.ndarray:
        """This worker's share of a global batch."""
        return batch[rank::world_size]
