"""The names of the metrics train-rm reports at each validation: what a config may rank checkpoints and trials by.

Kept apart from the trainer so that checking a config at load imports neither torch nor Ray.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ray_crm.config import Config


def validation_metric_names(cfg: Config) -> set[str]:
    """Every metric `evaluate` reports under `cfg`: what a sweep may rank trials by."""
    names = {"val_accuracy", "val_balanced_accuracy", "val_bt_loss", "val_mmd", "val_reward_std", "val_z_spearman",
             *(f"val_spearman_{z.name}" for z in cfg.data.spurious)}
    return names | ({"val_ci_gap", "val_ci_gap_std"} if cfg.data.twins else set())


def higher_is_better(name: str) -> bool:
    """Accuracies rise as a model improves; losses, penalties and bias measures fall."""
    return "accuracy" in name
