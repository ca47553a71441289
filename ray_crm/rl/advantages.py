"""Advantage estimators beside Dr.GRPO's group baseline: RLOO (leave-one-out) and PPO's GAE, as plain torch.

- `rloo_advantages`: each sample's reward minus the mean of the other samples of its prompt (REINFORCE
  leave-one-out); unbiased, unlike the group mean that includes the sample itself.
- `token_rewards`: PPO-RLHF's per-token reward: the sequence's score on its last response token, minus a
  per-token KL to the reference;
- `gae`: generalized advantage estimation over the tokens of each response from per-token rewards and a
  critic's values, and the returns the critic regresses on (advantages + values).
"""

from __future__ import annotations

import torch
from torch import Tensor


def rloo_advantages(rewards: Tensor, whiten: bool = False, valid: Tensor | None = None) -> Tensor:
    """Advantages [P, N] from rewards [P, N]: r_i minus the mean of the prompt's other valid rewards.

    Rows that are not `valid` (default: non-finite rewards) get 0, as does a prompt with a single valid sample
    (it has no other sample to compare with). `whiten` divides by the valid advantages' std, as for Dr.GRPO.
    """
    valid = torch.isfinite(rewards) if valid is None else valid
    kept = torch.where(valid, rewards, 0.0)
    count = valid.sum(dim=1, keepdim=True)
    others = (kept.sum(dim=1, keepdim=True) - kept) / (count - 1).clamp(min=1)
    adv = torch.where(valid & (count > 1), kept - others, 0.0)
    return whitened(adv, valid) if whiten else adv


def whitened(advantages: Tensor, valid: Tensor) -> Tensor:
    """Advantages divided by the std of the `valid` ones: a reward model's scale then does not set the step size
    (causal RMs shrink rewards). With one valid row or none every advantage is already 0 and stays so."""
    if valid.sum() <= 1:
        return advantages
    return advantages / (advantages[valid].std() + 1e-8)


def token_rewards(scores: Tensor, mask: Tensor, logp: Tensor | None = None, ref_logp: Tensor | None = None,
                  kl_coef: float = 0.0) -> Tensor:
    """Rewards [B, T]: each row's score [B] on its last `mask`ed token, minus kl_coef * (logp - ref_logp) (k1)
    on every masked token. A row without response tokens gets nothing."""
    mask = mask.to(scores.dtype)
    positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
    last = torch.where(mask > 0, positions, -1).max(dim=1).values
    rewards = torch.zeros_like(mask)
    rows = (last >= 0).nonzero().squeeze(-1)
    rewards[rows, last[rows]] = scores[rows]
    if kl_coef and logp is not None and ref_logp is not None:
        rewards = rewards - kl_coef * (logp - ref_logp) * mask
    return rewards


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float = 1.0, lam: float = 0.95) -> tuple[Tensor, Tensor]:
    """Advantages and returns [B, T] over response tokens.

    `rewards` [B, T] per token (e.g. the RM's score on the last token minus a per-token KL), `values` [B, T]
    the critic's value of each token's state, `mask` [B, T] 1 on response tokens (contiguous from the left of
    each row's response). Past the last response token the value is 0: the episode ends there.
    """
    mask = mask.to(values.dtype)
    values = values * mask
    advantages = torch.zeros_like(values)
    running = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        next_value = values[:, t + 1] if t + 1 < values.shape[1] else torch.zeros_like(running)
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * mask[:, t]
        advantages[:, t] = running
    return advantages, (advantages + values) * mask
