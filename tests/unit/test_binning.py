"""Bins fitted on train, re-applied anywhere: quantile, categorical, joint; merging; JSON round trip."""

from __future__ import annotations

import json

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from ray_crm.data.binning import Binning, CategoryBins, QuantileBins, fit_binning


def test_quantile_edges_split_train_evenly_and_apply_to_new_values():
    rng = np.random.default_rng(0)
    train = rng.normal(size=10_000)
    bins = QuantileBins.fit(train, 10, min_count=20)
    assert bins.n == 10
    counts = np.bincount(bins.apply(train), minlength=10)
    assert counts.min() > 900 and counts.max() < 1100
    extremes = bins.apply(np.array([-1e9, 1e9]))
    assert extremes.tolist() == [0, 9]  # values beyond the train range land in the end bins


def test_small_quantile_bins_are_merged_into_a_neighbour():
    train = np.array([1] * 500 + [2] * 3 + [3] * 500, float)  # ties collapse edges; '2' alone is too small
    bins = QuantileBins.fit(train, 10, min_count=20)
    counts = np.bincount(bins.apply(train))
    assert counts.min() >= 20 and counts.sum() == len(train)


def test_categories_small_ones_merge_into_other_and_unseen_go_there():
    train = np.array(["a"] * 50 + ["b"] * 30 + ["c"] * 3 + ["d"], dtype=object)
    bins = CategoryBins.fit(train, min_count=20)
    assert bins.groups == (("a",), ("b",), ("c", "d")) and bins.fallback == 2
    assert bins.apply(np.array(["b", "d", "never-seen"], dtype=object)).tolist() == [1, 2, 2]
    assert bins.unseen(np.array(["a", "zzz"], dtype=object)) == 1


def test_unseen_category_without_other_bin_goes_to_the_largest():
    bins = CategoryBins.fit(np.array([0] * 30 + [1] * 50), min_count=20)
    assert bins.apply(np.array([1, 0, 7])).tolist() == [0, 1, 0]


def test_joint_bins_are_the_mixed_radix_product():
    z = {"len": np.array([1.0, 5.0, 9.0, 1.0]), "syc": np.array([0, 1, 0, 1])}
    binning = fit_binning(z, {"len": True, "syc": False}, {"len": 3, "syc": 0}, min_count=1)
    each = binning.apply_each(z)
    assert binning.num_bins == binning.sizes[0] * binning.sizes[1]
    assert binning.apply(z).tolist() == (each["len"] * binning.sizes[1] + each["syc"]).tolist()
    assert binning.label(int(binning.apply(z)[1])).startswith("len=[")


@settings(max_examples=80, deadline=None)
@given(
    st.lists(st.integers(0, 60), min_size=1, max_size=200),
    st.lists(st.sampled_from(["x", "y", "z"]), min_size=1, max_size=200),
    st.lists(st.integers(-100, 200), min_size=1, max_size=50),
    st.integers(1, 12),
    st.integers(1, 30),
)
def test_fit_on_train_apply_on_test_is_stable_and_in_range(lengths, cats, test_lengths, nbins, min_count):
    n = min(len(lengths), len(cats))
    train = {"len": np.array(lengths[:n], float), "cat": np.array(cats[:n], dtype=object)}
    binning = fit_binning(train, {"len": True, "cat": False}, {"len": nbins, "cat": 0}, min_count)
    restored = Binning.from_dict(json.loads(json.dumps(binning.to_dict())))
    assert restored == binning
    test = {"len": np.array(test_lengths, float), "cat": np.array((["x", "w"] * 50)[: len(test_lengths)], dtype=object)}
    ids = binning.apply(test)
    assert ids.min() >= 0 and ids.max() < binning.num_bins  # never -1, even for unseen values
    assert np.array_equal(ids, restored.apply(test))
    refit = fit_binning(train, {"len": True, "cat": False}, {"len": nbins, "cat": 0}, min_count)
    assert refit == binning  # fitting is deterministic
