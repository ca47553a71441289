"""Reward actors: the trained reward model served in batches during PPO/GRPO, and gold scorers beside it.

A gold scorer (another reward model, or a rule such as the VADER lexicon's sentiment) never feeds the
policy gradient. Its scores are returned next to the trained RM's so that reward hacking shows while it
happens: the trained reward keeps rising while the gold score stalls or falls.

    with RewardPool(cfg.reward, torch_threads=cfg.ray.torch_threads) as rewards:
        scores = rewards.score(prompts, responses)   # {"reward": [...], "gold_vader": [...], ...}
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol, Self

import ray

from ray_crm.config import RewardConfig
from ray_crm.eval.scoring import RewardScorer
from ray_crm.rl.supervision import ActorGroup, Member, contiguous_slices
from ray_crm.runtime import set_threads

REWARD_KEY = "reward"


def gold_key(name: str) -> str:
    return f"gold_{name}"


class Scorer(Protocol):
    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> Sequence[float]: ...


class VaderScorer:
    """VADER's compound sentiment of the response, in [-1, 1] (Hutto & Gilbert 2014): the gold score of the
    positive-sentiment task. A fixed lexicon rule shares none of the trained RM's learned shortcuts, so a
    gap opening between the two exposes the policy exploiting the RM."""

    def __init__(self) -> None:
        from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

        self.analyzer = SentimentIntensityAnalyzer()

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> list[float]:
        return [self.analyzer.polarity_scores(r)["compound"] for r in responses]


def build_scorer(kind: str, model: str | None, cfg: RewardConfig, threads: int) -> Scorer:
    """A gold rule, or a reward model tokenizing pairs as `prepare` did for its training data."""
    if kind == "vader":
        return VaderScorer()
    if model is None:
        raise ValueError(f"a '{kind}' scorer needs a model (an HF sequence-classification folder)")
    return RewardScorer(model, cfg.max_length, cfg.template, cfg.batch_size, cfg.reward_index, threads)


class RewardActor:
    """A Ray actor holding one scorer; created and driven by `RewardPool`."""

    def __init__(self, name: str, kind: str, model: str | None, cfg: RewardConfig, threads: int):
        set_threads(threads)
        self.name = name
        self.scorer = build_scorer(kind, model, cfg, threads)

    def ready(self) -> dict[str, Any]:
        return {"name": self.name, "pid": os.getpid()}

    def score(self, prompts: list[str], responses: list[str]) -> list[float]:
        return [float(x) for x in self.scorer.score(prompts, responses)]

    def shutdown(self) -> None:
        self.scorer = None


class RewardPool:
    """`reward.actors` actors serving the trained RM (a batch split over them) and one per gold scorer."""

    def __init__(self, cfg: RewardConfig, torch_threads: int = 1):
        if cfg.model is None and not cfg.gold:
            raise ValueError("reward: set reward.model (the trained RM folder) and/or reward.gold scorers")
        self.cfg = cfg
        threads = cfg.threads or torch_threads
        actor_cls = ray.remote(RewardActor).options(
            num_cpus=cfg.cpus_per_actor, max_restarts=cfg.max_restarts, max_task_retries=0
        )
        specs = [(f"reward-{i}", "reward_model", cfg.model) for i in range(cfg.actors if cfg.model else 0)]
        specs += [(f"gold-{g.name}", g.kind, g.model) for g in cfg.gold]
        members = [Member(name, actor_cls.remote(name, kind, model, cfg, threads)) for name, kind, model in specs]
        self.group = ActorGroup(members, cfg.start_timeout_s, cfg.max_restarts)
        self.n_reward_actors = cfg.actors if cfg.model else 0
        self.group.wait_ready()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def score(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, list[float]]:
        """Scores of every (prompt, response), in order: `reward` (trained RM) and `gold_<name>` per gold scorer."""
        if len(prompts) != len(responses):
            raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
        prompts, responses = list(prompts), list(responses)
        slices = contiguous_slices(len(prompts), self.n_reward_actors) if self.n_reward_actors else []
        args = {i: (prompts[a:b], responses[a:b]) for i, (a, b) in enumerate(slices) if b > a}
        args.update({self.n_reward_actors + j: (prompts, responses) for j in range(len(self.cfg.gold))})
        results = self.group.call("score", args, self.cfg.call_timeout_s)
        out: dict[str, list[float]] = {}
        if self.n_reward_actors:
            out[REWARD_KEY] = [s for i in range(len(slices)) for s in results.get(i, [])]
        for j, gold in enumerate(self.cfg.gold):
            out[gold_key(gold.name)] = results[self.n_reward_actors + j]
        return out

    def shutdown(self) -> None:
        self.group.shutdown()
