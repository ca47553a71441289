"""Preference losses: Bradley-Terry, DPO / IPO, and their causal versions with the binned MMD penalty.

Every loss returns `(loss, metrics)`; metrics are detached tensors keyed for a logger ("loss/...", "reward/...",
"mmd/..."), converted to floats only when logged so that a training step never waits on the device.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from ray_crm.losses.distributed import gather_global
from ray_crm.losses.mmd import MMDConfig, binned_mmd_penalty, z_dependence

Variant = Literal["unconditional", "conditional"]
Metrics = dict[str, Tensor]
DEFAULT_MMD = MMDConfig()


@torch.no_grad()
def _pair_metrics(chosen: Tensor, rejected: Tensor) -> Metrics:
    margin = chosen - rejected
    return {
        "reward/chosen": chosen.mean(),
        "reward/rejected": rejected.mean(),
        "reward/margin": margin.mean(),
        "reward/accuracy": (margin > 0).float().mean(),
    }


def bradley_terry_loss(chosen: Tensor, rejected: Tensor, weights: Tensor | None = None) -> tuple[Tensor, Metrics]:
    """-mean w * log sigmoid(r_w - r_l) (w: per-pair weights, 1 when not given); logsigmoid keeps large negative
    margins finite."""
    terms = F.logsigmoid(chosen - rejected)
    loss = -(terms if weights is None else weights * terms).mean()
    return loss, {"loss/preference": loss.detach(), **_pair_metrics(chosen, rejected)}


def causal_penalty(
    chosen: Tensor,
    rejected: Tensor,
    chosen_bins: Tensor,
    rejected_bins: Tensor,
    variant: Variant = "unconditional",
    mmd: MMDConfig = DEFAULT_MMD,
    global_batch: bool = False,
    chosen_z: Tensor | None = None,
    rejected_z: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """The CRM penalty: over all values of the batch (unconditional), or chosen and rejected apart, summed
    (conditional: r independent of Z given the preference label).

    chosen / rejected are rewards [B] or representations [B, D]. Z is compared by its bins, or with
    mmd.z_kernel="rbf" by its measured values chosen_z / rejected_z ([B] or [B, K]). global_batch gathers them
    (and the bins or Z) from every rank first, see `ray_crm.losses.distributed`.
    """
    by_value = mmd.z_kernel == "rbf"
    if by_value:
        if chosen_z is None or rejected_z is None:
            raise ValueError("mmd.z_kernel='rbf' compares Z's values: give chosen_z and rejected_z")
        chosen_bins, rejected_bins = chosen_z, rejected_z
    if variant == "unconditional":
        groups = {"mmd/": (torch.cat([chosen, rejected]), torch.cat([chosen_bins, rejected_bins]))}
    elif variant == "conditional":
        groups = {"mmd/chosen/": (chosen, chosen_bins), "mmd/rejected/": (rejected, rejected_bins)}
    else:
        raise ValueError(f"variant must be 'unconditional' or 'conditional', got {variant!r}")
    penalty, metrics = 0.0, {}
    for prefix, (values, z) in groups.items():
        if global_batch:
            values, z = gather_global(values, z)
        if by_value:
            term, sigma_z = z_dependence(values, z, mmd)
            metrics.update({f"{prefix}hsic": term.detach(), f"{prefix}z_bandwidth": sigma_z})
        else:
            term, stats = binned_mmd_penalty(values, z, mmd)
            metrics.update(stats.metrics(prefix))
        penalty = penalty + term
    metrics["mmd/penalty"] = penalty.detach()
    return penalty, metrics


def crm_loss(
    chosen_rewards: Tensor,
    rejected_rewards: Tensor,
    chosen_bins: Tensor,
    rejected_bins: Tensor,
    lam: float,
    variant: Variant = "unconditional",
    mmd: MMDConfig = DEFAULT_MMD,
    *,
    chosen_features: Tensor | None = None,
    rejected_features: Tensor | None = None,
    global_batch: bool = False,
    weights: Tensor | None = None,
    chosen_z: Tensor | None = None,
    rejected_z: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """Causal reward model loss: L_BT + lam * MMD penalty across the bins of Z (or, with mmd.z_kernel="rbf",
    HSIC against Z's values chosen_z / rejected_z).

    The penalty is over the scalar rewards, or over representations when chosen_features / rejected_features
    ([B, D], e.g. the pooled hidden state) are given. weights weigh each pair's BT term
    (`ray_crm.losses.pair_weights`); the penalty is over the rewards as they are. With lam == 0 the loss is the
    plain Bradley-Terry loss, bit for bit; the penalty is still computed, without gradient, because it measures
    the vanilla model's bias.
    """
    if lam < 0:
        raise ValueError(f"lam must be >= 0, got {lam}")
    if (chosen_features is None) != (rejected_features is None):
        raise ValueError("give both chosen_features and rejected_features, or neither")
    loss, metrics = bradley_terry_loss(chosen_rewards, rejected_rewards, weights)
    chosen = chosen_rewards if chosen_features is None else chosen_features
    rejected = rejected_rewards if rejected_features is None else rejected_features
    with torch.set_grad_enabled(torch.is_grad_enabled() and lam != 0):
        penalty, mmd_metrics = causal_penalty(chosen, rejected, chosen_bins, rejected_bins, variant, mmd, global_batch,
                                              chosen_z, rejected_z)
    if lam != 0:
        loss = loss + lam * penalty
    metrics.update(mmd_metrics)
    metrics["loss/total"] = loss.detach()
    return loss, metrics


def implicit_rewards(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor]:
    """DPO's implicit rewards beta * log(pi / pi_ref) of the chosen and rejected responses (sequence log-probs)."""
    return beta * (policy_chosen_logps - ref_chosen_logps), beta * (policy_rejected_logps - ref_rejected_logps)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, Metrics]:
    """DPO: Bradley-Terry on the implicit rewards, -mean log sigmoid(beta * (log-ratio_w - log-ratio_l))."""
    return bradley_terry_loss(
        *implicit_rewards(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta)
    )


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float = 0.1,
) -> tuple[Tensor, Metrics]:
    """IPO (Azar et al. 2023): mean (h - 1/(2 beta))^2, h = log-ratio_w - log-ratio_l; a bounded target margin."""
    chosen, rejected = implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, 1.0
    )
    loss = (chosen - rejected - 1 / (2 * beta)).square().mean()
    return loss, {"loss/preference": loss.detach(), **_pair_metrics(beta * chosen, beta * rejected)}


def causal_dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    chosen_bins: Tensor,
    rejected_bins: Tensor,
    beta: float,
    lam: float,
    variant: Variant = "unconditional",
    mmd: MMDConfig = DEFAULT_MMD,
    *,
    global_batch: bool = False,
    chosen_z: Tensor | None = None,
    rejected_z: Tensor | None = None,
) -> tuple[Tensor, Metrics]:
    """Causal DPO: DPO + lam * MMD penalty over the implicit rewards beta * log(pi / pi_ref), binned by Z (or
    compared with Z's values, as in `crm_loss`).

    The paper writes the raw ratio pi / pi_ref; its log is what DPO's reward is, and it does not overflow.
    """
    chosen, rejected = implicit_rewards(
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps, beta
    )
    return crm_loss(chosen, rejected, chosen_bins, rejected_bins, lam, variant, mmd, global_batch=global_batch,
                    chosen_z=chosen_z, rejected_z=rejected_z)


def bt_calibration_scale(margins: Tensor, low: float = 1e-3, high: float = 1e3, iters: int = 60) -> float:
    """The scale c > 0 that minimises the Bradley-Terry loss -mean log sigmoid(c * margin) of held-out pairs.

    A BT reward's scale is meaningful only as calibration: r_c - r_r should be the log-odds that c is preferred.
    A causal RM whose penalty slowed its BT loss ranks pairs well at a tiny scale; multiplying its reward by c
    gives it the scale its own held-out preferences support, without changing any ranking or any bias figure
    in reward-std units. The loss is convex in c, so its derivative, -mean(m * sigmoid(-c m)), is increasing:
    bisection on log c within [low, high]. When every pair is ranked right (or every one wrong) no finite scale
    is best and 1 is returned: the pairs carry no evidence about the scale.
    """
    m = margins.detach().double().flatten()
    m = m[torch.isfinite(m)]
    if not (bool((m > 0).any()) and bool((m < 0).any())):
        return 1.0
    lo, hi = torch.tensor(low, dtype=m.dtype).log(), torch.tensor(high, dtype=m.dtype).log()
    for _ in range(iters):
        mid = (lo + hi) / 2
        slope = -(m * torch.sigmoid(-mid.exp() * m)).mean()
        lo, hi = (mid, hi) if slope < 0 else (lo, mid)
    return float(((lo + hi) / 2).exp())
