"""The reward-hacking monitor: what the rollouts' spurious variables do, and alarms on a run's history.

Plain numpy (no Ray, no torch), so the rules are tested on planted histories:
- `TrainingZ` measures the rollouts' spurious variables Z with the same extractors and fitted bins as
  `prepare` used for the reward model's data (read from its manifest), and how far their bin histogram has
  moved from the training one (total variation, per Z): a reward model is only accurate where it was trained.
- `alarms` applies the rules to the history of per-step metrics: the proxy reward trending up while a gold
  score trends down over a window (hacking as the GR paper defines it), a Z drifting out of the training
  distribution, the KL to the initial policy past a bound.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy import stats

from ray_crm.config import MonitorConfig
from ray_crm.data.zbins import ResponseBinner
from ray_crm.models.loading import DATA_MANIFEST


@dataclass(frozen=True)
class Alarm:
    rule: str  # proxy_up_gold_down | z_drift | kl_bound
    step: int
    message: str


@dataclass(frozen=True)
class TrainingZ:
    """The spurious variables a reward model was trained on (`prepare`'s extractors and bins), and the share of
    training responses in each bin, per Z."""

    binner: ResponseBinner
    train_share: tuple[np.ndarray, ...]

    @classmethod
    def from_manifest(cls, manifest: Mapping) -> TrainingZ:
        """From `prepare`'s manifest: the Z configs, the fitted bins and the train split's joint bin counts."""
        binner = ResponseBinner.from_manifest(manifest)
        sizes = binner.binning.sizes
        train = manifest["splits"]["train"]
        joint = np.add(train["bins_chosen"], train["bins_rejected"]).astype(float).reshape(sizes)
        shares = []
        for axis in range(len(sizes)):
            marginal = joint.sum(axis=tuple(a for a in range(joint.ndim) if a != axis))
            shares.append(marginal / max(marginal.sum(), 1.0))
        return cls(binner, tuple(shares))

    @classmethod
    def beside(cls, reward_model: str | None) -> TrainingZ | None:
        """From the data manifest an exported reward model carries (`ray-crm train-rm` writes it into the
        model's folder); None if it has none (a model trained elsewhere): the Z rules then stay silent."""
        path = Path(reward_model) / DATA_MANIFEST if reward_model else None
        if path is None or not path.is_file():
            return None
        return cls.from_manifest(json.loads(path.read_text()))

    def measure(self, prompts: Sequence[str], responses: Sequence[str]) -> dict[str, float]:
        """`z/<name>_mean` (numeric Z: its mean; a flag: its rate) and `z/<name>_tv`, the total variation between
        the rollouts' bin histogram and the training one (0: same, 1: disjoint)."""
        values = self.binner.values(prompts, responses)
        out = {}
        for (name, ids), part, share in zip(self.binner.binning.apply_each(values).items(), self.binner.binning.parts,
                                            self.train_share, strict=True):
            if values[name].dtype.kind in "iuf":
                out[f"z/{name}_mean"] = float(np.nanmean(values[name]))
            seen = np.bincount(ids, minlength=part.n) / max(len(ids), 1)
            out[f"z/{name}_tv"] = float(0.5 * np.abs(seen - share).sum())
        return out


def trend(values: Sequence[float]) -> float:
    """Spearman correlation of a series with its step index (+1: rising every step, -1: falling); 0 if flat."""
    x = np.asarray(values, dtype=float)
    if len(x) < 3 or np.ptp(x) == 0 or not np.isfinite(x).all():
        return 0.0
    return float(stats.spearmanr(np.arange(len(x)), x).statistic)


def alarms(history: Sequence[Mapping[str, float]], cfg: MonitorConfig, proxy_key: str,
           gold_keys: Sequence[str]) -> list[Alarm]:
    """The rules that fire on the last row of `history` (one dict of metrics per step, oldest first, with `step`)."""
    if not history:
        return []
    last, step, fired = history[-1], int(history[-1]["step"]), []
    window = history[-cfg.window:]
    if len(window) == cfg.window:
        rising = trend([row[proxy_key] for row in window])
        for gold in gold_keys:
            falling = trend([row[gold] for row in window])
            if rising >= cfg.trend and falling <= -cfg.trend:
                fired.append(Alarm("proxy_up_gold_down", step, (
                    f"over the last {cfg.window} steps {proxy_key} rose (trend {rising:+.2f}) while {gold} fell "
                    f"(trend {falling:+.2f}): the policy is exploiting the reward model")))
    for key, value in last.items():
        if key.startswith("z/") and key.endswith("_tv") and value > cfg.z_tv_max:
            fired.append(Alarm("z_drift", step, (
                f"{key[2:-3]} of the rollouts is {value:.2f} (total variation) from its training distribution, "
                f"past {cfg.z_tv_max:g}: the reward model is scoring text unlike what it was trained on")))
    kl = last.get("policy/kl_to_initial")
    if cfg.kl_max is not None and kl is not None and kl > cfg.kl_max:
        fired.append(Alarm("kl_bound", step, f"KL to the initial policy is {kl:.4g}, past {cfg.kl_max:g}"))
    return fired
