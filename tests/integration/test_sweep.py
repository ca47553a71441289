"""Ray Tune sweeps over the real reward-model trainer (tiny BERT, 2 CPUs)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from ray_crm.config import ConfigError, load_config
from ray_crm.tune.sweep import check_space, run_sweep
from tests.integration.test_train_rm import prepared  # noqa: F401  (module fixture: tiny prepared pairs)

# the number of length bins is a data key: each value is prepared once, before the trials; lambda is a one-value
# grid so the table still carries two keys while the sweep stays at two trials
SPACE = "sweep.space={loss.lambda_mmd: {grid: [1.0]}, data.spurious.0.bins: {grid: [2, 3]}}"


def _cfg(prepared, *extra):  # noqa: F811
    return load_config(None, [*prepared, "name=sweep", "loss.type=crm", "train.num_workers=1",
                              "train.cpus_per_worker=0.5", "train.zero_stage=0", "train.batch_size=16",
                              "train.max_steps=4", "train.lr=0.005", SPACE, *extra])


def test_a_bad_search_space_fails_before_any_trial(prepared):  # noqa: F811
    with pytest.raises(ConfigError, match=r"loss.lamda_mmd.*did you mean 'loss.lambda_mmd'"):
        check_space(_cfg(prepared, "sweep.space={loss.lamda_mmd: {grid: [1.0]}}"))
    with pytest.raises(ConfigError, match=r"loss.variant"):
        check_space(_cfg(prepared, "sweep.space={loss.variant: {choice: [sideways]}}"))


def test_two_trials_give_a_table_a_front_and_a_chosen_config_and_resume_reruns_nothing(prepared):  # noqa: F811
    cfg = _cfg(prepared)
    summary = run_sweep(cfg)
    table = pd.read_csv(summary["results"].replace(".md", ".csv"))
    assert len(table) == 2 and (table["status"] == "DONE").all()
    assert sorted(zip(table["loss.lambda_mmd"], table["data.spurious.0.bins"])) == [(1.0, 2), (1.0, 3)]
    folders = set()
    for _, trial in table.iterrows():  # each trial trained on the data prepared with its own bins
        card = json.loads((Path(trial["model"]).parent / "model_card.json").read_text())
        folders.add(folder := Path(card["config"]["data"]["output_dir"]))
        assert json.loads((folder / "manifest.json").read_text())["num_bins"] == trial["data.spurious.0.bins"]
    assert len(folders) == 2
    assert table["pareto"].any() and table["chosen"].sum() == 1
    best = load_config(summary["best_config"])
    chosen = table[table["chosen"]].iloc[0]
    assert best.loss.lambda_mmd == chosen["loss.lambda_mmd"] and best.data.spurious[0].bins == chosen["data.spurious.0.bins"]
    front = cfg.stage_dir("sweep") / "pareto.png"
    assert front.stat().st_size > 10_000

    logs = sorted(Path(cfg.output_dir).glob(f"{cfg.name}-*/train-rm/*/logs/train.csv"))
    assert len(logs) == 2
    before = {p: p.read_text() for p in logs}
    with pytest.raises(ConfigError, match="sweep.resume=true"):
        run_sweep(cfg)
    again = run_sweep(_cfg(prepared, "sweep.resume=true"))
    assert again["trials"] == 2 and json.loads(json.dumps(again["chosen"], default=str))
    assert {p: p.read_text() for p in logs} == before  # finished trials were not trained again
    with pytest.raises(ConfigError, match=r"was started over sweep.space=.*choose another name"):
        run_sweep(_cfg(prepared, "sweep.resume=true", "sweep.space={loss.lambda_mmd: {grid: [2.0]}}"))


def test_a_sweep_interrupted_mid_trial_resumes_without_rerunning_finished_trials(prepared, tmp_path):  # noqa: F811
    """Ctrl-C during the second trial (the `ray-crm sweep` process, its own local Ray cluster), then
    `--resume`: the finished trial is not trained again and the sweep completes."""
    space = "sweep.space={loss.lambda_mmd: {grid: [0.0, 1.0]}}"
    args = [*prepared, "name=interrupted", "loss.type=crm", "train.num_workers=1", "train.cpus_per_worker=0.5",
            "train.zero_stage=0", "train.batch_size=16", "train.max_steps=8", "train.eval_every=4",
            "train.lr=0.005", space]
    out = Path(load_config(None, args).output_dir)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    log = tmp_path / "sweep.log"
    with log.open("w") as sink:
        child = subprocess.Popen([sys.executable, "-m", "ray_crm.cli", "sweep", *args, "ray.num_cpus=2"], env=env,
                                 stdout=sink, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline and child.poll() is None:
            done = list(out.glob("interrupted-*/train-rm/*/export/val_scores.npz"))
            running = [p for p in out.glob("interrupted-*/train-rm/*/logs/train.csv")
                       if not (p.parent.parent / "export").exists() and len(p.read_text().splitlines()) > 2]
            if done and running:
                break
            time.sleep(0.5)
        assert child.poll() is None, log.read_text()[-3000:]
        assert done and running, "the first trial did not finish in time"
        os.killpg(child.pid, signal.SIGINT)
        child.wait(timeout=180)
    finally:
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
    finished = done[0].parent
    before = {p: p.stat().st_mtime_ns for p in [*finished.iterdir(), finished.parent / "logs" / "train.csv"]}

    with pytest.raises(ConfigError, match="sweep.resume=true"):
        run_sweep(load_config(None, args))
    summary = run_sweep(load_config(None, [*args, "sweep.resume=true"]))
    table = pd.read_csv(summary["results"].replace(".md", ".csv"))
    assert len(table) == 2 and (table["status"] == "DONE").all() and sorted(table["loss.lambda_mmd"]) == [0.0, 1.0]
    assert len(list(out.glob("interrupted-*/train-rm/*/export/val_scores.npz"))) == 2
    assert {p: p.stat().st_mtime_ns for p in before} == before  # the finished trial was neither trained nor exported again
