"""Ray Tune sweeps of regularisation strength (lambda, bins, variant, kernel...) over a stage's entry function.

Each trial is a function trainable that runs the project's own training entry (`run_train_rm`, or
`run_train_rl` for `sweep.stage=train-rl`: GR gamma, KL beta...) with the trial's values set on the base config,
reporting to Tune through `TuneReportCallback` (Ray 2.60's supported pattern; a TorchTrainer can no longer be
passed to `Tuner`), or for RL every step's metrics through `tune.report`. Ray Data datasets are built in the driver and
handed to the trials with `tune.with_parameters`. The search space lives in the same typed config
(`sweep.space`: dotted key -> grid / choice / uniform / loguniform) and every value is validated against the
schema before any trial starts. Swept `data.*` keys (e.g. the number of bins, `data.spurious.0.bins`) change
the prepared data itself: the driver prepares each distinct data variant once, before the trials. Output: a results table (CSV + Markdown), the accuracy-vs-bias Pareto front
(PNG), and the chosen configuration as ready-to-run YAML.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np

from ray_crm.config import (
    Config,
    ConfigError,
    SearchSpace,
    dump_config,
    set_dotted,
    validate,
    validation_metric_names,
)
from ray_crm.tune.pareto import pareto_front, pick

# Result columns that are not worth a column of the table.
_HIDDEN = ("checkpoint_path", "epoch_end", "micro_step", "resumed_from_step")


def _probe_values(spec: SearchSpace) -> list[Any]:
    """The values that decide whether a space entry is valid: all listed ones, or the bounds of a range."""
    return spec.grid or spec.choice or spec.uniform or spec.loguniform or []


def check_space(cfg: Config) -> None:
    """Fail before any trial starts if a swept key or value does not fit the schema, naming the key."""
    if not cfg.sweep.space:
        raise ConfigError("sweep.space is empty: give at least one dotted key with grid/choice/uniform/loguniform")
    reported = _reported_metrics(cfg)
    for field in ("metric", "bias_metric"):
        if getattr(cfg.sweep, field) not in reported:
            raise ConfigError(f"sweep.{field}={getattr(cfg.sweep, field)!r} is not a metric the trainer reports: "
                              f"one of {sorted(reported)}")
    base = cfg.model_dump(mode="json")
    for key, spec in cfg.sweep.space.items():
        if key.startswith("sweep."):
            raise ConfigError(f"sweep.space.{key}: the sweep section itself cannot be swept")
        if key.startswith("data.") and cfg.sweep.stage == "train-rl":
            raise ConfigError(f"sweep.space.{key}: train-rl reads no prepared data; sweep rl.*, reward.* or rollout.*")
        if key.startswith("data.") and not (spec.grid or spec.choice):
            raise ConfigError(f"sweep.space.{key}: a data key changes the prepared data, which is made once per "
                              "value before the trials: give grid or choice values, not a range")
        for value in _probe_values(spec):
            try:
                validate(set_dotted(copy.deepcopy(base), key.split("."), value), f"sweep.space.{key}={value!r}")
            except ConfigError as exc:
                raise ConfigError(str(exc)) from None


def _reported_metrics(cfg: Config) -> set[str]:
    if cfg.sweep.stage == "train-rl":
        from ray_crm.rl.grpo_trainer import reported_metric_names

        return reported_metric_names(cfg)
    return validation_metric_names(cfg)


def _trial_resources(cfg: Config):
    """train-rm / train-dpo: the trial only drives (its TorchTrainer reserves the workers); train-rl: the trial's actors are
    created inside its placement group, so it reserves a bundle for each."""
    if cfg.sweep.stage != "train-rl":
        return {"CPU": 0.01}
    from ray import tune

    from ray_crm.rl.grpo_trainer import trial_bundles

    return tune.PlacementGroupFactory(trial_bundles(cfg))


def check_trial_fits(cfg: Config, cluster_cpus: float) -> None:
    """Refuse a train-rl trial larger than a cluster that cannot grow (a local one): Tune would keep it pending
    forever with a warning."""
    if cfg.sweep.stage != "train-rl":
        return
    from ray_crm.rl.grpo_trainer import reserved_cpus

    need = reserved_cpus(cfg)
    if need > cluster_cpus:
        raise ConfigError(
            f"a train-rl trial reserves {need:g} CPUs (rollout.engines x rollout.cpus_per_engine, each reward and gold "
            f"scorer's reward.cpus_per_actor, rl.num_workers x rl.learner_cpus, 0.01 for the trial) and this local "
            f"cluster has {cluster_cpus:g}: lower one of those or raise ray.num_cpus")


def param_space(cfg: Config) -> dict[str, Any]:
    from ray import tune

    build = {
        "grid": tune.grid_search,
        "choice": tune.choice,
        "uniform": lambda b: tune.uniform(*b),
        "loguniform": lambda b: tune.loguniform(*b),
    }
    space = {}
    for key, spec in cfg.sweep.space.items():
        kind = next(k for k in build if getattr(spec, k) is not None)
        space[key] = build[kind](getattr(spec, kind))
    return space


def _data_keys(cfg: Config) -> list[str]:
    return sorted(k for k in cfg.sweep.space if k.startswith("data."))


def variant_key(params: dict[str, Any], keys: list[str]) -> str:
    """The data variant a trial trains on: its values of the swept data keys."""
    return json.dumps({k: _plain(params[k]) for k in keys}, sort_keys=True)


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def prepare_variants(cfg: Config, base: dict[str, Any], root: Path) -> dict[str, tuple[str, dict[str, Any]]]:
    """variant key -> (prepared folder, materialized train/validation datasets), each variant prepared once
    (and for DPO with `loss.reference=precomputed`, its reference log-probs computed once).

    Without swept data keys the one variant is the config's own prepared data (made by `ray-crm prepare`).
    """
    from ray_crm.data.pipeline import load_manifest, read_prepared, run_prepare
    from ray_crm.train.reference_logps import reference_logps

    keys = _data_keys(cfg)
    combos = itertools.product(*(_probe_values(cfg.sweep.space[k]) for k in keys))
    variants = {}
    for values in combos:
        params = dict(zip(keys, values))
        folder = Path(base["data"]["output_dir"])
        if keys:
            folder = root / hashlib.sha1(variant_key(params, keys).encode()).hexdigest()[:10]
            if not (folder / "manifest.json").is_file():
                run_prepare(trial_config(base, {**params, "data.output_dir": str(folder)}, "prepare"))
        datasets = {split: read_prepared(folder, split).materialize() for split in ("train", "validation")}
        first = trial_config(base, {**params, "data.output_dir": str(folder)}, "reference")
        if cfg.sweep.stage == "train-dpo" and first.loss.reference == "precomputed":  # once, not in every trial
            reference_logps(first, folder, load_manifest(folder), datasets)
        variants[variant_key(params, keys)] = (str(folder), datasets)
    return variants


def trial_config(base: dict[str, Any], params: dict[str, Any], trial: str) -> Config:
    data = copy.deepcopy(base)
    for key, value in params.items():
        set_dotted(data, key.split("."), _plain(value))
    data["name"] = f"{data.get('name', 'run')}-{trial}"
    return validate(data, f"trial {trial}")


def _trainable(params: dict[str, Any], base: dict[str, Any], variants: dict[str, tuple[str, dict[str, Any]]],
               data_keys: list[str]):
    from ray import tune
    from ray.tune.integration.ray_train import TuneReportCallback

    if base["sweep"]["stage"] == "train-rl":
        from ray_crm.rl.grpo_trainer import run_train_rl

        run_train_rl(trial_config(base, params, tune.get_context().get_trial_id()), report=tune.report)
        return None  # every step was reported; a returned dict would be a last result without the metrics
    from ray_crm.train.rm_trainer import run_train_dpo, run_train_rm

    folder, datasets = variants[variant_key(params, data_keys)]
    cfg = trial_config(base, {**params, "data.output_dir": folder}, tune.get_context().get_trial_id())
    run = run_train_dpo if cfg.sweep.stage == "train-dpo" else run_train_rm
    return run(cfg, datasets=datasets, callbacks=[TuneReportCallback()])


def _tuner(cfg: Config, path: Path, trainable):
    from ray import tune
    from ray.tune.schedulers import ASHAScheduler

    s = cfg.sweep
    scheduler = ASHAScheduler(grace_period=s.grace_period, time_attr="training_iteration") if s.scheduler == "asha" else None
    search_alg = None
    if s.search == "optuna":
        from ray.tune.search.optuna import OptunaSearch

        search_alg = OptunaSearch()
    return tune.Tuner(
        trainable,
        param_space=param_space(cfg),
        tune_config=tune.TuneConfig(metric=s.metric, mode=s.mode, num_samples=s.num_samples, scheduler=scheduler,
                                    search_alg=search_alg, max_concurrent_trials=s.max_concurrent_trials),
        run_config=tune.RunConfig(name=path.name, storage_path=str(path.parent)),
    )


def results_table(grid, cfg: Config):
    """One row per trial: its swept values, final metrics and status."""
    import pandas as pd

    rows, errors = [], []
    extra = ("step",) if cfg.sweep.stage == "train-rl" else ("val_bt_loss", "step", "model")
    for result in grid:
        metrics = {k: v for k, v in (result.metrics or {}).items() if not isinstance(v, (dict, list))}
        row = {"trial": Path(result.path).name, "status": "ERROR" if result.error else "DONE"}
        if result.error:
            errors.append(f"{row['trial']}: {str(result.error).strip().splitlines()[-1]}")
        row.update({k: result.config.get(k) for k in cfg.sweep.space})
        for key in (cfg.sweep.metric, cfg.sweep.bias_metric, *extra):
            row[key] = metrics.get(key, np.nan)
        rows.append(row)
    table = pd.DataFrame(rows).drop(columns=[c for c in _HIDDEN if c in rows[0]], errors="ignore")
    # the front code wants accuracy maximised and bias minimised
    sign = lambda mode: 1.0 if mode == "max" else -1.0
    acc = sign(cfg.sweep.mode) * table[cfg.sweep.metric].astype(float).to_numpy()
    bias = -sign(cfg.sweep.bias_mode) * table[cfg.sweep.bias_metric].astype(float).to_numpy()
    if (np.isnan(acc) | np.isnan(bias)).all():
        raise RuntimeError(f"no trial of sweep '{cfg.name}' reported {cfg.sweep.metric} and {cfg.sweep.bias_metric}"
                           + (f"; {len(errors)} failed: " + "; ".join(errors) if errors else ""))
    table["pareto"] = pareto_front(acc, bias)
    chosen = pick(acc, bias, cfg.sweep.max_accuracy_drop)
    table["chosen"] = np.arange(len(table)) == chosen
    return table, chosen


def plot_front(table, cfg: Config, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = cfg.sweep
    fig, ax = plt.subplots(figsize=(6, 4.5))
    ax.scatter(table[s.bias_metric], table[s.metric], c="lightgray", edgecolors="gray", label="trials")
    front = table[table["pareto"]].sort_values(s.bias_metric)
    ax.plot(front[s.bias_metric], front[s.metric], "o-", color="tab:blue", label="Pareto front")
    chosen = table[table["chosen"]]
    ax.scatter(chosen[s.bias_metric], chosen[s.metric], marker="*", s=250, color="tab:red", label="chosen", zorder=3)
    for _, row in table.iterrows():
        label = ", ".join(f"{k.split('.')[-1]}={row[k]:g}" if isinstance(row[k], float) else f"{k.split('.')[-1]}={row[k]}"
                          for k in s.space)
        ax.annotate(label, (row[s.bias_metric], row[s.metric]), fontsize=7, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel(f"{s.bias_metric} ({'lower' if s.bias_mode == 'min' else 'higher'} is better)")
    ax.set_ylabel(f"{s.metric} ({'higher' if s.mode == 'max' else 'lower'} is better)")
    ax.set_title(f"{cfg.name}: accuracy vs bias")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def check_same_space(record: Path, cfg: Config, restore: bool) -> None:
    """A resumed sweep must ask for the space it was started with: Tune restores the stored grid and would
    silently ignore a changed one. The space is recorded (JSON) when a sweep starts; a sweep recorded before
    this check existed resumes unchecked."""
    space = {key: spec.model_dump(mode="json", exclude_none=True) for key, spec in cfg.sweep.space.items()}
    if not restore:
        record.parent.mkdir(parents=True, exist_ok=True)
        record.write_text(json.dumps(space, sort_keys=True))
    elif record.is_file() and (stored := json.loads(record.read_text())) != space:
        raise ConfigError(f"sweep '{cfg.name}' was started over sweep.space={stored} ({record}); this config asks "
                          f"for {space}: Tune cannot change a sweep's space on resume, so choose another name")


def run_sweep(cfg: Config) -> dict[str, Any]:
    """Run (or with `sweep.resume=true`, continue) the sweep; write the table, the front and the chosen YAML."""
    from ray import tune

    from ray_crm.runtime import init_ray, starts_local_cluster

    check_space(cfg)
    local = starts_local_cluster(cfg.ray)
    init_ray(cfg.ray)
    if local:
        import ray

        check_trial_fits(cfg, ray.cluster_resources().get("CPU", 0.0))
    out = cfg.stage_dir("sweep")
    path = out / "tune" / cfg.name
    restore = path.exists() and tune.Tuner.can_restore(str(path))
    if restore and not cfg.sweep.resume:
        raise ConfigError(f"{path} holds an earlier sweep named '{cfg.name}': pass sweep.resume=true "
                          "(ray-crm sweep --resume) to continue it, or choose another name")
    check_same_space(out / "tune" / f"{cfg.name}.space.json", cfg, restore)
    base = cfg.model_dump(mode="json")
    # trials get their own names and working directories: pin every path to what the driver resolved
    base["output_dir"] = str(Path(cfg.output_dir).resolve())
    base["data"]["output_dir"] = str(cfg.prepared_dir())
    if cfg.data.twins:
        base["data"]["twins"] = str(Path(cfg.data.twins).resolve())
    variants = prepare_variants(cfg, base, out / "data") if cfg.sweep.stage != "train-rl" else {}
    trainable = tune.with_resources(
        tune.with_parameters(_trainable, base=base, variants=variants, data_keys=_data_keys(cfg)),
        _trial_resources(cfg),
    )
    if restore:
        tuner = tune.Tuner.restore(str(path), trainable=trainable, resume_errored=True, param_space=param_space(cfg))
    else:
        tuner = _tuner(cfg, path, trainable)
    grid = tuner.fit()
    table, chosen = results_table(grid, cfg)
    out.mkdir(parents=True, exist_ok=True)
    table.to_csv(out / "results.csv", index=False)
    (out / "results.md").write_text(table.to_markdown(index=False, floatfmt=".4f"))
    plot_front(table, cfg, out / "pareto.png")
    best = trial_config(base, {k: table.iloc[chosen][k] for k in cfg.sweep.space}, "best")
    best = best.model_copy(update={"name": f"{cfg.name}-best"})
    (out / "best.yaml").write_text(dump_config(best))
    summary = {"trials": len(table), "errors": int((table["status"] == "ERROR").sum()),
               "chosen": {k: table.iloc[chosen][k] for k in (*cfg.sweep.space, cfg.sweep.metric, cfg.sweep.bias_metric)},
               "results": str(out / "results.md"), "front": str(out / "pareto.png"), "best_config": str(out / "best.yaml")}
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str))
    return summary
