"""PPO on the learner layer (tiny Llama, one rank, no Ray): the critic beside the policy, GAE advantages from
the rewards, several epochs and minibatches per batch, and resume with the critic's state."""

from __future__ import annotations

import pytest
import torch

from ray_crm.config import CriticConfig, PolicyLoraConfig
from ray_crm.rl.policy_learner import PolicyBatch, PolicyLearner, micro_batches
from tests.unit.test_policy_learner import PROMPTS, RESPONSES, T, _adam, _cfg, _same_adam, _sequence_logprobs


def _ppo(**kw):
    critic = CriticConfig(lr=5e-2, lora=PolicyLoraConfig(rank=4, alpha=8))
    return _cfg(advantage="gae", critic=critic, **{"epochs": 2, "minibatches": 2, **kw})


def _batch(rewards=(1.0, -1.0)) -> PolicyBatch:
    engine = [[0.0] * len(r) for r in RESPONSES]
    return PolicyBatch(PROMPTS, RESPONSES, [], engine, T, max_new_tokens=8, rewards=list(rewards))


def _values(learner) -> list[torch.Tensor]:
    with torch.no_grad():
        return [learner.critic.values(mb)[mb.response_mask.bool()]
                for mb in micro_batches(PROMPTS, RESPONSES, learner.pad_id, 2)]


def test_ppo_raises_the_rewarded_response_and_its_critic_learns_the_returns(tiny_llama_dir):
    learner = PolicyLearner(tiny_llama_dir, _ppo())
    assert all(torch.equal(v, torch.zeros_like(v)) for v in _values(learner))  # a zeroed head: values start at 0
    assert any("score" in n for n in learner.critic.names)  # the value head trains in full beside the adapter
    before = _sequence_logprobs(learner)
    losses = []
    for _ in range(4):
        stats = learner.step(_batch())
        assert stats["skipped"] == 0.0 and stats["policy/updates"] == 4.0  # 2 epochs x 2 minibatches
        losses.append(stats["critic/loss"])
    after = _sequence_logprobs(learner)
    assert sum(after[0]) > sum(before[0]) and sum(after[1]) < sum(before[1])
    assert losses[-1] < 0.5 * losses[0], losses
    (values,) = _values(learner)
    # gamma 1: the return of every token of a response is its reward; the critic moved towards +1 and -1
    assert values[: len(RESPONSES[0])].mean() > 0.3 and values[len(RESPONSES[0]):].mean() < -0.3


def test_a_ppo_batch_must_carry_rewards_and_a_grpo_batch_advantages(tiny_llama_dir):
    with pytest.raises(ValueError, match="rewards"):
        PolicyLearner(tiny_llama_dir, _ppo()).step(PolicyBatch(PROMPTS, RESPONSES, [1.0, -1.0], [[0.0]] * 2, T, 8))
    with pytest.raises(ValueError, match="advantages"):
        PolicyLearner(tiny_llama_dir, _cfg()).step(_batch())


def test_the_kl_in_the_reward_is_to_the_initial_policy(tiny_llama_dir):
    learner = PolicyLearner(tiny_llama_dir, _ppo(kl_in_reward=0.5, regularizer="none", epochs=1, minibatches=1))
    first = learner.step(_batch())
    assert learner.reference is not None and first["policy/kl_to_reference"] == pytest.approx(0.0, abs=1e-6)
    assert learner.step(_batch())["policy/kl_to_reference"] > 1e-4  # measured, not in the loss (regularizer none)
    assert PolicyLearner(tiny_llama_dir, _ppo()).reference is None  # no KL anywhere: no snapshot kept


def test_a_resumed_ppo_learner_takes_the_same_next_step_policy_and_critic(tiny_llama_dir, tmp_path):
    a = PolicyLearner(tiny_llama_dir, _ppo())
    a.step(_batch())
    a.save(tmp_path)
    assert {"critic_params.safetensors", "critic_optim_rank0.json"} <= {p.name for p in tmp_path.iterdir()}
    a.step(_batch(rewards=(-1.0, 2.0)))
    b = PolicyLearner(tiny_llama_dir, _ppo(seed=3))
    b.load(tmp_path)
    b.step(_batch(rewards=(-1.0, 2.0)))
    assert all(torch.equal(p, q) for p, q in zip(a.params, b.params))
    assert all(torch.equal(p, q) for p, q in zip(a.critic.params, b.critic.params))
    assert _same_adam(_adam(a), _adam(b)) and _same_adam(_adam(a.critic), _adam(b.critic))


def test_the_driver_hands_ppo_centred_scaled_rewards_and_grpo_its_group_advantages():
    from ray_crm.config import RLConfig
    from ray_crm.rl.grpo_trainer import _advantages

    reward = torch.tensor([5.0, 5.2, float("nan"), 4.8])  # an RM's offset of 5, one non-finite score
    valid = torch.isfinite(reward)
    advantages, rewards = _advantages(reward, valid, prompts=2, rl=RLConfig(advantage="gae"))
    kept = torch.tensor([rewards[i] for i in (0, 1, 3)])
    assert advantages == [] and rewards[2] == 0.0
    assert kept.mean().item() == pytest.approx(0.0, abs=1e-6) and kept.std().item() == pytest.approx(1.0, abs=1e-6)
    raw = _advantages(reward, valid, 2, RLConfig(advantage="gae", whiten_rewards=False))[1]
    assert raw[:2] == pytest.approx([5.0, 5.2])
    advantages, rewards = _advantages(reward, valid, prompts=2, rl=RLConfig(advantage="rloo", whiten_advantages=False))
    assert rewards == [] and advantages == pytest.approx([-0.2, 0.2, 0.0, 0.0])  # the lone valid sample gets 0
