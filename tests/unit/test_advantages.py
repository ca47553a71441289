"""RLOO and GAE against hand-computed references."""

from __future__ import annotations

import torch

from ray_crm.rl.advantages import gae, rloo_advantages


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
