"""The RL math on hand-made cases: advantages (non-finite scores left out), the clipped surrogate, k3 KL and the
GR finite difference."""

import pytest
import torch

from ray_crm.rl.policy_losses import (
    clipped_policy_loss,
    finite_rows,
    gradient_regularized_grads,
    group_advantages,
    kl_to_reference,
)


def _grads(loss_fn, params):
    return lambda: torch.autograd.grad(loss_fn(), params)


def test_group_advantages_subtract_each_prompts_mean():
    rewards = torch.tensor([[1.0, 2.0, 3.0], [10.0, 10.0, 40.0]])
    assert torch.equal(group_advantages(rewards), torch.tensor([[-1.0, 0.0, 1.0], [-10.0, -10.0, 20.0]]))
    # whitening keeps the signs and the ranking and gives unit spread, whatever the reward scale
    tiny = group_advantages(rewards * 1e-3, whiten=True)
    assert torch.allclose(tiny, group_advantages(rewards, whiten=True), atol=1e-5)
    assert tiny.std().item() == pytest.approx(1.0, abs=1e-4)


def test_a_non_finite_score_leaves_its_row_out_and_the_other_groups_as_they_were():
    nan, inf = float("nan"), float("inf")
    reward = [1.0, 2.0, nan, 10.0, 10.0, 40.0, 5.0, 7.0, 9.0, nan, -inf, nan]
    gold = [0.1] * 6 + [0.1, nan, 0.1] + [0.1] * 3  # a gold scorer's NaN leaves the row out too
    valid, counts = finite_rows({"reward": reward, "gold_x": gold})
    assert valid.tolist() == [True, True, False, True, True, True, True, False, True, False, False, False]
    assert counts == {"reward": 4, "gold_x": 1}
    rewards = torch.tensor(reward).view(4, 3)
    adv = group_advantages(rewards, valid=valid.view(4, 3))
    assert torch.isfinite(adv).all()
    assert torch.equal(adv[0, :2], group_advantages(torch.tensor([[1.0, 2.0]]))[0])  # baseline of the valid two
    assert torch.equal(adv[1], group_advantages(torch.tensor([[10.0, 10.0, 40.0]]))[0])  # untouched group
    assert torch.equal(adv[2, [0, 2]], group_advantages(torch.tensor([[5.0, 9.0]]))[0])
    assert adv[~valid.view(4, 3)].eq(0).all()  # left-out rows, and the group with none valid, add nothing
    # whitening divides by the spread of the valid advantages only
    whitened = group_advantages(rewards, whiten=True, valid=valid.view(4, 3))
    kept = adv[valid.view(4, 3)]
    assert torch.allclose(whitened[valid.view(4, 3)], kept / (kept.std() + 1e-8), rtol=0, atol=1e-7)
    # without a mask, non-finite rewards are the rows left out
    assert torch.equal(group_advantages(rewards)[1], adv[1]) and torch.isfinite(group_advantages(rewards)).all()
    # a lone valid row is its own baseline: advantage 0, and whitening does not divide by a NaN std
    lone = torch.tensor([[3.0, nan]])
    assert group_advantages(lone, whiten=True).tolist() == [[0.0, 0.0]]


def test_clipped_policy_loss_clips_only_past_the_trust_region():
    old = torch.zeros(1, 3)
    mask = torch.tensor([[1.0, 1.0, 0.0]])  # the third token is padding
    # ratio 1.1 (inside 1 +- 0.2): the plain surrogate -ratio * A
    loss, _ = clipped_policy_loss(torch.log(torch.full((1, 3), 1.1)), old, torch.tensor([2.0]), mask)
    assert loss.item() == pytest.approx(-1.1 * 2.0)
    # ratio 2 with a positive advantage: capped at 1.2; with a negative advantage the pessimistic side is kept
    logp = torch.log(torch.full((1, 3), 2.0))
    loss, stats = clipped_policy_loss(logp, old, torch.tensor([1.0]), mask)
    assert loss.item() == pytest.approx(-1.2) and stats["policy/clip_fraction"] == 1.0
    loss, _ = clipped_policy_loss(logp, old, torch.tensor([-1.0]), mask)
    assert loss.item() == pytest.approx(2.0)
    # Dr.GRPO: a constant normaliser instead of the token count
    loss, _ = clipped_policy_loss(torch.log(torch.full((1, 3), 1.1)), old, torch.tensor([2.0]), mask, norm=4.0)
    assert loss.item() == pytest.approx(-1.1 * 2.0 * 2 / 4)


def test_k3_kl_is_zero_at_the_reference_and_matches_the_exact_kl_in_expectation():
    mask = torch.ones(1, 4)
    logp = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4]]))
    assert kl_to_reference(logp, logp, mask).item() == 0.0
    # sampling tokens from pi, the mean of k3 estimates KL(pi || ref)
    pi, ref = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.4, 0.4, 0.2])
    tokens = torch.multinomial(pi, 200_000, replacement=True, generator=torch.Generator().manual_seed(0))
    estimate = kl_to_reference(pi.log()[tokens][None], ref.log()[tokens][None], torch.ones(1, len(tokens)))
    assert estimate.item() == pytest.approx(float((pi * (pi / ref).log()).sum()), rel=0.02)


def _model_and_loss(dtype=torch.float32):
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(dtype)
    x, y = torch.randn(8, 3, dtype=dtype), torch.randn(8, 1, dtype=dtype)
    return net, lambda: ((net(x) - y) ** 2).mean()


def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def _gradient_and_hvp(loss_fn, params) -> tuple[torch.Tensor, torch.Tensor]:
    """grad L and H grad L (the gradient of the penalty 1/2 ||grad L||^2) by double backward, flattened."""
    grads = torch.autograd.grad(loss_fn(), params, create_graph=True)
    hvp = torch.autograd.grad(sum((g ** 2).sum() for g in grads) / 2, params)
    return _flat(grads).detach(), _flat(hvp)


@pytest.mark.parametrize("clip", ["shared", "separate"])
def test_gr_gradient_without_clipping_is_the_exact_gradient_of_the_penalised_loss(clip):
    net, loss_fn = _model_and_loss(torch.float64)
    params = list(net.parameters())
    gamma = 0.1
    g, hg = _gradient_and_hvp(loss_fn, params)
    before = [p.detach().clone() for p in params]
    gr, stats = gradient_regularized_grads(_grads(loss_fn, params), params, gamma, fd_eps=1e-5, max_norm=1e9,
                                           clip=clip)
    torch.testing.assert_close(_flat(gr), g + gamma * hg, rtol=0, atol=1e-5)
    assert (gamma * hg).abs().max() > 0.1  # the penalty term is not negligible: gamma being ignored would show
    # restored bit for bit, and the norms are logged
    assert all(torch.equal(p, q) for p, q in zip(params, before))
    assert stats["gr/g1_norm"] == pytest.approx(g.norm().item()) and stats["gr/g2_norm"] > 0


def test_gr_clipping_shared_keeps_the_norm_shrinking_correction_and_separate_loses_it():
    net, loss_fn = _model_and_loss(torch.float64)
    params = list(net.parameters())
    gamma, max_norm = 0.1, 0.5
    g, hg = _gradient_and_hvp(loss_fn, params)
    g1, exact = g * max_norm / g.norm(), hg * max_norm / g.norm()  # the clipped gradient, its correction H g1
    along = lambda v: float(v @ g1 / g1.norm())
    assert along(exact) > 1.0  # g1' H g1 > 0: a step along g1 grows the gradient norm
    corrections = {}
    for clip in ("shared", "separate"):
        gr, stats = gradient_regularized_grads(_grads(loss_fn, params), params, gamma, fd_eps=1e-5,
                                               max_norm=max_norm, clip=clip)
        assert min(stats["gr/g1_norm"], stats["gr/g2_norm"]) > 2 * max_norm  # both gradients are clipped
        corrections[clip] = (_flat(gr) - g1) / gamma
    # shared: the whole exact correction H g1, so the result is the penalised gradient scaled like g alone
    torch.testing.assert_close(corrections["shared"], exact, rtol=0, atol=1e-4)
    # separate: g1 and g2 of equal norm leave nothing along g1 but a tiny negative remainder
    assert -1e-3 * along(exact) < along(corrections["separate"]) <= 0.0
    with pytest.raises(ValueError, match="clip"):
        gradient_regularized_grads(_grads(loss_fn, params), params, gamma, clip="both")


def test_gr_with_gamma_zero_is_the_clipped_plain_gradient_and_frozen_params_stay_put():
    net, loss_fn = _model_and_loss()
    params = list(net.parameters())
    plain = torch.autograd.grad(loss_fn(), params)
    norm = torch.sqrt(sum((g ** 2).sum() for g in plain))
    gr, stats = gradient_regularized_grads(_grads(loss_fn, params), params, 0.0, max_norm=0.5)
    assert stats["gr/g1_norm"] == pytest.approx(norm.item(), rel=1e-6)
    for a, b in zip(gr, plain):
        assert torch.allclose(a, b * 0.5 / norm, atol=1e-6)
    # only the last layer perturbed: the first layer's correction still comes from the mixed Hessian term
    head_only = [False, False, True, True]
    gr_head, _ = gradient_regularized_grads(_grads(loss_fn, params), params, 0.1, perturb=head_only, max_norm=1e9)
    gr_all, _ = gradient_regularized_grads(_grads(loss_fn, params), params, 0.1, max_norm=1e9)
    assert not torch.allclose(gr_head[0], gr_all[0])
