"""Each benchmark summary on its real probe layout with planted rewards, so every number is known."""

import numpy as np
import pytest

from ray_crm.config import BenchConfig
from ray_crm.eval import benchmarks as B
from ray_crm.eval.summaries import SUMMARIES

CFG = BenchConfig(train_pairs=40, validation_pairs=10, test_items=40, demographic_items=6)


@pytest.fixture(scope="module")
def probes():
    full = B.load_sentences()
    sentences = full.iloc[np.random.default_rng(1).choice(len(full), 8000, replace=False)]
    return {name: B.build(name, CFG, sentences).probes for name in B.BUILDERS}


def test_sycophancy_prefix_outweighing_correctness(probes):
    p = probes["sycophancy"]
    out = SUMMARIES["sycophancy"](p.assign(reward=1.0 * (p.role == "chosen") + 2.0 * (p.z == "sycophantic")), 8)
    assert out["accuracy"] == 100.0
    assert out["sycophancy_rate"] == 100.0 and out["sycophancy_rate_floor"] == 0.0
    assert out["prefix_shift"] == pytest.approx(2.0) and out["prefix_win_rate"] == 100.0
    assert out["ci_gap"] == pytest.approx(2.0)
    assert out["ci_gap_std"] == pytest.approx(2.0 / 0.5)  # twin means 2 (chosen) and 1 (rejected)


def test_concept_push_towards_positive(probes):
    p = probes["concept"]
    reward = 1.0 * (p.role == "chosen") + 2.0 * ((p.response == "positive") & (p.z != "none"))
    out = SUMMARIES["concept"](p.assign(reward=reward), 8)
    # with C: positives right, negatives wrong; without C: all right
    assert out["delta_1"] == 0.0 and out["delta_0"] == -100.0 and out["bias_at_c"] == 100.0
    assert out["acc_at_c"] == 50.0 and out["acc_at_noc"] == 100.0 and out["accuracy"] == 75.0
    assert out["concept_margin_shift"] == pytest.approx(2.0) and out["concept_margin_win_rate"] == 100.0


def test_length_reward_equal_to_length(probes):
    p = probes["length"]
    out = SUMMARIES["length"](p.assign(reward=0.1 * p.words), 4)
    assert out["spearman_length"] == pytest.approx(1.0)
    assert out["accuracy_chosen_longer"] == 100.0 and out["accuracy_chosen_shorter"] == 0.0
    assert out["accuracy"] == 50.0  # the test pairs are length-balanced
    assert out["pad_win_rate"] == 100.0 and out["pad_shift"] > 0
    assert np.all(np.diff(out["length_per_rank"]) < 0)


def test_demographic_planted_gender_penalty(probes):
    p = probes["demographic"]
    rng = np.random.default_rng(0)
    item_effect = p.item.map(dict(enumerate(rng.normal(0, 1, p.item.max() + 1))))
    reward = item_effect - 0.5 * (p.gender == "female") + rng.normal(0, 1e-3, len(p))
    out = SUMMARIES["demographic"](p.assign(reward=reward), 8)
    scale = out["reward_scale"]
    assert out["coefficients"]["gender"]["female"] == pytest.approx(-0.5 / scale, abs=0.01)
    others = [c for a, levels in out["coefficients"].items() for lvl, c in levels.items() if lvl != "female"]
    assert np.allclose(others, 0.0, atol=0.01)
    assert out["discrimination"] == pytest.approx(0.5 / scale / 9, abs=0.01)  # one of 9 levels moves
