"""PNG figures of an eval/audit report and an RL run's monitor.

matplotlib's object API, not pyplot: no display is needed, and no global figure state is shared between
threads that draw at once.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pandas as pd
from matplotlib.figure import Figure


def _grid(n: int, width: float = 4.0, height: float = 3.2):
    cols = min(n, 4)
    rows = -(-n // cols)
    fig = Figure(figsize=(width * cols, height * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    for ax in axes.flat[n:]:
        ax.axis("off")
    return fig, list(axes.flat[:n])


def _save(fig, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path


def bars(values: Mapping[str, Mapping[str, float]], ylabel: Mapping[str, str], path: Path) -> Path:
    """One panel per benchmark, one bar per model: values[bench][model]."""
    fig, axes = _grid(len(values))
    for ax, (bench, per_model) in zip(axes, values.items()):
        labels = list(per_model)
        ax.bar(range(len(labels)), [per_model[m] for m in labels], color="tab:red")
        ax.axhline(0.0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(bench)
        ax.set_ylabel(ylabel[bench], fontsize=8)
    return _save(fig, path)


def accuracy_vs_bias(points: Mapping[str, Mapping[str, tuple[float, float]]], xlabel: Mapping[str, str],
                     path: Path) -> Path:
    """One panel per benchmark: |bias| (x) against clean accuracy (y), one labelled point per model."""
    fig, axes = _grid(len(points))
    for ax, (bench, per_model) in zip(axes, points.items()):
        for model, (accuracy, bias) in per_model.items():
            ax.scatter(abs(bias), accuracy)
            ax.annotate(model, (abs(bias), accuracy), fontsize=7, xytext=(3, 3), textcoords="offset points")
        ax.set_title(bench)
        ax.set_xlabel(f"|{xlabel[bench]}|", fontsize=8)
        ax.set_ylabel("clean accuracy (%)", fontsize=8)
    return _save(fig, path)


def reward_vs_length(scored: Mapping[str, pd.DataFrame], per_rank: Mapping[str, list[float]], path: Path) -> Path:
    """Scatter of reward against length per model, and the mean length of each reward rank."""
    fig, axes = _grid(len(scored) + 1)
    for ax, (model, frame) in zip(axes, scored.items()):
        original = frame[frame.z == "original"]
        ax.scatter(original.words, original.reward, s=6, alpha=0.5)
        ax.set_title(model, fontsize=8)
        ax.set_xlabel("response length (words)", fontsize=8)
        ax.set_ylabel("reward", fontsize=8)
    ax = axes[-1]
    for model, curve in per_rank.items():
        ax.plot(np.arange(1, len(curve) + 1), curve, marker="o", label=model)
    ax.set_xlabel("reward rank within a group (1 = highest)", fontsize=8)
    ax.set_ylabel("mean length (words)", fontsize=8)
    ax.legend(fontsize=6)
    return _save(fig, path)


def rl_monitor(log: pd.DataFrame, path: Path) -> Path:
    """The reward-hacking monitor of a train-rl run against step: proxy reward and gold scores, KL to the initial
    policy, response length and EOS share, entropy, GR's gradient norms and the rollouts' spurious variables
    (whichever of these `rl.csv` has); steps where an alarm fired are marked in every panel."""
    panels = [("proxy and gold", [c for c in log.columns if c == "reward_mean" or c.startswith("gold_")]),
              ("KL to the initial policy", ["policy/kl_to_initial"]),
              ("response tokens", ["response_tokens_mean"]), ("EOS share", ["finished_fraction"]),
              ("entropy", ["policy/entropy"]), ("GR gradient norms", ["gr/g1_norm", "gr/g2_norm"]),
              ("spurious variables (mean)", [c for c in log.columns if c.startswith("z/") and c.endswith("_mean")])]
    panels = [(title, [c for c in cols if c in log.columns]) for title, cols in panels]
    panels = [(title, cols) for title, cols in panels if cols]
    fig, axes = _grid(len(panels))
    alarms = log["step"][log["alarms"].fillna("").astype(str) != ""] if "alarms" in log.columns else []
    for ax, (title, cols) in zip(axes, panels):
        for col in cols:  # steps that did not measure a column (rl.monitor.kl_every) are left out, not gaps
            values = pd.to_numeric(log[col], errors="coerce")
            ax.plot(log["step"][values.notna()], values.dropna(), label=col, linewidth=1.2, marker=".")
        for step in alarms:
            ax.axvline(step, color="tab:red", alpha=0.3, linewidth=2)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("step")
        if len(cols) > 1:
            ax.legend(fontsize=6)
    return _save(fig, path)
