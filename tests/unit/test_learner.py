"""The learner layer (`DeepSpeedLearner`) with a reward model's settings, as `train-rm` and `train-dpo` use it:
AdamW with weight decay, DeepSpeed's own gradient accumulation, one rank on an in-memory process group."""

from __future__ import annotations

import pytest
import torch

from ray_crm.config import ModelConfig, TrainConfig
from ray_crm.losses import bradley_terry_loss
from ray_crm.models.loading import load_reward_model
from ray_crm.train.deepspeed_config import deepspeed_config
from ray_crm.train.learner import DeepSpeedLearner, join_process_group, trainable

GOOD = [[2, 40, 41, 42, 3], [2, 50, 51, 3]]
BAD = [[2, 60, 61, 3], [2, 70, 71, 72, 73, 3]]


def _learner(model_dir, zero: int, precision: str, seed: int) -> DeepSpeedLearner:
    join_process_group(False, 0, 1)
    torch.manual_seed(seed)
    model = load_reward_model(ModelConfig(name=str(model_dir), precision=precision), pad_token_id=0)
    train = TrainConfig(batch_size=2, grad_accum=2, zero_stage=zero, lr=5e-2, weight_decay=0.1)
    optimizer = torch.optim.AdamW(trainable(model), lr=train.lr, weight_decay=train.weight_decay)
    return DeepSpeedLearner(model, optimizer, deepspeed_config(train, ModelConfig(precision=precision), 1), 0, 1)


def _steps(learner: DeepSpeedLearner, n: int) -> None:
    """`n` optimizer steps of two micro-steps each (one pair per micro-step), as the trainer takes them."""
    for _ in range(n):
        for good, bad in zip(GOOD, BAD, strict=True):
            width = max(len(good), len(bad))
            ids = torch.tensor([seq + [0] * (width - len(seq)) for seq in (good, bad)])
            rewards = learner.engine(input_ids=ids, attention_mask=(ids > 0).long()).logits.squeeze(-1).float()
            learner.engine.backward(bradley_terry_loss(rewards[:1], rewards[1:])[0])
            learner.engine.step()


def _weights(learner: DeepSpeedLearner) -> list[torch.Tensor]:
    return list(learner.snapshot().values())


@pytest.mark.parametrize(("zero", "precision"), [(0, "fp32"), (2, "fp32"), (3, "fp32"), (2, "bf16"), (0, "bf16")])
def test_a_reward_model_resumed_from_its_checkpoint_takes_the_same_next_steps(tiny_bert_dir, tmp_path, zero, precision):
    a = _learner(tiny_bert_dir, zero, precision, seed=0)
    start = _weights(a)
    _steps(a, 2)
    a.save_engine(tmp_path)
    assert not list(tmp_path.rglob("*.pt"))  # tensors in safetensors, the rest JSON: nothing to unpickle
    _steps(a, 2)
    b = _learner(tiny_bert_dir, zero, precision, seed=1)  # another LoRA init: the checkpoint must overwrite it
    assert not all(torch.equal(p, q) for p, q in zip(_weights(b), start, strict=True))
    b.load_engine(tmp_path)
    _steps(b, 2)
    assert all(torch.equal(p, q) for p, q in zip(_weights(a), _weights(b), strict=True))
    assert not all(torch.equal(p, q) for p, q in zip(_weights(a), start, strict=True))  # it trained
