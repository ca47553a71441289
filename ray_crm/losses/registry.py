"""Pair losses by name: what `loss.type` selects, for reward models and DPO-trained policies alike.

Every entry takes the scores of the chosen and rejected responses (a reward head's output, or DPO's implicit
reward beta * log(pi / pi_ref)) with their bins of Z, and returns `(loss, metrics)`. Every entry also
measures the MMD penalty (without gradient when it does not train on it): it is the bias the run reports.
A new pair loss is one function registered here, not a new trainer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from ray_crm.losses.mmd import MMDConfig
from ray_crm.losses.preference import Metrics, Variant, causal_penalty, crm_loss, ipo_loss


@dataclass(frozen=True)
class PairLossSettings:
    lam: float = 0.0  # the penalty's weight (crm, causal_dpo)
    variant: Variant = "unconditional"
    mmd: MMDConfig = field(default_factory=MMDConfig)
    beta: float = 0.1  # DPO's inverse temperature, already inside the implicit rewards; IPO's target reads it


def warmed_up_lambda(lam: float, step: int, warmup_steps: int) -> float:
    """The penalty's weight at optimizer step `step` (0-based): a linear ramp from 0 over `warmup_steps`.

    A penalty at full weight from the first step can be met by keeping every reward where it starts (all equal,
    so no bin differs from another) before the preference term has taught any content; ramping it in lets the
    content be learned first and then cleaned of Z.
    """
    if warmup_steps <= 0 or step >= warmup_steps:
        return lam
    return lam * step / warmup_steps


PairLoss = Callable[..., tuple[Tensor, Metrics]]
PAIR_LOSSES: dict[str, PairLoss] = {}


def register(name: str) -> Callable[[PairLoss], PairLoss]:
    def add(fn: PairLoss) -> PairLoss:
        if name in PAIR_LOSSES:
            raise ValueError(f"pair loss {name!r} is registered twice")
        PAIR_LOSSES[name] = fn
        return fn
    return add


def pair_loss(name: str) -> PairLoss:
    try:
        return PAIR_LOSSES[name]
    except KeyError:
        raise ValueError(f"unknown pair loss {name!r}; registered: {', '.join(sorted(PAIR_LOSSES))}") from None


@register("bt")
@register("dpo")  # DPO is Bradley-Terry on the implicit rewards
def unpenalized(chosen: Tensor, rejected: Tensor, chosen_bins: Tensor, rejected_bins: Tensor, s: PairLossSettings,
                **kw) -> tuple[Tensor, Metrics]:
    return crm_loss(chosen, rejected, chosen_bins, rejected_bins, 0.0, s.variant, s.mmd, **kw)


@register("crm")
@register("causal_dpo")  # Causal DPO is the CRM loss on the implicit rewards
def penalized(chosen: Tensor, rejected: Tensor, chosen_bins: Tensor, rejected_bins: Tensor, s: PairLossSettings,
              **kw) -> tuple[Tensor, Metrics]:
    return crm_loss(chosen, rejected, chosen_bins, rejected_bins, s.lam, s.variant, s.mmd, **kw)


@register("ipo")
def ipo(chosen: Tensor, rejected: Tensor, chosen_bins: Tensor, rejected_bins: Tensor, s: PairLossSettings,
        global_batch: bool = False, chosen_z: Tensor | None = None, rejected_z: Tensor | None = None,
        ) -> tuple[Tensor, Metrics]:
    """IPO on the implicit rewards: their log-ratios are chosen / beta and rejected / beta."""
    zero = torch.zeros_like(chosen)
    loss, metrics = ipo_loss(chosen / s.beta, rejected / s.beta, zero, zero, s.beta)
    with torch.no_grad():
        _, penalty = causal_penalty(chosen, rejected, chosen_bins, rejected_bins, s.variant, s.mmd, global_batch,
                                    chosen_z, rejected_z)
    return loss, {**metrics, **penalty, "loss/total": loss.detach()}
