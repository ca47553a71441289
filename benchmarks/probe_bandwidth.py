"""Does the MMD kernel let a causal RM learn? BT loss and reward spread after 30 steps per kernel (docs/training.md).

    python benchmarks/probe_bandwidth.py

Tiny BERT RM (tests/tiny_models.py) + LoRA r=8, AdamW lr 5e-3, batches of 16 synthetic pairs (chosen carries
positive words, rejected negative ones, lengths independent), lambda=0.5 over 3 length bins, one thread.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ray_crm.config import load_config
from ray_crm.losses import MMDConfig, crm_loss
from ray_crm.models.loading import load_reward_model, load_tokenizer, score
from tests.integration.test_train_rm import _pairs
from tests.tiny_models import build_tiny_bert


def length_bin(text: str) -> int:
    n = len(text.split())
    return 0 if n < 9 else (1 if n < 16 else 2)


def final_bt_loss(model_dir: Path, bandwidth, lam: float, standardize: bool = False, steps: int = 30) -> tuple[float, float]:
    """Mean BT loss of the last 5 steps, and the std of the last batch's rewards."""
    cfg = load_config(None, [f"model.name={model_dir}", "model.lora.rank=8", "model.lora.alpha=16"])
    tok = load_tokenizer(cfg.model)
    torch.manual_seed(0)
    model = load_reward_model(cfg.model, tok.pad_token_id)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-3)
    pairs, losses = _pairs(400), []
    for step in range(steps):
        batch = pairs[(step * 16) % 384 : (step * 16) % 384 + 16]
        enc = tok([p["prompt"] for p in batch] * 2, [p["chosen"] for p in batch] + [p["rejected"] for p in batch],
                  padding=True, return_tensors="pt")
        rewards, _ = score(model, enc)
        bins = [torch.tensor([length_bin(p[side]) for p in batch]) for side in ("chosen", "rejected")]
        loss, metrics = crm_loss(rewards[:16], rewards[16:], *bins, lam, mmd=MMDConfig(bandwidth=bandwidth, num_bins=3,
                                                                                 standardize=standardize))
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(float(metrics["loss/preference"]))
    return sum(losses[-5:]) / 5, float(rewards.detach().std())


if __name__ == "__main__":
    torch.set_num_threads(1)
    model_dir = build_tiny_bert(Path(tempfile.mkdtemp()))
    print("| bandwidth | standardized | lambda | BT loss, mean of steps 26-30 | reward std, step 30 |\n|---|---|---|---|---|")
    mixture = (0.5, 1.0, 2.0, 4.0)
    for bandwidth, standardize, lam in [("median", False, 0.0), ("median", False, 0.5), (1.0, False, 0.5),
                                        ((0.5, 1.0, 2.0), False, 0.5), (mixture, False, 0.5), (mixture, True, 0.5),
                                        (mixture, True, 5.0), ("median", True, 0.5)]:
        loss, spread = final_bt_loss(model_dir, bandwidth, lam, standardize)
        print(f"| {bandwidth} | {standardize} | {lam} | {loss:.3f} | {spread:.3f} |")
