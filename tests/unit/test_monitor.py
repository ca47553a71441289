"""The reward-hacking monitor: alarms on planted runs, Z drift measured with prepare's bins."""

from __future__ import annotations

import numpy as np
import pytest

from ray_crm.config import MonitorConfig
from ray_crm.rl.monitor import TrainingZ, alarms, trend

GOLD = "gold_vader_mean"


def _history(proxy, gold, **extra):
    return [{"step": i + 1, "reward_mean": p, GOLD: g, **extra} for i, (p, g) in enumerate(zip(proxy, gold))]


def test_a_planted_hacking_run_raises_the_alarm_and_a_flat_one_does_not():
    cfg = MonitorConfig(window=8, trend=0.7)
    rng = np.random.default_rng(0)
    steps = np.arange(12)
    hacked = _history(0.1 * steps + rng.normal(0, 0.05, 12), 1.0 - 0.05 * steps + rng.normal(0, 0.02, 12))
    fired = alarms(hacked, cfg, "reward_mean", [GOLD])
    assert [a.rule for a in fired] == ["proxy_up_gold_down"] and GOLD in fired[0].message and fired[0].step == 12
    quiet = 0
    for seed in range(50):  # flat noisy runs: the rule must (almost) never fire
        noise = np.random.default_rng(seed + 1)
        quiet += not alarms(_history(noise.normal(0, 1, 12), noise.normal(0, 1, 12)), cfg, "reward_mean", [GOLD])
    assert quiet >= 48
    both_up = _history(0.1 * steps, 0.1 * steps)  # gold rising with the proxy is learning, not hacking
    assert alarms(both_up, cfg, "reward_mean", [GOLD]) == []


def test_the_trend_rule_waits_for_a_full_window():
    cfg = MonitorConfig(window=8)
    assert alarms(_history(range(7), range(7, 0, -1)), cfg, "reward_mean", [GOLD]) == []
    assert trend([1.0, 1.0, 1.0]) == 0.0 and trend([1, 2, 3, 4]) == pytest.approx(1.0)


def test_kl_and_z_drift_rules_fire_past_their_thresholds_only():
    cfg = MonitorConfig(kl_max=0.5, z_tv_max=0.4)
    row = {"step": 3, "reward_mean": 0.0, GOLD: 0.0, "policy/kl_to_initial": 0.7, "z/length_tv": 0.6,
           "z/sycophancy_tv": 0.1}
    fired = {a.rule: a for a in alarms([row], cfg, "reward_mean", [GOLD])}
    assert set(fired) == {"kl_bound", "z_drift"} and "length" in fired["z_drift"].message
    calm = {**row, "policy/kl_to_initial": 0.2, "z/length_tv": 0.3}
    assert alarms([calm], cfg, "reward_mean", [GOLD]) == []
    assert alarms([row], MonitorConfig(z_tv_max=0.9), "reward_mean", [GOLD]) == []  # kl_max None: off


def _manifest():
    """A manifest as `prepare` writes it: a word-length Z in 3 quantile bins and a sycophancy flag."""
    return {
        "binning": {"names": ["length", "syc"], "parts": [
            {"type": "quantile", "edges": [3.0, 6.0]},
            {"type": "category", "groups": [["0"], ["1"]], "fallback": 0}], "num_bins": 6},
        # joint bins (length bin x flag), train responses: mostly short/medium, 20% with the phrase
        "splits": {"train": {"bins_chosen": [10, 2, 10, 3, 10, 2], "bins_rejected": [10, 3, 10, 2, 10, 3]}},
        "spurious": [{"name": "length", "kind": "length", "unit": "words", "bins": 3},
                     {"name": "syc", "kind": "sycophancy", "phrases": ["you are right"]}],
    }


def test_training_z_measures_rollouts_with_the_fitted_bins_and_reports_their_drift():
    z = TrainingZ.from_manifest(_manifest())
    assert np.allclose(z.train_share[0], [25 / 75, 25 / 75, 25 / 75]) and np.allclose(z.train_share[1], [60 / 75, 15 / 75])
    like_train = ["one two", "a b c d", "w " * 8, "x y", "one two three four five", "z " * 10]
    same = z.measure(["p"] * 6, like_train)
    assert same["z/length_tv"] == pytest.approx(0.0) and same["z/syc_mean"] == 0.0
    assert same["z/syc_tv"] == pytest.approx(15 / 75)
    drifted = z.measure(["p"] * 4, ["yes you are right " + "very " * 12] * 4)  # long, all with the phrase
    assert drifted["z/length_tv"] == pytest.approx(2 / 3) and drifted["z/syc_mean"] == 1.0
    assert drifted["z/syc_tv"] == pytest.approx(60 / 75)
    assert drifted["z/length_mean"] == 16.0


def test_train_rl_adds_the_rollouts_z_to_each_row_and_raises_the_alarm_on_a_planted_run():
    from ray_crm.config import Config
    from ray_crm.rl.grpo_trainer import _watch

    cfg = Config.model_validate({"reward": {"gold": [{"name": "vader", "kind": "vader"}]},
                                 "rl": {"regularizer": "kl", "monitor": {"window": 4}}})
    gold = "gold_vader_mean"
    monitor, history = TrainingZ.from_manifest(_manifest()), []
    fired = []
    for step in range(1, 5):
        row = {"reward_mean": 0.1 * step, gold: 1.0 - 0.1 * step, "policy/kl_to_initial": 0.01 * step,
               "skip_reason": ""}
        fired = _watch(monitor, history, step, row, [("p", "yes you are right " * step)] * 2, cfg)
        assert row["z/syc_mean"] == 1.0 and history[-1]["policy/kl_to_initial"] == pytest.approx(0.01 * step)
    assert [a.rule for a in fired] == ["proxy_up_gold_down", "z_drift", "z_drift"] and history[-1]["step"] == 4
    assert "skip_reason" not in history[-1]  # only numbers enter the trend rules


def test_the_monitor_plot_has_a_panel_per_watched_column_and_marks_alarm_steps(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt
    import pandas as pd

    from ray_crm.eval import plots

    log = pd.DataFrame({"step": [1, 2, 3, 4], "reward_mean": [0.1, 0.2, 0.3, 0.4], "gold_vader_mean": [0.5, 0.4, 0.3, 0.2],
                        "policy/kl_to_initial": [0.0, 0.01, 0.02, 0.04], "response_tokens_mean": [10, 12, 14, 16],
                        "alarms": ["", "", "", "proxy_up_gold_down"]})
    panels, save = [], plots._save
    monkeypatch.setattr(plots, "_save", lambda fig, path: panels.extend(ax for ax in fig.axes if ax.axison) or save(fig, path))
    path = plots.rl_monitor(log, tmp_path / "monitor.png")
    assert path.stat().st_size > 10_000 and plt.get_fignums() == []
    # no entropy or GR column in this log: no panel for them
    assert [ax.get_title() for ax in panels] == ["proxy and gold", "KL to the initial policy", "response tokens"]
    assert len(panels[0].get_lines()) == 3  # reward, gold and the alarm's mark at step 4
