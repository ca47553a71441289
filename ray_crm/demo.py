"""The main job: a bias benchmark built from real text, a vanilla and a causal reward model trained on it on
one Ray cluster, and the evaluation of both on counterfactual twins.

bench -> prepare -> train-rm (Bradley-Terry) -> train-rm (the config's causal RM) -> eval -> train-rl against
each RM (GRPO of the `rl.policy`, prompted with the benchmark's test prompts, gold scorers from `reward.gold`), so
what each RM teaches a policy shows beside how it scores. The config names the benchmark (`bench.names`, one) and
the causal loss (`loss.type=crm`, variant, lambda); `rl.steps=0` skips the RL part.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import ray

from ray_crm.assets import fetch_all
from ray_crm.config import Config, ConfigError, dump_config, validate
from ray_crm.console import StageConsole
from ray_crm.eval.benchmarks import benchmark_dir
from ray_crm.runtime import init_ray
from ray_crm.stages import run_stage


def _with(cfg: Config, **sections: dict[str, Any]) -> Config:
    data = cfg.model_dump(mode="json")
    for section, values in sections.items():
        data[section] = {**data[section], **values}
    return validate(data, "demo")


def _stage(console: StageConsole, results: dict[str, Any], key: str, stage: str, cfg: Config) -> dict[str, Any]:
    results[key] = console.stage(key, lambda: run_stage(stage, cfg))
    return results[key]


def run_demo(cfg: Config, verbose: bool = False) -> dict[str, Any]:
    """The main job. The console shows one line per stage and the closing tables; every stage's own output goes
    to `demo.log` in the demo's stage folder (`outputs/demo/demo/` for configs/demo.yaml), or with `verbose` to
    the console instead."""
    if cfg.loss.type != "crm" or len(cfg.bench.names) != 1:
        raise ConfigError("the demo compares a vanilla RM with the config's causal RM on one benchmark: "
                          "set loss.type=crm and a single bench.names entry")
    out = cfg.stage_dir("demo")
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(dump_config(cfg))
    console = StageConsole(out / "demo.log", total=6 + (2 if cfg.rl.steps else 0), verbose=verbose)
    console.say(f"ray-crm demo: {cfg.bench.names[0]} benchmark, vanilla vs causal RM"
                + (", then GRPO against each" if cfg.rl.steps else "") + f"; stage output in {console.log}")
    results: dict[str, Any] = {}
    owns_cluster = not ray.is_initialized()
    console.stage("assets and cluster", lambda: (fetch_all(), init_ray(cfg.ray)))
    _stage(console, results, "bench", "bench", cfg)
    _stage(console, results, "prepare", "prepare", cfg)
    models = {}
    for label, variant in (("vanilla", _with(cfg, loss={"type": "bt", "lambda_mmd": 0.0})), ("crm", cfg)):
        models[label] = _stage(console, results, f"train-rm/{label}", "train-rm", variant)["model"]
    _stage(console, results, "eval", "eval", _with(cfg, eval={"models": [f"{k}={v}" for k, v in models.items()]}))
    if cfg.rl.steps:
        prompts = cfg.rl.prompts or [str(benchmark_dir(cfg.bench.names[0], cfg.bench) / "test.parquet")]
        for label, model in models.items():
            rl_cfg = _with(cfg, reward={"model": model, "template": cfg.data.template, "max_length": cfg.model.max_length},
                           rl={"prompts": prompts, "output_dir": str(cfg.stage_dir("train-rl") / label)})
            _stage(console, results, f"train-rl/{label}", "train-rl", rl_cfg)
    results["seconds"] = console.seconds
    if owns_cluster:  # Ray's log deduplicator prints its last "[repeated Nx]" lines at shutdown: into the log
        console.quietly(ray.shutdown)
    (out / "summary.json").write_text(json.dumps(results, indent=2, default=str))
    console.say()
    console.say(test_table(Path(results["eval"]["report"]), cfg.bench.names[0]))
    for label in models if cfg.rl.steps else ():
        console.say(f"GRPO on {label:8s} {rl_drift(Path(results[f'train-rl/{label}']['metrics']))}")
    console.say(f"\nreport and plots: {results['eval']['markdown']}\nmodels: "
                + ", ".join(f"{k} {v}" for k, v in models.items()) + f"\nsummary: {out / 'summary.json'}"
                + f"\nstage seconds: {json.dumps(console.seconds)}")
    console.close()
    return {"summary": str(out / "summary.json"), "report": results["eval"]["markdown"], "log": str(console.log)}


def test_table(report: Path, bench: str) -> str:
    """Each model's test accuracy and bias, the headline in reward-std units and its raw figure beside it."""
    import pandas as pd

    from ray_crm.eval.summaries import HEADLINES

    headline = HEADLINES[bench][0]
    keys = ["accuracy", headline, headline.removesuffix("_std"), "ci_gap_std", "reward_scale"]
    results = json.loads(report.read_text())["results"]
    rows = {m: {k: r[bench].get(k) for k in dict.fromkeys(keys)} for m, r in results.items()}
    return f"test split, {bench} ({HEADLINES[bench][1]}):\n" + pd.DataFrame(rows).T.to_markdown(floatfmt=".3g")


def rl_drift(metrics_csv: Path, k: int = 3) -> str:
    """Mean of the first and of the last `k` steps of the RL log's reward, gold and length columns."""
    import pandas as pd

    log = pd.read_csv(metrics_csv)
    cols = [c for c in log.columns if c in ("reward_mean", "response_tokens_mean", "finished_fraction")
            or (c.startswith("gold_") and c.endswith("_mean"))]
    return "  ".join(f"{c.removesuffix('_mean')} {log[c].head(k).mean():.3f} -> {log[c].tail(k).mean():.3f}" for c in cols)
