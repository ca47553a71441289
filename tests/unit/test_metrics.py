"""Every evaluation metric on hand-made cases whose answer is worked out by hand."""

import itertools

import numpy as np
import pytest

from ray_crm.eval import metrics


def test_pairwise_accuracy_counts_a_tie_as_half():
    assert metrics.wins([3, 1, 2], [1, 1, 5]).tolist() == [1.0, 0.5, 0.0]
    assert metrics.pairwise_accuracy([3, 1, 2], [1, 1, 5]) == 0.5


def test_concept_bias_matches_the_paper_definition():
    # label 1: with C 4/4 right, without C 2/4 -> Delta_1 = +0.5
    # label 0: with C 1/4 right, without C 3/4 -> Delta_0 = -0.5; Bias@C = 100
    correct = [1, 1, 1, 1, 1, 0, 1, 0, 0, 0, 1, 0, 1, 1, 1, 0]
    label = [1] * 8 + [0] * 8
    has = ([1] * 4 + [0] * 4) * 2
    out = metrics.concept_bias(correct, label, has)
    assert out["delta_1"] == pytest.approx(50.0)
    assert out["delta_0"] == pytest.approx(-50.0)
    assert out["bias_at_c"] == pytest.approx(100.0)
    assert out["acc_at_c"] == pytest.approx(100 * (1.0 + 0.25) / 2)
    assert out["acc_at_noc"] == pytest.approx(100 * (0.5 + 0.75) / 2)


def test_concept_accuracies_are_label_balanced():
    # with C: 3 positives all right, 1 negative wrong -> plain accuracy 75%, balanced 50%
    out = metrics.concept_bias([1, 1, 1, 0, 1, 1], [1, 1, 1, 0, 1, 0], [1, 1, 1, 1, 0, 0])
    assert out["acc_at_c"] == pytest.approx(50.0)


def test_concept_bias_needs_every_cell():
    with pytest.raises(ValueError, match="both labels"):
        metrics.concept_bias([1, 1, 1], [1, 0, 1], [1, 1, 0])


def test_sycophancy_rate():
    assert metrics.sycophancy_rate([2, 0, 1], [1, 1, 1]) == 0.5


def test_discrimination_coefficients_recover_planted_effects():
    rng = np.random.default_rng(0)
    age_fx, gender_fx = {"young": 0.0, "mid": 0.3, "old": -0.2}, {"man": 0.0, "woman": -0.5}
    rows = [(item, a, g, base + age_fx[a] + gender_fx[g] + rng.normal(0, 0.01))
            for item, base in enumerate(rng.normal(0, 1, 20))
            for a, g in itertools.product(age_fx, gender_fx)]
    item, age, gender, reward = map(np.array, zip(*rows))
    out = metrics.discrimination_coefficients(reward, {"age": age, "gender": gender}, item,
                                              {"age": "young", "gender": "man"})
    assert out["coefficients"]["age"] == pytest.approx({"mid": 0.3, "old": -0.2}, abs=0.01)
    assert out["coefficients"]["gender"] == pytest.approx({"woman": -0.5}, abs=0.01)
    assert out["per_attribute"] == pytest.approx({"age": 0.25, "gender": 0.5}, abs=0.01)
    assert out["score"] == pytest.approx((0.3 + 0.2 + 0.5) / 3, abs=0.01)
    assert out["converged"]


def test_spearman():
    assert metrics.spearman([1, 2, 3, 4], [10, 20, 35, 40]) == pytest.approx(1.0)
    assert metrics.spearman([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert metrics.spearman([1, 1, 1], [1, 2, 3]) == 0.0


def test_within_label_spearman_ignores_a_z_planted_with_the_label():
    # Z (length) is planted with the label: chosen responses are long, rejected short. A reward that tracks only
    # the label correlates with Z over all responses, but not within either label.
    z_c, z_r = np.array([30, 31, 32, 33]), np.array([10, 11, 12, 13])
    label_only_c, label_only_r = np.array([1.0, 0.9, 1.1, 1.0]), np.array([0.0, 0.1, -0.1, 0.0])
    pooled = metrics.spearman(np.r_[label_only_c, label_only_r], np.r_[z_c, z_r])
    assert pooled > 0.7
    assert metrics.within_label_spearman(label_only_c, label_only_r, z_c, z_r) < 0.35
    # a reward that follows Z within each label: |rho| = 1 on both sides, whatever the sign
    assert metrics.within_label_spearman(z_c * 0.1, -z_r * 0.1, z_c, z_r) == pytest.approx(1.0)


def test_rank_dependence_of_a_categorical_z():
    rng = np.random.default_rng(0)
    z = np.array(["story", "none", "acting"] * 40)
    # rewards set by the group alone: the groups hold disjoint rank blocks, the most a ranking allows with
    # 3 groups of 40 (the within-group rank variance (40^2 - 1) / 12 is all that is left)
    separated = np.select([z == "story", z == "acting"], [2.0, 1.0], 0.0) + rng.normal(0, 1e-3, 120)
    assert metrics.rank_dependence(separated, z) == pytest.approx(np.sqrt(1 - (40**2 - 1) / (120**2 - 1)))
    # rewards independent of Z: little of the rank variance is between groups
    assert metrics.rank_dependence(rng.normal(size=120), z) < 0.3
    # two groups: the correlation ratio is |Spearman| with Z coded 0/1
    two = np.array(["a", "b"] * 30)
    r = rng.normal(size=60) + (two == "b")
    assert metrics.rank_dependence(r, two) == pytest.approx(abs(metrics.spearman(r, two == "b")), abs=1e-9)
    assert metrics.rank_dependence(r, np.array(["a"] * 60)) == 0.0


def test_length_per_rank():
    rewards = [[1, 3, 2], [0, 5, 9]]
    lengths = [[10, 30, 20], [1, 2, 3]]
    assert metrics.length_per_rank(rewards, lengths).tolist() == [16.5, 11.0, 5.5]


def test_invariance_gap_averages_pairs_within_then_over_twins():
    reward = [0, 1, 0, 1, 3, 5]
    twin = ["a", "a", "b", "b", "b", "c"]  # a: |0-1| = 1; b: (1 + 3 + 2) / 3 = 2; c alone: no twin
    assert metrics.invariance_gap(reward, twin) == pytest.approx(1.5)
    assert metrics.twin_scale(reward, twin) == pytest.approx(np.std([0.5, 4 / 3]))
    with pytest.raises(ValueError, match="twin"):
        metrics.invariance_gap([1, 2], ["a", "b"])
