"""Bins of the spurious variables, fitted on the train split and re-applied everywhere else (pure numpy).

A continuous Z gets quantile edges, a discrete Z one bin per category, and several Zs the joint product
(mixed radix, first Z most significant), so a bin id is always in [0, num_bins) - never -1 - even for a value
the train split never showed. Per-Z bins with fewer than `min_count` train responses are merged (a quantile
bin into its smaller neighbour, small categories into one 'other' bin); small joint cells are only reported,
as merging them would make the joint bins lose their meaning. Everything round-trips through JSON.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from math import prod
from typing import Any

import numpy as np


@dataclass(frozen=True)
class QuantileBins:
    edges: tuple[float, ...]  # bin i holds edges[i-1] <= z < edges[i]

    @property
    def n(self) -> int:
        return len(self.edges) + 1

    def apply(self, values: np.ndarray) -> np.ndarray:
        return np.searchsorted(np.asarray(self.edges, dtype=np.float64), np.asarray(values, np.float64), "right")

    def label(self, i: int) -> str:
        lo = f"{self.edges[i - 1]:g}" if i > 0 else "-inf"
        hi = f"{self.edges[i]:g}" if i < len(self.edges) else "inf"
        return f"[{lo}, {hi})"

    @classmethod
    def fit(cls, values: np.ndarray, bins: int, min_count: int) -> QuantileBins:
        values = np.asarray(values, np.float64)
        if values.size == 0:
            return cls(())
        edges = list(np.unique(np.quantile(values, np.linspace(0.0, 1.0, bins + 1)[1:-1])))
        counts = list(np.bincount(cls(tuple(edges)).apply(values), minlength=len(edges) + 1))
        while len(counts) > 1 and min(counts) < min_count:
            i = int(np.argmin(counts))
            j = i + 1 if i == 0 or (i < len(counts) - 1 and counts[i + 1] < counts[i - 1]) else i - 1
            lo = min(i, j)
            counts[lo : lo + 2] = [counts[lo] + counts[lo + 1]]
            del edges[lo]
        return cls(tuple(float(e) for e in edges))

    def to_dict(self) -> dict[str, Any]:
        return {"type": "quantile", "edges": list(self.edges)}


@dataclass(frozen=True)
class CategoryBins:
    groups: tuple[tuple[Any, ...], ...]  # the categories of each bin
    fallback: int  # bin of values unseen in train: the 'other' bin if there is one, else the largest

    @property
    def n(self) -> int:
        return len(self.groups)

    def _lookup(self) -> dict[str, int]:
        """Category (compared as text, so 1 and np.int64(1) agree) -> bin."""
        return {str(c): i for i, group in enumerate(self.groups) for c in group}

    def apply(self, values: np.ndarray) -> np.ndarray:
        lookup = self._lookup()
        uniq, inverse = np.unique(np.asarray(values, dtype=object).astype(str), return_inverse=True)
        return np.array([lookup.get(u, self.fallback) for u in uniq], np.int64)[inverse.reshape(-1)]

    def unseen(self, values: np.ndarray) -> int:
        lookup = self._lookup()
        return int(sum(str(v) not in lookup for v in values))

    def label(self, i: int) -> str:
        group = self.groups[i]
        return str(group[0]) if len(group) == 1 else f"other({len(group)} categories)"

    @classmethod
    def fit(cls, values: np.ndarray, min_count: int) -> CategoryBins:
        counts = Counter(v.item() if isinstance(v, np.generic) else v for v in values)
        ordered = sorted(counts, key=lambda c: (-counts[c], str(c)))  # most frequent first, then by name
        big = [c for c in ordered if counts[c] >= min_count]
        small = [c for c in ordered if counts[c] < min_count]
        if not big:
            return cls((tuple(ordered),), 0)
        groups = tuple((c,) for c in big) + ((tuple(small),) if small else ())
        return cls(groups, len(groups) - 1 if small else 0)

    def to_dict(self) -> dict[str, Any]:
        return {"type": "categorical", "groups": [list(g) for g in self.groups], "fallback": self.fallback}


ZBins = QuantileBins | CategoryBins


@dataclass(frozen=True)
class Binning:
    """The joint bins of several Zs; `apply` maps Z values to joint bin ids in [0, num_bins)."""

    names: tuple[str, ...]
    parts: tuple[ZBins, ...]

    @property
    def sizes(self) -> tuple[int, ...]:
        return tuple(p.n for p in self.parts)

    @property
    def num_bins(self) -> int:
        return prod(self.sizes)

    def apply_each(self, values: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {name: part.apply(values[name]).astype(np.int64) for name, part in zip(self.names, self.parts)}

    def apply(self, values: Mapping[str, np.ndarray]) -> np.ndarray:
        ids = self.apply_each(values)
        joint = np.zeros(len(ids[self.names[0]]), np.int64)
        for name, size in zip(self.names, self.sizes):
            joint = joint * size + ids[name]
        return joint

    def unseen(self, values: Mapping[str, np.ndarray]) -> dict[str, int]:
        """Per discrete Z, how many values train never showed (they went to the fallback bin)."""
        return {n: p.unseen(values[n]) for n, p in zip(self.names, self.parts) if isinstance(p, CategoryBins)}

    def label(self, bin_id: int) -> str:
        labels = []
        for name, part, size in reversed(list(zip(self.names, self.parts, self.sizes))):
            bin_id, i = divmod(bin_id, size)
            labels.append(f"{name}={part.label(i)}")
        return ", ".join(reversed(labels))

    def to_dict(self) -> dict[str, Any]:
        return {"names": list(self.names), "parts": [p.to_dict() for p in self.parts], "num_bins": self.num_bins}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Binning:
        parts: list[ZBins] = []
        for p in data["parts"]:
            if p["type"] == "quantile":
                parts.append(QuantileBins(tuple(p["edges"])))
            else:
                parts.append(CategoryBins(tuple(tuple(g) for g in p["groups"]), p["fallback"]))
        return cls(tuple(data["names"]), tuple(parts))


def fit_binning(
    values: Mapping[str, np.ndarray],
    continuous: Mapping[str, bool],
    bins: Mapping[str, int],
    min_count: int,
) -> Binning:
    """Fit each Z on its train values (chosen and rejected responses pooled) and join them."""
    names: Sequence[str] = list(values)
    parts = tuple(
        QuantileBins.fit(values[n], bins[n], min_count) if continuous[n] else CategoryBins.fit(values[n], min_count)
        for n in names
    )
    return Binning(tuple(names), parts)
