"""Mirror pair weights and resampling: Z's direction teaches the balanced BT loss nothing, the content still does."""

import numpy as np
import pytest
import torch

from ray_crm.config import load_config, run_name
from ray_crm.losses import bradley_terry_loss, crm_loss, mirror_balance_weights, mirror_resample_index


def test_each_stratum_weighs_as_much_as_its_mirror():
    # 80 pairs with the phrase (bin 1) on the chosen side only, 20 on the rejected side, 30 in equal bins,
    # 5 in a stratum (2, 0) whose mirror never occurs
    chosen = np.array([1] * 80 + [0] * 20 + [0] * 10 + [1] * 20 + [2] * 5)
    rejected = np.array([0] * 80 + [1] * 20 + [0] * 10 + [1] * 20 + [0] * 5)
    w = mirror_balance_weights(chosen, rejected)
    assert w.mean() == pytest.approx(1.0)
    assert w[:80].sum() == pytest.approx(w[80:100].sum())  # the two directions now weigh the same
    assert w[:100].sum() == pytest.approx(100 * w[100])  # and together as much as before, relative to the rest
    assert np.allclose(w[100:], w[100])  # equal bins and the mirrorless stratum keep their (common) weight


def test_already_balanced_data_gets_unit_weights():
    chosen, rejected = np.array([0, 1, 2, 1, 0, 2]), np.array([1, 0, 1, 2, 2, 0])
    assert np.allclose(mirror_balance_weights(chosen, rejected), 1.0)
    with pytest.raises(ValueError, match="one length"):
        mirror_balance_weights(chosen, rejected[:3])


def test_the_weighted_loss_has_no_gradient_along_z_direction_but_keeps_the_content():
    """Reward r = a * z + b * x (z: the phrase, x: the content). Labels follow the content; the phrase sits on the
    chosen side in 80% of pairs. At a = b = 0 the unweighted BT gradient pulls a up; the mirror-weighted one
    does not move a at all, and still pulls b up."""
    rng = np.random.default_rng(0)
    n = 500
    phrase_on_chosen = rng.random(n) < 0.8
    zc, zr = phrase_on_chosen.astype(float), (~phrase_on_chosen).astype(float)
    xc, xr = rng.normal(1.0, 1.0, n), rng.normal(0.0, 1.0, n)
    params = torch.zeros(2, requires_grad=True)

    def grad(weights):
        params.grad = None
        chosen = params[0] * torch.tensor(zc) + params[1] * torch.tensor(xc)
        rejected = params[0] * torch.tensor(zr) + params[1] * torch.tensor(xr)
        bradley_terry_loss(chosen, rejected, weights)[0].backward()
        return params.grad.clone()

    plain = grad(None)
    weighted = grad(torch.tensor(mirror_balance_weights(zc.astype(int), zr.astype(int))))
    assert plain[0] < -0.1 and abs(float(weighted[0])) < 1e-12
    assert weighted[1] < -0.1


def test_unit_weights_leave_the_losses_bit_for_bit():
    torch.manual_seed(0)
    chosen, rejected = torch.randn(12), torch.randn(12)
    bins_c, bins_r = torch.randint(0, 3, (12,)), torch.randint(0, 3, (12,))
    assert torch.equal(bradley_terry_loss(chosen, rejected)[0], bradley_terry_loss(chosen, rejected, torch.ones(12))[0])
    plain, _ = crm_loss(chosen, rejected, bins_c, bins_r, 0.5)
    ones, _ = crm_loss(chosen, rejected, bins_c, bins_r, 0.5, weights=torch.ones(12))
    assert torch.equal(plain, ones)
    twice, _ = crm_loss(chosen, rejected, bins_c, bins_r, 0.0, weights=torch.full((12,), 2.0))
    assert torch.allclose(twice, 2 * bradley_terry_loss(chosen, rejected)[0])


def test_balance_is_in_the_run_name_only_when_set_and_refused_by_ipo():
    plain = load_config(None, ["loss.type=crm", "loss.lambda_mmd=1"])
    explicit = load_config(None, ["loss.type=crm", "loss.lambda_mmd=1", "loss.balance=none"])
    mirror = load_config(None, ["loss.type=crm", "loss.lambda_mmd=1", "loss.balance=mirror"])
    assert run_name(plain) == run_name(explicit) and "-mirror-" not in run_name(plain)
    assert "-l1-mirror-" in run_name(mirror) and run_name(mirror) != run_name(plain)
    with pytest.raises(Exception, match="balance"):
        load_config(None, ["loss.type=ipo", "loss.balance=mirror"])
    sampled = load_config(None, ["loss.type=ipo", "loss.balance=mirror_sample"])  # unweighted: ipo takes it
    assert "-mirror_sample-" in run_name(sampled)


def test_resampling_balances_the_strata_and_is_fixed_by_the_seed():
    # the phrase (bin 1) on the chosen side in 800 pairs, on the rejected side in 40, 160 pairs in equal bins
    chosen = np.array([1] * 800 + [0] * 40 + [0] * 160)
    rejected = np.array([0] * 800 + [1] * 40 + [0] * 160)
    idx = mirror_resample_index(chosen, rejected, seed=3)
    assert len(idx) == 1000 and np.array_equal(idx, mirror_resample_index(chosen, rejected, seed=3))
    assert not np.array_equal(idx, mirror_resample_index(chosen, rejected, seed=4))
    on_chosen, on_rejected, equal = (idx < 800).sum(), ((idx >= 800) & (idx < 840)).sum(), (idx >= 840).sum()
    # expected 420 / 420 / 160: binomial sd ~16, so 5 sd of room
    assert abs(on_chosen - on_rejected) < 100 and abs(equal - 160) < 60
    assert len(np.unique(idx[(idx >= 800) & (idx < 840)])) > 35  # the rare stratum is repeated, not dropped


def test_a_z_of_the_prompt_has_nothing_to_balance_and_unknown_bins_keep_unit_weight():
    same = np.array([0, 1, 1, 0, 2])
    with pytest.raises(ValueError, match="a Z of the prompt"):
        mirror_balance_weights(same, same)
    chosen, rejected = np.array([1, 1, 1, 0, -1, 1]), np.array([0, 0, 0, 1, 0, -1])
    w = mirror_balance_weights(chosen, rejected)
    assert w[:3].sum() == pytest.approx(w[3]) and w[4] == pytest.approx(w[5])  # unknown bins: weight 1 before rescaling
    assert w[3] == pytest.approx(2 * w[4])  # the lone (0, 1) pair stands for (1 + 3) / 2 pairs; unknown ones for 1
    assert mirror_balance_weights(np.array([], dtype=int), np.array([], dtype=int)).size == 0
