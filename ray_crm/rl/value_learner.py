"""PPO's critic as one rank of the learner layer: a value per response token, regressed on the GAE returns.

No Ray. It lives beside the rank's `PolicyLearner` (same process group, ZeRO stage and gradient clipping) and
steps with the same global-gradient scheme (`DeepSpeedLearner`): each rank's micro-batches, summed over ranks.
Its checkpoint files start with `critic_`.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from ray_crm.config import RLConfig
from ray_crm.models.loading import load_value_model
from ray_crm.rl.policy_losses import clipped_value_loss
from ray_crm.train.deepspeed_config import policy_deepspeed_config
from ray_crm.train.learner import DeepSpeedLearner, trainable

if TYPE_CHECKING:
    from ray_crm.rl.policy_learner import MicroBatch


class ValueLearner(DeepSpeedLearner):
    prefix = "critic_"

    def __init__(self, model_path: str | Path, cfg: RLConfig, pad_id: int, rank: int = 0, world: int = 1):
        torch.manual_seed(cfg.seed + 1)  # the same LoRA initialization on every rank, not the policy's
        model = load_value_model(model_path, cfg.critic.lora, pad_id).to("cuda" if cfg.use_gpu else "cpu")
        self.cfg = cfg
        super().__init__(model, torch.optim.Adam(trainable(model), lr=cfg.critic.lr),
                         policy_deepspeed_config(cfg, world), rank, world)

    def values(self, mb: MicroBatch) -> Tensor:
        """[B, L - 1]: the value of the state before each next token, aligned with `mb.response_mask`."""
        device = self.params[0].device
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16"):
            out = self.model(input_ids=mb.input_ids.to(device), attention_mask=mb.attention_mask.to(device))
        return out.logits[:, :-1, 0].float().cpu()

    def update(self, micro: Sequence[MicroBatch], old_values: Sequence[Tensor], returns: Sequence[Tensor],
               tokens: float) -> dict[str, float]:
        """One optimizer step on the clipped value loss over this rank's `micro` batches (`tokens`: the response
        tokens of every rank's share, the loss's divisor). Skipped, with the reason, if not finite."""
        total = self.zeros()
        sums = torch.zeros(2, dtype=total[0].dtype, device=total[0].device)  # loss, clip fraction
        for mb, old, ret in zip(micro, old_values, returns, strict=True):
            loss, info = clipped_value_loss(self.values(mb), old, ret, mb.response_mask, self.cfg.critic.value_clip,
                                            norm=max(tokens, 1.0))
            share = float(mb.response_mask.sum()) / max(tokens, 1.0)
            for acc, g in zip(total, self.gradients(loss), strict=True):
                acc.add_(g)
            sums += torch.tensor([float(loss.detach()), info["critic/clip_fraction"] * share]).to(sums)
        *total, sums = self.sum_over_ranks([*total, sums])
        finite = bool(torch.isfinite(sums[0])) and all(bool(torch.isfinite(g).all()) for g in total)
        if finite:
            self.apply(total)
        return {"critic/loss": float(sums[0]), "critic/clip_fraction": float(sums[1]), "critic/skipped": float(not finite)}
