"""`ray-crm train-rl`: GRPO with gradient regularization (or the KL / reference-reset baselines) on Ray.

Each step: the vLLM rollout pool samples `rollout.n_samples` completions for `rl.prompts_per_step` prompts,
the reward pool scores them with the trained RM (and the gold scorers, which only measure hacking), the
learner actor (`PolicyLearner`) takes one optimizer step on Dr.GRPO advantages, and its new weights reach
every engine before the next step (a partial sync of the merged LoRA targets, or the full state dict).

Written to `<output_dir>/<name>/train-rl/` (or `rl.output_dir`):
- `rl.csv` (+ TensorBoard): per step the trained reward, each gold score, response length, the learner's
  loss, KL, GR gradient norms and engine/learner log-prob gap, and the generate / score / learn / sync times;
- `samples.jsonl`: the first completion of each prompt every step (what the policy is learning to say);
- `checkpoints/step_N/`: the learner (trainable tensors, Adam, reference) every `rl.checkpoint_every` steps;
  a rerun of the same command resumes from the latest one;
- `policy/`: the final policy as an HF folder (LoRA merged); `summary.json`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import ray
import torch

from ray_crm.assets import resolve_model
from ray_crm.config import Config, ConfigError
from ray_crm.rl.policy_learner import PolicyBatch, PolicyLearner
from ray_crm.rl.policy_losses import group_advantages
from ray_crm.rl.prompts import load_prompts
from ray_crm.rl.reward_actor import REWARD_KEY, RewardPool, gold_key
from ray_crm.rl.rollout import ENGINE_DTYPES, RolloutPool
from ray_crm.rl.weights import pack_state_dict
from ray_crm.runtime import init_ray, set_threads
from ray_crm.train.metrics_log import MetricsLog

logger = logging.getLogger(__name__)


class PolicyLearnerActor:
    """A Ray actor holding the `PolicyLearner` (on a GPU when `rl.use_gpu`)."""

    def __init__(self, model_path: str, cfg: Config):
        set_threads(cfg.rl.learner_threads or cfg.ray.torch_threads)
        self.learner = PolicyLearner(model_path, cfg.rl)

    def step(self, batch: PolicyBatch) -> dict[str, float]:
        return self.learner.step(batch)

    def engine_weights(self, dtype: torch.dtype) -> tuple[list[ray.ObjectRef], bool]:
        """The weights for the engines, put in the object store by this process (the driver never holds them)."""
        state, partial = self.learner.engine_weights()
        return [ray.put(pack_state_dict(state, dtype, partial))], partial

    def save(self, path: str) -> None:
        torch.save(self.learner.state(), path)

    def load(self, path: str) -> int:
        self.learner.load_state(torch.load(path, weights_only=False))
        return self.learner.step_count

    def save_policy(self, folder: str) -> str:
        return str(self.learner.save_policy(Path(folder)))


def output_dir(cfg: Config) -> Path:
    return Path(cfg.rl.output_dir).resolve() if cfg.rl.output_dir else cfg.stage_dir("train-rl")


def latest_checkpoint(folder: Path) -> Path | None:
    done = sorted(p for p in folder.glob("step_*") if (p / "driver.json").exists())
    return done[-1] if done else None


def check(cfg: Config) -> None:
    """Settings GRPO cannot learn from, refused before any actor starts."""
    if cfg.rollout.n_samples < 2:
        raise ConfigError("rollout.n_samples must be >= 2: GRPO's baseline is the mean of a prompt's samples")
    if cfg.rollout.temperature <= 0:
        raise ConfigError("rollout.temperature must be > 0: greedy samples of a prompt are all the same")
    if cfg.reward.model is None:
        raise ConfigError("reward.model: the trained reward model folder (ray-crm train-rm exports one)")


def _sync(learner, pool: RolloutPool, dtype: torch.dtype, version: int):
    (ref,), partial = ray.get(learner.engine_weights.remote(dtype))
    return pool.sync_weights(ref, version=version, partial=partial)


def _means(values: dict[str, list[float]]) -> dict[str, float]:
    return {f"{key}_mean": sum(v) / len(v) for key, v in values.items() if v}


def trial_bundles(cfg: Config) -> list[dict[str, float]]:
    """The Ray resources of one run: the driver's bundle, then one bundle for every actor it starts (a Tune trial
    reserves both; Tune keeps the first for the trial itself and creates the actors in the second). GPU engines
    place themselves in their own placement group, so only CPU engines are counted."""
    actors = (cfg.reward.actors if cfg.reward.model else 0) + len(cfg.reward.gold)
    engines = 0 if cfg.rollout.use_gpu else cfg.rollout.engines
    cpus = engines * cfg.rollout.cpus_per_engine + actors * cfg.reward.cpus_per_actor + cfg.rl.learner_cpus
    return [{"CPU": 0.01}, {"CPU": round(cpus, 4), **({"GPU": 1.0} if cfg.rl.use_gpu else {})}]


def reported_metric_names(cfg: Config) -> set[str]:
    """The scalar columns of `rl.csv` a sweep may rank trials by (besides the learner's own statistics)."""
    names = {f"{REWARD_KEY}_mean", "reward_std", "response_tokens_mean", "finished_fraction", "policy/loss",
             "policy/grad_norm", "policy/engine_logprob_gap"}
    names |= {f"{gold_key(g.name)}_mean" for g in cfg.reward.gold}
    if cfg.rl.regularizer == "gr":
        names |= {"gr/g1_norm", "gr/g2_norm"}
    if cfg.rl.regularizer in ("kl", "reset"):
        names.add("policy/kl_to_reference")
    return names


def run_train_rl(cfg: Config, report: Callable[[dict[str, float]], None] | None = None) -> dict[str, Any]:
    """Train (or resume) the policy; `report` (e.g. `ray.tune.report`) receives every step's metrics."""
    check(cfg)
    rl = cfg.rl
    out = output_dir(cfg)
    ckpt_root = out / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    resumed = latest_checkpoint(ckpt_root)
    done = json.loads((resumed / "driver.json").read_text())["step"] if resumed is not None else 0
    if done >= rl.steps and (out / "summary.json").is_file():  # finished: nothing to train, no actor to start
        return {**json.loads((out / "summary.json").read_text()), **_paths(out), "resumed_from_step": done}
    prompts = load_prompts(rl.prompts, rl.prompt_column, out / "quarantine.jsonl")
    init_ray(cfg.ray)
    need, have = sum(b.get("CPU", 0.0) for b in trial_bundles(cfg)), ray.cluster_resources().get("CPU", 0.0)
    if need > have:
        logger.warning("train-rl reserves %.2f CPUs (rollout, reward, gold and learner actors) and the cluster has "
                       "%.2f: some actors will wait for more nodes (lower *.cpus_per_* on a small machine)", need, have)
    policy = str(resolve_model(rl.policy))
    dtype = ENGINE_DTYPES[cfg.rollout.dtype]
    learner = ray.remote(PolicyLearnerActor).options(
        num_cpus=rl.learner_cpus, num_gpus=1 if rl.use_gpu else 0
    ).remote(policy, cfg)
    start = 0 if resumed is None else ray.get(learner.load.remote(str(resumed / "learner.pt")))
    log = MetricsLog(out, "rl")
    log.drop_after(start)  # steps after the checkpoint are taken (and logged) again
    _drop_samples_after(out / "samples.jsonl", start)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(rl.seed)).tolist()
    with RolloutPool(policy, cfg.rollout, cfg.ray.torch_threads) as pool, \
            RewardPool(cfg.reward, cfg.ray.torch_threads) as rewards, open(out / "samples.jsonl", "a") as samples:
        if start:
            _sync(learner, pool, dtype, version=start)
        row: dict[str, float] = {}
        for step in range(start, rl.steps):
            chosen = [prompts[order[(step * rl.prompts_per_step + i) % len(prompts)]]
                      for i in range(rl.prompts_per_step)]
            t0 = time.perf_counter()
            seed = None if cfg.rollout.seed is None else cfg.rollout.seed + step
            rollouts = pool.generate(chosen, seed=seed)
            t1 = time.perf_counter()
            flat = [(r, c) for r in rollouts for c in r.completions]
            scores = rewards.score([r.prompt for r, _ in flat], [c.text for _, c in flat])
            t2 = time.perf_counter()
            reward = torch.tensor(scores[REWARD_KEY]).view(len(rollouts), -1)
            advantages = group_advantages(reward, whiten=rl.whiten_advantages).flatten().tolist()
            batch = PolicyBatch(
                prompt_ids=[r.prompt_token_ids for r, _ in flat], response_ids=[c.token_ids for _, c in flat],
                advantages=advantages, engine_logprobs=[c.logprobs for _, c in flat],
                temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
            )
            stats = ray.get(learner.step.remote(batch))
            t3 = time.perf_counter()
            synced = _sync(learner, pool, dtype, version=step + 1)
            lengths = [len(c.token_ids) for _, c in flat]
            row = {
                **_means(scores), "reward_std": float(reward.std()),
                "response_tokens_mean": sum(lengths) / len(lengths),
                "finished_fraction": sum(c.finish_reason == "stop" for _, c in flat) / len(flat),
                "policy_version": min(r.policy_version for r in rollouts), **stats,
                "time/generate_s": t1 - t0, "time/score_s": t2 - t1, "time/learn_s": t3 - t2,
                "time/sync_s": synced.seconds,
            }
            log.write(step + 1, row)
            if report is not None:
                report({"step": step + 1, **row})
            samples.writelines(json.dumps({"step": step + 1, "prompt": r.prompt, "response": r.completions[0].text})
                               + "\n" for r in rollouts)
            samples.flush()
            logger.info("rl step %d: reward %.4f, %.1f tokens, %s", step + 1, row[f"{REWARD_KEY}_mean"],
                        row["response_tokens_mean"], {k: round(v, 4) for k, v in row.items() if k.startswith("gold_")})
            if (step + 1) % rl.checkpoint_every == 0 or step + 1 == rl.steps:
                _checkpoint(learner, ckpt_root, step + 1, rl.keep_checkpoints)
    policy_dir = ray.get(learner.save_policy.remote(str(out / "policy")))
    summary = {**_paths(out), "policy": policy_dir, "steps": rl.steps,
               "resumed_from_step": start if resumed is not None else None, "last": row}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _paths(out: Path) -> dict[str, str]:
    """Where a run's outputs are (recomputed on every call: a finished run's folder may have been moved)."""
    return {"output_dir": str(out), "policy": str(out / "policy"), "metrics": str(out / "rl.csv")}


def _drop_samples_after(path: Path, step: int) -> None:
    """Keep the sample lines of steps up to `step` (a crash may also have cut the last line short)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines(keepends=True):
        with contextlib.suppress(json.JSONDecodeError):
            if json.loads(line)["step"] <= step:
                kept.append(line)
    path.write_text("".join(kept))


def _checkpoint(learner, root: Path, step: int, keep: int) -> None:
    """Written under a temporary name and renamed, so a crash never leaves a half checkpoint to resume from."""
    final, tmp = root / f"step_{step:06d}", root / f".step_{step:06d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    ray.get(learner.save.remote(str(tmp / "learner.pt")))
    (tmp / "driver.json").write_text(json.dumps({"step": step}))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in root.glob("step_*") if p.is_dir())[:-keep]:
        shutil.rmtree(old)
