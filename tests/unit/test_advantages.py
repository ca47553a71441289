"""RLOO, GAE, PPO's per-token rewards and value loss against hand-computed references."""

from __future__ import annotations

import pytest
import torch

from ray_crm.rl.advantages import gae, rloo_advantages, token_rewards
from ray_crm.rl.policy_losses import clipped_value_loss


def test_rloo_subtracts_the_mean_of_the_other_samples_and_zeroes_invalid_rows():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [3.0, float("nan"), 5.0], [4.0, float("nan"), float("nan")]])
    adv = rloo_advantages(rewards)
    assert torch.allclose(adv[0], torch.tensor([1 - 4.0, 2 - 3.5, 6 - 1.5]))
    assert torch.allclose(adv[1], torch.tensor([3 - 5.0, 0.0, 5 - 3.0]))
    assert torch.equal(adv[2], torch.zeros(3))  # one valid sample: nothing to compare with


def test_rloo_is_the_group_mean_baseline_scaled_by_n_over_n_minus_1():
    rewards = torch.randn(4, 5)
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    assert torch.allclose(rloo_advantages(rewards), centred * 5 / 4, atol=1e-6)


def _gae_by_hand(r, v, gamma, lam):
    """The textbook recursion, one trajectory, written out with Python floats."""
    adv, running = [0.0] * len(r), 0.0
    for t in reversed(range(len(r))):
        nxt = v[t + 1] if t + 1 < len(r) else 0.0
        running = r[t] + gamma * nxt - v[t] + gamma * lam * running
        adv[t] = running
    return adv


def test_gae_equals_the_hand_computed_recursion_and_ignores_padding():
    r = [0.0, 0.0, 0.0, 1.5]
    v = [0.2, -0.1, 0.4, 0.3]
    gamma, lam = 0.9, 0.8
    want = _gae_by_hand(r, v, gamma, lam)
    # row 0: the trajectory then 2 padding tokens with junk rewards and values; row 1: 2 prompt tokens first
    rewards = torch.tensor([r + [9.0, 9.0], [7.0, 7.0] + r])
    values = torch.tensor([v + [5.0, 5.0], [3.0, 3.0] + v])
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])
    adv, ret = gae(rewards, values, mask, gamma, lam)
    assert torch.allclose(adv[0, :4], torch.tensor(want)) and torch.equal(adv[0, 4:], torch.zeros(2))
    assert torch.allclose(adv[1, 2:], torch.tensor(want)) and torch.equal(adv[1, :2], torch.zeros(2))
    assert torch.allclose(ret[0, :4], torch.tensor(want) + torch.tensor(v))


def test_gae_with_lambda_one_and_gamma_one_is_return_minus_value():
    r, v = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[0.1, 0.2, 0.3]])
    adv, _ = gae(r, v, torch.ones(1, 3), gamma=1.0, lam=1.0)
    returns = torch.tensor([[1.5, 1.0, 2.0]])
    assert torch.allclose(adv, returns - v)


def test_whitened_rloo_has_unit_std_over_valid_rows():
    rewards = torch.tensor([[1.0, 2.0, 6.0], [3.0, float("nan"), 5.0]])
    adv = rloo_advantages(rewards, whiten=True)
    valid = torch.isfinite(rewards)
    assert torch.isclose(adv[valid].std(), torch.tensor(1.0)) and adv[1, 1] == 0


def test_token_rewards_put_the_score_on_the_last_response_token_and_charge_k1_kl_on_every_one():
    mask = torch.tensor([[0, 1, 1, 1, 0], [1, 1, 0, 0, 0], [0, 0, 0, 0, 0]])
    scores = torch.tensor([2.0, -1.0, 5.0])
    assert token_rewards(scores, mask).tolist() == [[0, 0, 0, 2, 0], [0, -1, 0, 0, 0], [0] * 5]
    logp, ref = torch.full((3, 5), -1.0), torch.full((3, 5), -1.5)  # k1 = logp - ref = 0.5 per token
    charged = token_rewards(scores, mask, logp, ref, kl_coef=0.2)
    assert torch.allclose(charged[0], torch.tensor([0, -0.1, -0.1, 1.9, 0]))
    assert torch.equal(charged[2], torch.zeros(5))  # no response token, no reward and no charge


def test_the_value_loss_takes_the_larger_of_the_plain_and_the_clipped_error():
    old, ret, mask = torch.tensor([[0.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.ones(1, 2)
    # token 0 moved 0.5 towards the return (clipped to 0.2: the clipped error 0.64 is larger than 0.25);
    # token 1 moved 0.1 (within the clip: both errors 0.81)
    loss, info = clipped_value_loss(torch.tensor([[0.5, 0.1]]), old, ret, mask, clip=0.2, norm=2.0)
    assert loss.item() == pytest.approx(0.5 * (0.64 + 0.81) / 2)
    assert info["critic/clip_fraction"] == 0.5
    # moving away from the return is not clipped in the loss's favour: the plain error is the larger
    loss, _ = clipped_value_loss(torch.tensor([[-0.5, 0.0]]), old, ret, mask, clip=0.2, norm=1.0)
    assert loss.item() == pytest.approx(0.5 * (2.25 + 1.0))
