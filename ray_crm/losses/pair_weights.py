"""Pair weights that take the spurious variable's direction out of the Bradley-Terry loss (`loss.balance`).

When Z sits on the chosen response far more often than on the rejected one (the flattering phrase on the right
answer in 80% of pairs), the BT loss is met by Z alone and the content is learned slowly or not at all; the MMD
penalty then fights that shortcut instead of the data never teaching it. Mirror weights make every stratum
(bin of the chosen, bin of the rejected) weigh as much as its mirror (the bins swapped): under them "Z higher on
the chosen side" is as common as "Z higher on the rejected side", so Z's direction carries no net signal in
the loss while the content's does. It is importance weighting towards the data in which the preference label
and Z's direction are independent, the distribution the causal RM's penalty aims at.

The same balance can be reached by resampling (`mirror_resample_index`, `loss.balance=mirror_sample`): the pairs
are drawn once per run with probability proportional to their weights. When a stratum is rare (the phrase on the
rejected answer in 4% of the sycophancy pairs, weight 8.5), weights make each batch's pull swing with whether it
holds one of those pairs, while resampled batches each carry both directions in equal share; on the sycophancy
benchmark resampling got the content learned where weights did not (docs/training.md).
"""

from __future__ import annotations

import numpy as np


def mirror_balance_weights(bin_chosen: np.ndarray, bin_rejected: np.ndarray) -> np.ndarray:
    """Per pair, (n(i, j) + n(j, i)) / (2 n(i, j)) for its stratum (i, j) = (bin of chosen, bin of rejected),
    rescaled to mean 1 over the pairs given (the training split).

    Pairs in equal bins, pairs with an unknown bin (negative id), and strata whose mirror never occurs (nothing
    to balance against) keep weight 1 before the rescaling. Each stratum and its mirror then carry equal total
    weight, and the pair of them as much as before. Raises when no pair can be balanced: a Z of the prompt
    (concept, demographic) puts both responses in one bin, and the weights would all be 1.
    """
    chosen, rejected = np.asarray(bin_chosen, dtype=np.int64), np.asarray(bin_rejected, dtype=np.int64)
    if chosen.shape != rejected.shape or chosen.ndim != 1:
        raise ValueError(f"bins must be two 1-d arrays of one length, got {chosen.shape} and {rejected.shape}")
    known = (chosen >= 0) & (rejected >= 0)
    size = int(max(chosen.max(initial=0), rejected.max(initial=0))) + 1
    counts = np.zeros((size, size))
    np.add.at(counts, (chosen[known], rejected[known]), 1)
    mine = np.where(known, counts[chosen.clip(0), rejected.clip(0)], 1.0)
    mirror = np.where(known, counts[rejected.clip(0), chosen.clip(0)], 0.0)
    balanced = known & (chosen != rejected) & (mirror > 0)
    if chosen.size and not balanced.any():
        raise ValueError("loss.balance: no training pair has its chosen and rejected responses in different bins of Z "
                         "with the swapped bins also present, so mirror balance would change nothing (a Z of the "
                         "prompt, such as concept or demographic, puts both responses in one bin); set loss.balance=none")
    weights = np.where(balanced, (mine + mirror) / (2 * mine), 1.0)
    return weights / weights.mean() if weights.size else weights


def mirror_resample_index(bin_chosen: np.ndarray, bin_rejected: np.ndarray, seed: int) -> np.ndarray:
    """As many pair indices as there are pairs, drawn with replacement with probability proportional to
    `mirror_balance_weights`: in expectation every stratum then holds as many pairs as its mirror. The draw
    depends on (bins, seed) alone, so every worker holding the same rows draws the same indices."""
    weights = mirror_balance_weights(bin_chosen, bin_rejected)
    return np.random.default_rng(seed).choice(len(weights), size=len(weights), p=weights / weights.sum())
