"""Offline evaluation with Ray Data: many samples per prompt over a whole test set, then scoring.

    samples = sample_dataset(ray.data.read_parquet(test), policy_dir, cfg.rollout, n=50)
    scored = score_dataset(samples, cfg.reward)          # + "reward" and "gold_<name>" columns
    scored.write_parquet(out)

Each Ray Data actor holds one vLLM engine (the same `RolloutEngine` as the rollout actors, so evaluation
samples exactly as training does) and turns a batch of prompt rows into one row per (prompt, sample),
the prompt row's other columns repeated. A prompt's seeds derive from `rollout.seed` and the prompt text,
so re-running an evaluation reproduces it whatever the batching. Ray Data streams the rows, so a test set
larger than memory is fine; failed actors are restarted by Ray Data itself.
"""

from __future__ import annotations

import zlib
from pathlib import Path
from typing import Any

import numpy as np

from ray_crm.assets import cache_root
from ray_crm.config import RewardConfig, RolloutConfig
from ray_crm.rl.reward_actor import REWARD_KEY, build_scorer, gold_key
from ray_crm.rl.vllm_engine import RolloutEngine, Sampling, request_seeds
from ray_crm.runtime import set_threads


class _SampleBatch:
    """map_batches callable: prompt rows in, one row per (prompt, sample) out."""

    def __init__(self, model_path: str, cfg: RolloutConfig, sampling: Sampling, prompt_column: str, threads: int):
        set_threads(threads)
        self.engine = RolloutEngine(model_path, cfg, cache_root())
        self.sampling = sampling
        self.prompt_column = prompt_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch[self.prompt_column]]
        seeds = [request_seeds(self.sampling.seed, zlib.crc32(p.encode()), count=1)[0] for p in prompts]
        rollouts = self.engine.generate(prompts, self.sampling, seeds)
        n = self.sampling.n
        out = {name: np.repeat(values, n, axis=0) for name, values in batch.items()}
        completions = [c for r in rollouts for c in r.completions]
        out["sample_index"] = np.tile(np.arange(n), len(prompts))
        out["response"] = np.array([c.text for c in completions], dtype=object)
        out["response_tokens"] = np.array([len(c.token_ids) for c in completions])
        out["logprob_sum"] = np.array([sum(c.logprobs) for c in completions])
        out["finish_reason"] = np.array([c.finish_reason for c in completions], dtype=object)
        return out


class _ScoreBatch:
    """map_batches callable: adds one score column from one scorer."""

    def __init__(self, kind: str, model: str | None, cfg: RewardConfig, column: str, prompt_column: str, threads: int):
        set_threads(threads)
        self.scorer = build_scorer(kind, model, cfg, threads)
        self.column = column
        self.prompt_column = prompt_column

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        prompts = [str(p) for p in batch[self.prompt_column]]
        batch[self.column] = np.array(self.scorer.score(prompts, [str(r) for r in batch["response"]]))
        return batch


def sample_dataset(
    ds: Any,
    model_path: str | Path,
    cfg: RolloutConfig,
    torch_threads: int = 1,
    prompt_column: str = "prompt",
    batch_size: int = 64,
    **overrides: Any,
) -> Any:
    """`ds` (a Ray Dataset with a text `prompt_column`) -> one row per sample; `overrides` as in
    `RolloutPool.generate` (e.g. `n=50`). Runs `rollout.engines` engines."""
    if cfg.tensor_parallel_size > 1:
        raise ValueError("Ray Data inference runs one engine per Ray Data actor: set rollout.tensor_parallel_size=1")
    sampling = Sampling.from_config(cfg, **overrides)
    return ds.map_batches(
        _SampleBatch,
        fn_constructor_kwargs={
            "model_path": str(model_path), "cfg": cfg, "sampling": sampling, "prompt_column": prompt_column,
            "threads": cfg.engine_threads or torch_threads,
        },
        batch_size=batch_size,
        batch_format="numpy",
        concurrency=cfg.engines,
        num_cpus=cfg.cpus_per_engine,
        num_gpus=cfg.gpu_fraction if cfg.use_gpu else None,
    )


def score_dataset(ds: Any, cfg: RewardConfig, torch_threads: int = 1, prompt_column: str = "prompt") -> Any:
    """Add `reward` (if `reward.model` is set) and `gold_<name>` columns to rows holding a `response`."""
    scorers = [(REWARD_KEY, "reward_model", cfg.model)] if cfg.model else []
    scorers += [(gold_key(g.name), g.kind, g.model) for g in cfg.gold]
    for column, kind, model in scorers:
        ds = ds.map_batches(
            _ScoreBatch,
            fn_constructor_kwargs={
                "kind": kind, "model": model, "cfg": cfg, "column": column, "prompt_column": prompt_column,
                "threads": cfg.threads or torch_threads,
            },
            batch_size=cfg.batch_size,
            batch_format="numpy",
            concurrency=1 if kind == "vader" else cfg.actors,
            num_cpus=cfg.cpus_per_actor,
        )
    return ds
