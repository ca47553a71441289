"""Reward actors on real Ray: the trained RM split over actors, a gold scorer beside it."""

from __future__ import annotations

import pytest

from ray_crm.config import GoldScorerConfig, RewardConfig
from ray_crm.eval.scoring import RewardScorer
from ray_crm.rl.reward_actor import RewardPool

pytestmark = pytest.mark.integration


def test_reward_pool_scores_in_order_with_gold_scores(ray_local, tiny_bert_dir):
    cfg = RewardConfig(
        model=str(tiny_bert_dir), actors=2, cpus_per_actor=0.25, batch_size=2,
        gold=[GoldScorerConfig(name="vader", kind="vader")],
    )
    prompts = [f"review {i}" for i in range(5)]
    responses = ["a wonderful film", "awful and boring", "great acting", "terrible plot", "it is a movie"]
    with RewardPool(cfg) as pool:
        scores = pool.score(prompts, responses)
    assert set(scores) == {"reward", "gold_vader"}
    direct = RewardScorer(str(tiny_bert_dir), cfg.max_length, cfg.template).score(prompts, responses)
    assert scores["reward"] == pytest.approx(direct, abs=1e-5)
    vader = scores["gold_vader"]
    assert vader[0] > 0 > vader[1] and vader[2] > 0 > vader[3] and vader[4] == 0


def test_reward_pool_needs_something_to_score():
    with pytest.raises(ValueError, match="reward.model"):
        RewardPool(RewardConfig())
