"""Accuracy-vs-bias trade-offs of a sweep: the Pareto front and the configuration to pick. Pure numpy."""

from __future__ import annotations

import numpy as np


def pareto_front(accuracy: np.ndarray, bias: np.ndarray) -> np.ndarray:
    """Boolean mask of the points no other point beats: accuracy at least as high and bias at least as low,
    strictly better in one. NaN rows (failed or stopped trials) are never on the front."""
    acc, b = np.asarray(accuracy, float), np.asarray(bias, float)
    ok = ~(np.isnan(acc) | np.isnan(b))
    ge_acc = acc[None, :] >= acc[:, None]  # [i, j]: j at least as accurate as i
    le_bias = b[None, :] <= b[:, None]
    strict = (acc[None, :] > acc[:, None]) | (b[None, :] < b[:, None])
    dominated = (ge_acc & le_bias & strict & ok[None, :]).any(axis=1)
    return ok & ~dominated


def pick(accuracy: np.ndarray, bias: np.ndarray, max_accuracy_drop: float) -> int:
    """Index of the least biased point whose accuracy is within `max_accuracy_drop` of the best."""
    acc, b = np.asarray(accuracy, float), np.asarray(bias, float)
    ok = ~(np.isnan(acc) | np.isnan(b))
    if not ok.any():
        raise ValueError("no trial reported both the accuracy and the bias metric")
    eligible = ok & (acc >= np.nanmax(acc[ok]) - max_accuracy_drop)
    candidates = np.flatnonzero(eligible)
    return int(candidates[np.lexsort((-acc[candidates], b[candidates]))[0]])
