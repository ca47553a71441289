"""Ray Tune sweeps over the real reward-model trainer (tiny BERT, 2 CPUs)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from ray_crm.config import ConfigError, load_config
from ray_crm.tune.sweep import check_space, run_sweep
from tests.integration.test_train_rm import prepared  # noqa: F401  (module fixture: tiny prepared pairs)

SPACE = "sweep.space={loss.lambda_mmd: {grid: [0.0, 1.0]}, loss.variant: {grid: [unconditional, conditional]}}"


def _cfg(prepared, *extra):  # noqa: F811
    return load_config(None, [*prepared, "name=sweep", "loss.type=crm", "train.num_workers=1",
                              "train.cpus_per_worker=0.5", "train.zero_stage=0", "train.batch_size=16",
                              "train.max_steps=4", "train.lr=0.005", SPACE, *extra])


def test_a_bad_search_space_fails_before_any_trial(prepared):  # noqa: F811
    with pytest.raises(ConfigError, match=r"loss.lamda_mmd.*did you mean 'loss.lambda_mmd'"):
        check_space(_cfg(prepared, "sweep.space={loss.lamda_mmd: {grid: [1.0]}}"))
    with pytest.raises(ConfigError, match=r"loss.variant"):
        check_space(_cfg(prepared, "sweep.space={loss.variant: {choice: [sideways]}}"))


def test_four_trials_give_a_table_a_front_and_a_chosen_config_and_resume_reruns_nothing(prepared):  # noqa: F811
    cfg = _cfg(prepared)
    summary = run_sweep(cfg)
    table = pd.read_csv(summary["results"].replace(".md", ".csv"))
    assert len(table) == 4 and (table["status"] == "DONE").all()
    assert sorted(zip(table["loss.lambda_mmd"], table["loss.variant"])) == [
        (0.0, "conditional"), (0.0, "unconditional"), (1.0, "conditional"), (1.0, "unconditional")]
    assert table["pareto"].any() and table["chosen"].sum() == 1
    best = load_config(summary["best_config"])
    chosen = table[table["chosen"]].iloc[0]
    assert best.loss.lambda_mmd == chosen["loss.lambda_mmd"] and best.loss.variant == chosen["loss.variant"]
    front = cfg.stage_dir("sweep") / "pareto.png"
    assert front.stat().st_size > 10_000

    logs = sorted(Path(cfg.output_dir).glob(f"{cfg.name}-*/train-rm/*/logs/train.csv"))
    assert len(logs) == 4
    before = {p: p.read_text() for p in logs}
    with pytest.raises(ConfigError, match="sweep.resume=true"):
        run_sweep(cfg)
    again = run_sweep(_cfg(prepared, "sweep.resume=true"))
    assert again["trials"] == 4 and json.loads(json.dumps(again["chosen"], default=str))
    assert {p: p.read_text() for p in logs} == before  # finished trials were not trained again
