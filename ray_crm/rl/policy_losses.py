"""The RL algorithm math as plain torch functions, apart from the Ray actors that will run them.

- `finite_rows`, `group_advantages`: which samples every scorer gave a finite score, and Dr.GRPO's group-mean
  baseline over the valid samples of each prompt;
- `clipped_policy_loss`: PPO's clipped surrogate, summed over tokens and divided by a constant (Dr.GRPO), so
  long and short responses weigh by their tokens, not by 1 / length;
- `kl_to_reference`: the k3 estimator of KL(policy || reference) per token, for the KL and reference-reset
  baselines;
- `gradient_regularized_grads`: the finite-difference gradient-norm penalty (GR): the gradient of
  L + gamma/2 ||grad L||^2 from one extra forward and backward on the same batch, no double backward.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.nn.utils import get_total_norm


def finite_rows(scores: Mapping[str, Sequence[float]]) -> tuple[Tensor, dict[str, int]]:
    """Rows [B] that every score (the reward and each gold score) is finite for, and each score's count of
    non-finite values: one scorer's NaN would otherwise make the whole batch's advantages (and means) NaN.
    Checked in float32, the advantages' dtype, so a score beyond its range counts as infinite."""
    finite = {key: torch.isfinite(torch.tensor(values, dtype=torch.float32)) for key, values in scores.items()}
    valid = torch.stack(list(finite.values())).all(dim=0)
    return valid, {key: int((~f).sum()) for key, f in finite.items()}


def group_advantages(rewards: Tensor, whiten: bool = False, valid: Tensor | None = None) -> Tensor:
    """Advantages [P, N] from rewards [P, N] (N samples per prompt): reward minus its prompt's mean.

    Dr.GRPO drops GRPO's division by the group std (it up-weights prompts the policy already agrees on).
    `whiten` rescales by the batch std: causal RMs shrink the reward scale (docs/RESULTS.md), which would
    otherwise shrink every update with it. Only `valid` rows (default: finite rewards) enter the means and the
    std; the others get 0 (the driver leaves them out of the step), so a prompt with no valid row adds nothing.
    """
    valid = torch.isfinite(rewards) if valid is None else valid
    kept = torch.where(valid, rewards, 0.0)
    mean = kept.sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True).clamp(min=1)
    adv = torch.where(valid, kept - mean, 0.0)
    if whiten and valid.sum() > 1:  # with one valid row or none every advantage is already 0
        adv = adv / (adv[valid].std() + 1e-8)
    return adv


def clipped_policy_loss(logp: Tensor, old_logp: Tensor, advantages: Tensor, mask: Tensor,
                        clip_eps: float = 0.2, norm: float | None = None) -> tuple[Tensor, dict[str, float]]:
    """PPO-clip over response tokens [B, T]; `advantages` per sequence [B] or per token [B, T].

    The token sum is divided by `norm` (Dr.GRPO: a constant such as the generation budget times B), or by the
    number of response tokens when None.
    """
    adv = advantages.unsqueeze(-1) if advantages.dim() == 1 else advantages
    ratio = torch.exp(logp - old_logp)
    surrogate = torch.minimum(ratio * adv, torch.clamp(ratio, 1 - clip_eps, 1 + clip_eps) * adv)
    mask = mask.to(logp.dtype)
    loss = -(surrogate * mask).sum() / (norm if norm is not None else mask.sum().clamp(min=1))
    clipped = ((ratio - 1).abs() > clip_eps).to(logp.dtype)
    return loss, {"policy/clip_fraction": float((clipped * mask).sum() / mask.sum().clamp(min=1))}


def kl_to_reference(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """Mean over response tokens of k3 = exp(ref - logp) - (ref - logp) - 1: unbiased for KL(pi || ref), >= 0."""
    delta = ref_logp - logp
    mask = mask.to(logp.dtype)
    return ((torch.exp(delta) - delta - 1) * mask).sum() / mask.sum().clamp(min=1)


def gradient_regularized_grads(grad_fn: Callable[[], Sequence[Tensor]], params: Sequence[Tensor], gamma: float,
                               fd_eps: float = 1e-3, max_norm: float = 10.0,
                               perturb: Sequence[bool] | None = None) -> tuple[list[Tensor], dict[str, float]]:
    """GR gradients for `params`: g1 + gamma * (g2 - g1) / fd_eps (the GR paper's forward difference).

    g1 = grad L at phi, g2 = grad L at phi + fd_eps * g1, each clipped to `max_norm`; `grad_fn` returns grad L
    for `params` at their current values on the same batch (accumulated over micro-batches if it likes). Only the parameters flagged in `perturb` move (the transformer blocks, not
    embeddings or heads); every parameter gets the corrected gradient. The parameters are restored bit for
    bit from a copy (adding and subtracting the step would not round-trip in fp32). The norms of g1 and g2 are
    returned for logging: a rising gradient norm is the sign of reward hacking the method watches.
    """
    params = list(params)
    perturb = [True] * len(params) if perturb is None else list(perturb)
    g1, g1_norm = _clipped(grad_fn(), max_norm)
    saved = [p.detach().clone() for p, moved in zip(params, perturb) if moved]
    try:
        with torch.no_grad():
            for p, g, moved in zip(params, g1, perturb):
                if moved:
                    p.add_(g, alpha=fd_eps)
        g2, g2_norm = _clipped(grad_fn(), max_norm)
    finally:
        with torch.no_grad():
            for p, copy in zip((p for p, moved in zip(params, perturb) if moved), saved):
                p.copy_(copy)
    grads = [a + gamma * (b - a) / fd_eps for a, b in zip(g1, g2)]
    return grads, {"gr/g1_norm": float(g1_norm), "gr/g2_norm": float(g2_norm)}


def _clipped(grads: Sequence[Tensor], max_norm: float) -> tuple[list[Tensor], Tensor]:
    """The gradients scaled to a total norm of at most `max_norm` (as clip_grad_norm_ does), and the norm before."""
    norm = get_total_norm(grads)
    scale = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
    return [g * scale for g in grads], norm
