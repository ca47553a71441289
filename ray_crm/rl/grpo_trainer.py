"""`ray-crm train-rl`: GRPO, RLOO or PPO with gradient regularization (or the KL / reference-reset baselines) on Ray.

Each step: the vLLM rollout pool samples `rollout.n_samples` completions for `rl.prompts_per_step` prompts,
the reward pool scores them with the trained RM (and the gold scorers, which only measure hacking), the
learner (`LearnerGroup`: `rl.num_workers` DeepSpeed ranks, data-parallel over the batch) takes `rl.epochs` x
`rl.minibatches` optimizer steps on Dr.GRPO or RLOO advantages (PPO, `rl.advantage=gae`: on its critic's GAE
advantages from the rewards, the critic stepping beside it), and rank 0's new weights reach every engine before
the next step (a partial sync of the merged LoRA targets, or the full state dict). The three actor groups
start at once (`start_together`): the engine's compile and the learner's and reward models' loads overlap.

Non-finite values never reach the engines or a checkpoint: samples that a scorer gave a NaN or infinite score
are left out of the step (`dropped_rows`, `nonfinite/<score>`), and a step whose loss or gradient is not finite
is skipped by the learner (`skipped`, `skip_reason`), whose weights then stay as they were and are not synced.
Every call to the learner has a timeout (`learner_group.LEARNER_TIMEOUT_S`) and an error naming the call and
the rank.

Written to `<output_dir>/<name>/train-rl/` (or `rl.output_dir`):
- `config.yaml`: the settings of the run; a rerun resumes only if its `rl.*`, `reward.*` and `rollout.*` keys
  are the same, but for those that change how long or how fast it runs (`RESUMABLE_KEYS`);
- `rl.csv` (+ TensorBoard): per step the trained reward, each gold score, response length, the learner's
  loss, KL, GR gradient norms and engine/learner log-prob gap, skips and dropped samples, and the generate /
  score / learn / sync times;
- `samples.jsonl`: the first completion of each prompt every step (what the policy is learning to say);
- `checkpoints/step_N/`: the learner (trainable tensors, each rank's Adam partition, reference; safetensors
  and JSON, no pickle) and the driver's step, every `rl.checkpoint_every` steps, complete only once its
  `COMPLETE.json` (sizes and hashes) is written last: a rerun of the same command resumes from the latest
  one that verifies;
- `policy/`: the final policy as an HF folder (LoRA merged); `monitor.png` (the monitor's columns against
  step, alarms marked); `summary.json`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import statistics
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pandas as pd
import ray
import torch
import yaml

from ray_crm.assets import resolve_model
from ray_crm.checkpoint import latest_verified, write_checkpoint
from ray_crm.config import Config, ConfigError, MonitorConfig, RLConfig, dump_config
from ray_crm.eval.plots import rl_monitor
from ray_crm.rl.advantages import rloo_advantages
from ray_crm.rl.learner_group import LearnerGroup
from ray_crm.rl.monitor import Alarm, TrainingZ, alarms
from ray_crm.rl.policy_learner import PolicyBatch
from ray_crm.rl.policy_losses import finite_rows, group_advantages
from ray_crm.rl.prompts import load_prompts
from ray_crm.rl.regularizers import regularizer
from ray_crm.rl.reward_actor import REWARD_KEY, RewardPool, gold_key
from ray_crm.rl.rollout import ENGINE_DTYPES, RolloutPool
from ray_crm.rl.supervision import start_together
from ray_crm.runtime import init_ray
from ray_crm.train.metrics_log import MetricsLog

logger = logging.getLogger(__name__)

# The sections whose settings a resumed run must share with the run it continues ...
SETTINGS_SECTIONS = ("rl", "reward", "rollout")
# ... but for these, which change how long, where or how fast it runs, not what it learns.
RESUMABLE_KEYS = frozenset({
    "rl.steps", "rl.checkpoint_every", "rl.keep_checkpoints", "rl.output_dir", "rl.learner_cpus",
    "rl.eval_prompts", "rl.eval_every", "rl.eval_samples",
    "rl.learner_threads", *(f"rl.monitor.{key}" for key in MonitorConfig.model_fields),
    *(f"rollout.{key}" for key in (
        "engines", "cpus_per_engine", "engine_threads", "kv_cache_gib", "max_num_seqs", "max_num_batched_tokens",
        "enforce_eager", "gpu_memory_utilization", "gpu_fraction", "start_timeout_s", "generate_timeout_s",
        "sync_timeout_s", "max_restarts", "weight_sync", "sync_bucket_mb")),
    *(f"reward.{key}" for key in (
        "actors", "cpus_per_actor", "threads", "batch_size", "start_timeout_s", "call_timeout_s", "max_restarts")),
})


def output_dir(cfg: Config) -> Path:
    return Path(cfg.rl.output_dir).resolve() if cfg.rl.output_dir else cfg.stage_dir("train-rl")


def check(cfg: Config) -> None:
    """Settings GRPO cannot learn from, refused before any actor starts."""
    if cfg.rollout.n_samples < 2 and cfg.rl.advantage != "gae":
        raise ConfigError(f"rollout.n_samples must be >= 2: rl.advantage={cfg.rl.advantage}'s baseline is the mean "
                          "of a prompt's (other) samples; PPO's (gae) is its critic")
    if cfg.rollout.temperature <= 0:
        raise ConfigError("rollout.temperature must be > 0: greedy samples of a prompt are all the same")
    if cfg.reward.model is None:
        raise ConfigError("reward.model: the trained reward model folder (ray-crm train-rm exports one)")


def changed_settings(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """The dotted `SETTINGS_SECTIONS` keys whose values differ between two dumped configs (a key only one of
    them has differs too), but for `RESUMABLE_KEYS`: what would make a resumed run a different experiment."""
    a, b = (_flatten({s: c.get(s, {}) for s in SETTINGS_SECTIONS}) for c in (old, new))
    return sorted(k for k in a.keys() | b.keys() if k not in RESUMABLE_KEYS and (k in a, a.get(k)) != (k in b, b.get(k)))


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys; lists (`reward.gold`, `rl.prompts`) stay whole values."""
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _check_resumable(out: Path, cfg: Config) -> None:
    """Refuse to resume the run in `out` under other settings than it trained with: its checkpoint, log and
    samples would silently mix two experiments."""
    saved = out / "config.yaml"
    if not saved.is_file():
        logger.warning("%s has no config.yaml (written before settings were recorded): resuming it unchecked", out)
        return
    changed = changed_settings(yaml.safe_load(saved.read_text()), cfg.model_dump(mode="json"))
    if changed:
        raise ConfigError(f"{out} holds a run trained with other settings ({', '.join(changed)} differ from its "
                          "config.yaml) and a rerun would resume it: pick another `name` or `rl.output_dir`, or "
                          "rerun with the saved settings")


def _sync(learner: LearnerGroup, pool: RolloutPool, dtype: torch.dtype, version: int, cfg: Config):
    """The learner's stepped weights to every engine: through the object store (rank 0 puts them there), or
    broadcast by rank 0 over NCCL (`rollout.weight_sync=nccl`, GPUs)."""
    during, timeout_s = f"weight sync v{version}", cfg.rollout.sync_timeout_s
    if cfg.rollout.weight_sync == "nccl":
        t0 = time.perf_counter()
        nbytes = learner.broadcast_weights(version, dtype, during=during, timeout_s=timeout_s)
        return pool.mark_synced(version, time.perf_counter() - t0, nbytes)
    (ref,), partial = learner.engine_weights(dtype, during=during, timeout_s=timeout_s)
    return pool.sync_weights(ref, version=version, partial=partial)


def _means(values: dict[str, list[float]]) -> dict[str, float]:
    return {f"{key}_mean": sum(v) / len(v) for key, v in values.items() if v}


def trial_bundles(cfg: Config) -> list[dict[str, float]]:
    """The Ray resources of one run: the driver's bundle, then one bundle for every actor it starts (a Tune trial
    reserves both; Tune keeps the first for the trial itself and creates the actors in the second, the learner
    ranks included). GPU engines place themselves in their own placement group, so only CPU engines are
    counted."""
    rl = cfg.rl
    actors = (cfg.reward.actors if cfg.reward.model else 0) + len(cfg.reward.gold)
    engines = 0 if cfg.rollout.use_gpu else cfg.rollout.engines
    cpus = engines * cfg.rollout.cpus_per_engine + actors * cfg.reward.cpus_per_actor + rl.num_workers * rl.learner_cpus
    return [{"CPU": 0.01}, {"CPU": round(cpus, 4), **({"GPU": float(rl.num_workers)} if rl.use_gpu else {})}]


def reserved_cpus(cfg: Config) -> float:
    """All the CPUs one run reserves (every bundle of `trial_bundles`)."""
    return sum(bundle.get("CPU", 0.0) for bundle in trial_bundles(cfg))


def reported_metric_names(cfg: Config) -> set[str]:
    """The scalar columns of `rl.csv` a sweep may rank trials by (besides the learner's own statistics)."""
    names = {f"{REWARD_KEY}_mean", "reward_std", "response_tokens_mean", "finished_fraction", "policy/loss",
             "policy/grad_norm", "policy/engine_logprob_gap", "policy/entropy"}
    names |= {f"{gold_key(g.name)}_mean" for g in cfg.reward.gold}
    if cfg.rl.monitor.kl_to_initial and cfg.rl.monitor.kl_every == 1:  # a sweep's metric is in every result
        names.add("policy/kl_to_initial")
    if cfg.rl.eval_prompts:
        names |= {f"eval/{key}" for key in (f"{REWARD_KEY}_mean", "response_tokens_mean", "finished_fraction",
                                             *(f"{gold_key(g.name)}_mean" for g in cfg.reward.gold))}
    return names | set(regularizer(cfg.rl.regularizer).metrics)


def run_train_rl(cfg: Config, report: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Train (or resume) the policy; `report` (e.g. `ray.tune.report`) receives every step's metrics."""
    check(cfg)
    rl = cfg.rl
    out = output_dir(cfg)
    ckpt_root = out / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    resumed = latest_verified(ckpt_root)
    if resumed is not None:
        _check_resumable(out, cfg)
    start = json.loads((resumed / "driver.json").read_text())["step"] if resumed is not None else 0
    if start >= rl.steps and (out / "summary.json").is_file():  # finished: nothing to train, no actor to start
        return {**json.loads((out / "summary.json").read_text()), **_paths(out), "resumed_from_step": start}
    (out / "config.yaml").write_text(dump_config(cfg))
    prompts = load_prompts(rl.prompts, rl.prompt_column, out / "quarantine.jsonl")
    held_out = load_prompts(rl.eval_prompts, rl.prompt_column, out / "eval_quarantine.jsonl") if rl.eval_prompts else []
    init_ray(cfg.ray)
    need, have = reserved_cpus(cfg), ray.cluster_resources().get("CPU", 0.0)
    if need > have:
        logger.warning("train-rl reserves %.2f CPUs (rollout, reward, gold and learner actors) and the cluster has "
                       "%.2f: some actors will wait for more nodes (lower *.cpus_per_* on a small machine)", need, have)
    policy = str(resolve_model(rl.policy))
    dtype = ENGINE_DTYPES[cfg.rollout.dtype]
    log = MetricsLog(out, "rl")
    log.drop_after(start)  # steps after the checkpoint are taken (and logged) again
    _drop_samples_after(out / "samples.jsonl", start)
    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(rl.seed)).tolist()
    learner, pool, rewards = start_together(lambda: LearnerGroup(policy, cfg),
                                            lambda: RolloutPool(policy, cfg.rollout, cfg.ray.torch_threads),
                                            lambda: RewardPool(cfg.reward, cfg.ray.torch_threads))
    with learner, pool, rewards, open(out / "samples.jsonl", "a") as samples:
        if cfg.rollout.weight_sync == "nccl":
            learner.enable_weight_broadcast(pool.members, cfg.rollout, pool.version, during="joining the NCCL weight group")
        if resumed is not None:  # the driver's step, not the learner's count of optimizer steps: those skip NaNs
            learner.load(resumed, during=f"resuming from {resumed}")
        if start:
            _sync(learner, pool, dtype, start, cfg)
        row: dict[str, Any] = {}
        monitor, history, stopped = TrainingZ.beside(cfg.reward.model), [], None
        # every report to a sweep carries the latest held-out evaluation (Tune wants its metric in each result)
        evaluated = _last_evaluation(log.path) if start else {}
        if held_out and start == 0:  # the initial policy on the held-out prompts: what the run is measured from
            evaluated = _evaluate(pool, rewards, held_out, cfg)
            log.write(0, evaluated)
        for step in range(start, rl.steps):
            chosen = [prompts[order[(step * rl.prompts_per_step + i) % len(prompts)]]
                      for i in range(rl.prompts_per_step)]
            t0 = time.perf_counter()
            seed = None if cfg.rollout.seed is None else cfg.rollout.seed + step
            rollouts = pool.generate(chosen, call=step, seed=seed)
            t1 = time.perf_counter()
            flat = [(r, c) for r in rollouts for c in r.completions]
            scores = rewards.score([r.prompt for r, _ in flat], [c.text for _, c in flat])
            t2 = time.perf_counter()
            valid, nonfinite = finite_rows(scores)
            advantages, ppo_rewards = _advantages(torch.tensor(scores[REWARD_KEY]), valid, len(rollouts), rl)
            keep = valid.nonzero().flatten().tolist()
            if len(keep) < len(flat):
                logger.warning("rl step %d: %d of %d samples left out, scored non-finite (%s)", step + 1,
                               len(flat) - len(keep), len(flat), {k: n for k, n in nonfinite.items() if n})
            if keep:
                batch = PolicyBatch(
                    prompt_ids=[flat[i][0].prompt_token_ids for i in keep],
                    response_ids=[flat[i][1].token_ids for i in keep],
                    advantages=[advantages[i] for i in keep] if advantages else [],
                    engine_logprobs=[flat[i][1].logprobs for i in keep],
                    temperature=cfg.rollout.temperature, max_new_tokens=cfg.rollout.max_new_tokens,
                    rewards=[ppo_rewards[i] for i in keep] if ppo_rewards else None,
                    measure_kl=(step + 1) % rl.monitor.kl_every == 0 or step + 1 == rl.steps,
                )
                stats = learner.step(batch, during=f"rl step {step + 1}")
            else:
                stats = {"skipped": 1.0, "skip_reason": "no sample with finite scores"}
            t3 = time.perf_counter()
            if stats["skipped"]:
                logger.warning("rl step %d skipped (%s): the policy stays that of step %d",
                               step + 1, stats["skip_reason"], step)
            synced = None if stats["skipped"] else _sync(learner, pool, dtype, step + 1, cfg)
            lengths = [len(c.token_ids) for _, c in flat]
            kept = {key: [values[i] for i in keep] for key, values in scores.items()}
            row = {
                **_means(kept), "reward_std": statistics.stdev(kept[REWARD_KEY]) if len(keep) > 1 else math.nan,
                "response_tokens_mean": sum(lengths) / len(lengths),
                "finished_fraction": sum(c.finish_reason == "stop" for _, c in flat) / len(flat),
                "policy_version": min(r.policy_version for r in rollouts), **stats,
                "dropped_rows": len(flat) - len(keep), **{f"nonfinite/{k}": n for k, n in nonfinite.items()},
                "time/generate_s": t1 - t0, "time/score_s": t2 - t1, "time/learn_s": t3 - t2,
                "time/sync_s": synced.seconds if synced else 0.0,
            }
            if held_out and ((rl.eval_every and (step + 1) % rl.eval_every == 0) or step + 1 == rl.steps):
                evaluated = _evaluate(pool, rewards, held_out, cfg)
                row.update(evaluated)
            fired = _watch(monitor, history, step + 1, row, [(r.prompt, c.text) for r, c in flat], cfg)
            row["alarms"] = ",".join(a.rule for a in fired)
            log.write(step + 1, row)
            if fired:
                with open(out / "alarms.jsonl", "a") as fh:
                    fh.writelines(json.dumps(dataclasses.asdict(a)) + "\n" for a in fired)
            if report is not None:
                report({"step": step + 1, **{k: v for k, v in evaluated.items() if k.startswith("eval/")}, **row})
            samples.writelines(json.dumps({"step": step + 1, "prompt": r.prompt, "response": r.completions[0].text})
                               + "\n" for r in rollouts)
            samples.flush()
            logger.info("rl step %d: reward %.4f, %.1f tokens, %s", step + 1, row.get(f"{REWARD_KEY}_mean", math.nan),
                        row["response_tokens_mean"], {k: round(v, 4) for k, v in row.items() if k.startswith("gold_")})
            stop = bool(fired) and rl.monitor.stop
            if (step + 1) % rl.checkpoint_every == 0 or step + 1 == rl.steps or stop:
                _checkpoint(learner, ckpt_root, step + 1, rl.keep_checkpoints)
            if stop:
                stopped = {"step": step + 1, "alarms": [dataclasses.asdict(a) for a in fired]}
                logger.error("rl step %d: stopping on the monitor's alarm (rl.monitor.stop): %s", step + 1,
                             "; ".join(a.message for a in fired))
                break
        policy_dir = learner.save_policy(out / "policy", during="exporting the policy")
    rl_monitor(pd.read_csv(out / "rl.csv"), out / "monitor.png")
    summary = {**_paths(out), "policy": policy_dir, "steps": rl.steps if stopped is None else stopped["step"],
               "resumed_from_step": start if resumed is not None else None, "stopped_by_alarm": stopped, "last": row}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _advantages(reward: torch.Tensor, valid: torch.Tensor, prompts: int, rl: RLConfig) -> tuple[list[float], list[float]]:
    """Per-sample advantages from the scores (Dr.GRPO's or RLOO's baseline over each prompt's samples), or, for
    PPO (`gae`), no advantages and the rewards its critic turns into them (with `rl.whiten_rewards`, centred
    and divided by the valid rewards' std: a causal RM's small scale then does not shrink them against the KL,
    and an RM's offset does not become returns the critic must first learn)."""
    if rl.advantage == "gae":
        if rl.whiten_rewards and int(valid.sum()) > 1:
            reward = (reward - reward[valid].mean()) / (reward[valid].std() + 1e-8)
        return [], torch.where(valid, reward, 0.0).tolist()
    estimate = rloo_advantages if rl.advantage == "rloo" else group_advantages
    grouped = reward.view(prompts, -1)
    return estimate(grouped, rl.whiten_advantages, valid.view_as(grouped)).flatten().tolist(), []


def _evaluate(pool: RolloutPool, rewards: RewardPool, prompts: list[str], cfg: Config) -> dict[str, float]:
    """The policy the engines serve, sampled on the held-out prompts (`rl.eval_samples` each, the same seed every
    time, so two evaluations differ by the policy only) and scored: `eval/` means of every score over its finite
    values, response length and EOS share."""
    t0 = time.perf_counter()
    rollouts = pool.generate(prompts, call=0, n=cfg.rl.eval_samples, seed=(cfg.rollout.seed or 0) + 7919)
    flat = [(r.prompt, c) for r in rollouts for c in r.completions]
    scores = rewards.score([p for p, _ in flat], [c.text for _, c in flat])
    out = {}
    for key, values in scores.items():
        finite = [v for v in values if math.isfinite(v)]
        out[f"eval/{key}_mean"] = sum(finite) / len(finite) if finite else math.nan
    out["eval/response_tokens_mean"] = sum(len(c.token_ids) for _, c in flat) / len(flat)
    out["eval/finished_fraction"] = sum(c.finish_reason == "stop" for _, c in flat) / len(flat)
    out["time/eval_s"] = time.perf_counter() - t0
    return out


def _last_evaluation(log: Path) -> dict[str, float]:
    """The latest value of every `eval/` column of a run's `rl.csv` (a resumed run reports them until its next
    evaluation)."""
    if not log.is_file():
        return {}
    frame = pd.read_csv(log)
    return {c: float(frame[c].dropna().iloc[-1]) for c in frame.columns
            if c.startswith("eval/") and frame[c].notna().any()}


def _watch(monitor: TrainingZ | None, history: list[dict[str, float]], step: int, row: dict[str, Any],
           samples: list[tuple[str, str]], cfg: Config) -> list[Alarm]:
    """Add the rollouts' spurious variables to `row` (when the reward model carries its data manifest) and
    return the monitor's alarms on the run so far; each is logged as a warning."""
    if monitor is not None:
        row.update(monitor.measure([p for p, _ in samples], [t for _, t in samples]))
    history.append({"step": step, **{k: v for k, v in row.items() if isinstance(v, int | float)}})
    fired = alarms(history, cfg.rl.monitor, f"{REWARD_KEY}_mean", [f"{gold_key(g.name)}_mean" for g in cfg.reward.gold])
    for alarm in fired:
        logger.warning("rl step %d: alarm %s: %s", step, alarm.rule, alarm.message)
    return fired


def _paths(out: Path) -> dict[str, str]:
    """Where a run's outputs are (recomputed on every call: a finished run's folder may have been moved)."""
    return {"output_dir": str(out), "policy": str(out / "policy"), "metrics": str(out / "rl.csv"),
            "monitor_plot": str(out / "monitor.png")}


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


def _checkpoint(learner: LearnerGroup, root: Path, step: int, keep: int) -> None:
    """Every learner rank's part, then the driver's step, in a folder that counts only once it is complete."""
    def write(folder: Path) -> None:
        learner.save(folder, during=f"checkpointing step {step}")
        (folder / "driver.json").write_text(json.dumps({"step": step}))

    write_checkpoint(root, f"step_{step:06d}", write, keep=keep)
