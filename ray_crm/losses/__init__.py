"""Causal reward losses as pure torch functions (no Ray): MMD penalty, Bradley-Terry / CRM, DPO / IPO / Causal DPO,
and the registry of pair losses by name that `loss.type` selects."""

from ray_crm.losses.distributed import gather_global
from ray_crm.losses.mmd import MMDConfig, MMDStats, binned_mmd_penalty, mmd2, z_dependence
from ray_crm.losses.pair_weights import mirror_balance_weights, mirror_resample_index
from ray_crm.losses.preference import (
    bradley_terry_loss,
    bt_calibration_scale,
    causal_dpo_loss,
    causal_penalty,
    crm_loss,
    dpo_loss,
    implicit_rewards,
    ipo_loss,
)
from ray_crm.losses.registry import PAIR_LOSSES, PairLossSettings, pair_loss, warmed_up_lambda

__all__ = [
    "PAIR_LOSSES",
    "MMDConfig",
    "MMDStats",
    "PairLossSettings",
    "binned_mmd_penalty",
    "bradley_terry_loss",
    "bt_calibration_scale",
    "causal_dpo_loss",
    "causal_penalty",
    "crm_loss",
    "dpo_loss",
    "gather_global",
    "implicit_rewards",
    "ipo_loss",
    "mirror_balance_weights",
    "mirror_resample_index",
    "mmd2",
    "pair_loss",
    "warmed_up_lambda",
    "z_dependence",
]
