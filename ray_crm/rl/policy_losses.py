"""The RL algorithm math as plain torch functions, apart from the Ray actors that will run them.

- `finite_rows`, `group_advantages`: which samples every scorer gave a finite score, and Dr.GRPO's group-mean
  baseline over the valid samples of each prompt;
- `clipped_policy_loss`: PPO's clipped surrogate, summed over tokens and divided by a constant (Dr.GRPO), so
  long and short responses weigh by their tokens, not by 1 / length;
- `clipped_value_loss`: PPO's critic loss, the squared error to the returns with the value clipped around the
  rollout's values (the larger of the two errors);
- `kl_to_reference`: the k3 estimator of KL(policy || reference) per token, for the KL and reference-reset
  baselines;
- `gradient_regularized_grads`: the finite-difference gradient-norm penalty (GR): the gradient of
  L + gamma/2 ||grad L||^2 from one extra forward and backward on the same batch, no double backward.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence

import torch
from torch import Tensor
from torch.nn.utils import get_total_norm

from ray_crm.rl.advantages import whitened

# A context around in-place writes to parameters: a no-op, or ZeRO-3's gather and re-shard.
Editor = Callable[[Sequence[Tensor]], contextlib.AbstractContextManager]


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
    return whitened(adv, valid) if whiten else adv


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


def clipped_value_loss(values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip: float,
                       norm: float) -> tuple[Tensor, dict[str, float]]:
    """0.5 * max((v - R)^2, (v_clipped - R)^2) summed over the `mask`ed tokens [B, T] and divided by `norm`;
    v_clipped stays within `clip` of the values the advantages were computed with, so one batch cannot move the
    critic far (PPO's value clipping)."""
    clipped = old_values + (values - old_values).clamp(-clip, clip)
    plain, capped = (values - returns) ** 2, (clipped - returns) ** 2
    mask = mask.to(values.dtype)
    loss = 0.5 * (torch.maximum(plain, capped) * mask).sum() / norm
    return loss, {"critic/clip_fraction": float(((capped > plain).to(values.dtype) * mask).sum() / mask.sum().clamp(min=1))}


def kl_to_reference(logp: Tensor, ref_logp: Tensor, mask: Tensor) -> Tensor:
    """Mean over response tokens of k3 = exp(ref - logp) - (ref - logp) - 1: unbiased for KL(pi || ref), >= 0."""
    delta = ref_logp - logp
    mask = mask.to(logp.dtype)
    return ((torch.exp(delta) - delta - 1) * mask).sum() / mask.sum().clamp(min=1)


def gradient_regularized_grads(grad_fn: Callable[[], Sequence[Tensor]], params: Sequence[Tensor], gamma: float,
                               fd_eps: float = 1e-3, max_norm: float = 10.0, perturb: Sequence[bool] | None = None,
                               clip: str = "shared", edit: Editor = contextlib.nullcontext,
                               ) -> tuple[list[Tensor], dict[str, float]]:
    """GR gradients for `params`: g1 + gamma * H g1, H g1 by the GR paper's forward difference of g2 and g1.

    g1 is grad L at phi scaled to a norm of at most `max_norm` (by s), g2 grad L after a step of fd_eps * g1;
    `grad_fn` returns grad L for `params` at their current values on the same batch (accumulated over
    micro-batches if it likes). `clip` is how g2 is scaled:
    - `shared`: by s as well, so g2 - g1 is s times the change of grad L over the step, which is fd_eps * s long
      along grad L: (g2 - g1) / (fd_eps * s) = H g1, and the result s * (grad L + gamma * H grad L) is the
      gradient of L + gamma/2 ||grad L||^2 scaled as clipping grad L alone would scale it;
    - `separate`: to `max_norm` on its own, over fd_eps (the paper's reference code). Once both norms exceed
      `max_norm`, g1 and g2 have equal norms, so g2 - g1 is orthogonal to g1 + g2: its component along g1 (from
      g1' H g1, the part that shrinks the gradient norm, which is what GR is for) is lost, bar a small negative
      remainder.
    Only the parameters flagged in `perturb` move (the transformer blocks, not embeddings or heads); every
    parameter gets the corrected gradient. The norms of grad L before and after the step are returned for
    logging: a rising gradient norm is the sign of reward hacking the method watches. `edit(params)` is entered
    around every in-place write to the parameters (ZeRO-3 gathers them for it and shards the result back).
    """
    if clip not in ("shared", "separate"):
        raise ValueError(f"clip must be 'shared' or 'separate', got {clip!r}")
    params = list(params)
    perturb = [True] * len(params) if perturb is None else list(perturb)
    raw1 = list(grad_fn())
    s1, g1_norm = _clip_factor(raw1, max_norm)
    moved = [(p, g) for p, g, m in zip(params, raw1, perturb) if m]
    raw2 = _grads_after_step(grad_fn, [p for p, _ in moved], [g for _, g in moved], fd_eps * s1, edit)
    s2, g2_norm = _clip_factor(raw2, max_norm)
    # shared: g1 = s1 * raw1, g2 = s1 * raw2 and (g2 - g1) / (fd_eps * s1) = (raw2 - raw1) / fd_eps
    a1, a2 = (1.0, 1.0) if clip == "shared" else (s1, s2)
    grads = [s1 * r1 + gamma * (a2 * r2 - a1 * r1) / fd_eps for r1, r2 in zip(raw1, raw2)]
    return grads, {"gr/g1_norm": g1_norm, "gr/g2_norm": g2_norm}


def _grads_after_step(grad_fn: Callable[[], Sequence[Tensor]], params: list[Tensor], direction: list[Tensor],
                      length: float, edit: Editor) -> list[Tensor]:
    """grad_fn() with `params` moved by length * `direction`, then restored bit for bit from a copy (adding and
    subtracting the step would not round-trip in fp32)."""
    with torch.no_grad(), edit(params):
        saved = [p.detach().clone() for p in params]
        for p, d in zip(params, direction):
            p.add_(d, alpha=length)
    try:
        return list(grad_fn())
    finally:
        with torch.no_grad(), edit(params):
            for p, copy in zip(params, saved):
                p.copy_(copy)


def _clip_factor(grads: Sequence[Tensor], max_norm: float) -> tuple[float, float]:
    """The factor that scales `grads` to a total norm of at most `max_norm` (as clip_grad_norm_ does), and their norm."""
    norm = float(get_total_norm(grads))
    return min(1.0, max_norm / (norm + 1e-6)), norm
