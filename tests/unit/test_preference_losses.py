"""Bradley-Terry, CRM, DPO / IPO / Causal DPO: formulas, lambda = 0, variants, and the no-Ray rule."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import ray_crm.losses
from ray_crm.losses import (
    MMDConfig,
    binned_mmd_penalty,
    bradley_terry_loss,
    bt_calibration_scale,
    causal_dpo_loss,
    crm_loss,
    dpo_loss,
    ipo_loss,
)

B, M = 24, 5
MMD = MMDConfig(num_bins=M)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    chosen = torch.randn(B, generator=g, dtype=torch.float64, requires_grad=True)
    rejected = torch.randn(B, generator=g, dtype=torch.float64, requires_grad=True)
    bins_c, bins_r = torch.randint(0, M, (B,), generator=g), torch.randint(-1, M, (B,), generator=g)
    return chosen, rejected, bins_c, bins_r


def _grads(loss, *tensors):
    return torch.autograd.grad(loss, tensors)


def test_bradley_terry_formula_and_metrics(batch):
    chosen, rejected, *_ = batch
    loss, metrics = bradley_terry_loss(chosen, rejected)
    torch.testing.assert_close(loss, -torch.log(torch.sigmoid(chosen - rejected)).mean())
    assert metrics["reward/accuracy"].item() == pytest.approx((chosen > rejected).double().mean().item())
    assert all(not v.requires_grad for v in metrics.values())


def test_bradley_terry_is_finite_for_huge_margins():
    loss, _ = bradley_terry_loss(torch.tensor([-200.0, 200.0]), torch.tensor([200.0, -200.0]))
    assert torch.isfinite(loss) and loss.item() == pytest.approx(200.0)


@pytest.mark.parametrize("variant", ["unconditional", "conditional"])
def test_crm_with_lambda_zero_is_bradley_terry_bit_for_bit(batch, variant):
    chosen, rejected, bins_c, bins_r = batch
    bt, _ = bradley_terry_loss(chosen, rejected)
    crm, metrics = crm_loss(chosen, rejected, bins_c, bins_r, 0.0, variant, MMD)
    assert torch.equal(crm, bt)
    for a, b in zip(_grads(crm, chosen, rejected), _grads(bt, chosen, rejected)):
        assert torch.equal(a, b)
    assert metrics["mmd/penalty"] > 0  # still measured: it is the vanilla model's bias


def test_unconditional_crm_penalises_all_rewards_together(batch):
    chosen, rejected, bins_c, bins_r = batch
    loss, metrics = crm_loss(chosen, rejected, bins_c, bins_r, 0.3, "unconditional", MMD)
    penalty, _ = binned_mmd_penalty(torch.cat([chosen, rejected]), torch.cat([bins_c, bins_r]), MMD)
    want = bradley_terry_loss(chosen, rejected)[0] + 0.3 * penalty
    torch.testing.assert_close(loss, want)
    for a, b in zip(_grads(loss, chosen, rejected), _grads(want, chosen, rejected)):
        torch.testing.assert_close(a, b)
    torch.testing.assert_close(metrics["mmd/penalty"], penalty.detach())
    assert int(metrics["mmd/bin_counts"].sum()) == int((torch.cat([bins_c, bins_r]) >= 0).sum())


def test_conditional_crm_sums_chosen_and_rejected_penalties(batch):
    chosen, rejected, bins_c, bins_r = batch
    loss, metrics = crm_loss(chosen, rejected, bins_c, bins_r, 2.0, "conditional", MMD)
    pc, _ = binned_mmd_penalty(chosen, bins_c, MMD)
    pr, _ = binned_mmd_penalty(rejected, bins_r, MMD)
    want = bradley_terry_loss(chosen, rejected)[0] + 2.0 * (pc + pr)
    torch.testing.assert_close(loss, want)
    for a, b in zip(_grads(loss, chosen, rejected), _grads(want, chosen, rejected)):
        torch.testing.assert_close(a, b)
    assert {"mmd/chosen/pairs", "mmd/rejected/pairs", "mmd/penalty", "loss/total"} <= metrics.keys()


def test_crm_on_representations(batch):
    chosen, rejected, bins_c, bins_r = batch
    feats_c = torch.randn(B, 8, dtype=torch.float64, requires_grad=True)
    feats_r = torch.randn(B, 8, dtype=torch.float64)
    loss, _ = crm_loss(
        chosen, rejected, bins_c, bins_r, 1.0, mmd=MMD, chosen_features=feats_c, rejected_features=feats_r
    )
    penalty, _ = binned_mmd_penalty(torch.cat([feats_c, feats_r]), torch.cat([bins_c, bins_r]), MMD)
    torch.testing.assert_close(loss, bradley_terry_loss(chosen, rejected)[0] + penalty)
    assert _grads(loss, feats_c)[0].abs().sum() > 0


@pytest.mark.parametrize(
    "kwargs,match",
    [({"lam": -1.0}, "lam"), ({"variant": "joint"}, "variant"), ({"chosen_features": torch.zeros(B, 2)}, "both")],
)
def test_crm_rejects_bad_arguments(batch, kwargs, match):
    chosen, rejected, bins_c, bins_r = batch
    with pytest.raises(ValueError, match=match):
        crm_loss(chosen, rejected, bins_c, bins_r, **{"lam": 1.0, **kwargs})


@pytest.fixture
def logps():
    g = torch.Generator().manual_seed(1)
    policy = torch.randn(2, B, generator=g, dtype=torch.float64).mul(5).sub(40).requires_grad_(True)
    ref = torch.randn(2, B, generator=g, dtype=torch.float64).mul(5).sub(40)
    return policy[0], policy[1], ref[0], ref[1]


def test_dpo_formula(logps):
    pc, pr, rc, rr = logps
    loss, metrics = dpo_loss(pc, pr, rc, rr, beta=0.1)
    want = -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()
    torch.testing.assert_close(loss, want)
    torch.testing.assert_close(metrics["reward/chosen"], (0.1 * (pc - rc)).mean().detach())


def test_ipo_formula(logps):
    pc, pr, rc, rr = logps
    loss, _ = ipo_loss(pc, pr, rc, rr, beta=0.5)
    torch.testing.assert_close(loss, (((pc - rc) - (pr - rr)) - 1.0).square().mean())


def test_causal_dpo_adds_the_penalty_over_implicit_rewards(batch, logps):
    _, _, bins_c, bins_r = batch
    pc, pr, rc, rr = logps
    loss, _ = causal_dpo_loss(pc, pr, rc, rr, bins_c, bins_r, beta=0.1, lam=3.0, mmd=MMD)
    penalty, _ = binned_mmd_penalty(torch.cat([0.1 * (pc - rc), 0.1 * (pr - rr)]), torch.cat([bins_c, bins_r]), MMD)
    torch.testing.assert_close(loss, dpo_loss(pc, pr, rc, rr, beta=0.1)[0] + 3.0 * penalty)
    plain, _ = causal_dpo_loss(pc, pr, rc, rr, bins_c, bins_r, beta=0.1, lam=0.0, mmd=MMD)
    assert torch.equal(plain, dpo_loss(pc, pr, rc, rr, beta=0.1)[0])


def test_bf16_rewards_train(batch):
    chosen, rejected, bins_c, bins_r = batch
    c, r = chosen.detach().bfloat16().requires_grad_(True), rejected.detach().bfloat16().requires_grad_(True)
    loss, _ = crm_loss(c, r, bins_c, bins_r, 1.0, mmd=MMD)
    loss.backward()
    assert torch.isfinite(loss) and c.grad.dtype == torch.bfloat16 and torch.isfinite(c.grad).all()


def test_losses_package_imports_no_ray():
    for path in Path(ray_crm.losses.__file__).parent.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
            names += [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            assert not any(n == "ray" or n.startswith("ray.") for n in names), f"{path.name} imports {names}"


def test_registry_entries_are_the_named_losses_on_implicit_rewards(batch):
    from ray_crm.losses import PAIR_LOSSES, PairLossSettings, pair_loss

    pc, pr, bins_c, bins_r = batch
    g = torch.Generator().manual_seed(1)
    rc, rr = torch.randn(B, generator=g, dtype=torch.float64), torch.randn(B, generator=g, dtype=torch.float64)
    beta, lam = 0.2, 0.7
    s = PairLossSettings(lam=lam, variant="conditional", mmd=MMD, beta=beta)
    assert {"bt", "crm", "dpo", "ipo", "causal_dpo"} <= set(PAIR_LOSSES)
    references = {
        "dpo": lambda: dpo_loss(pc, pr, rc, rr, beta)[0],
        "ipo": lambda: ipo_loss(pc, pr, rc, rr, beta)[0],
        "causal_dpo": lambda: causal_dpo_loss(pc, pr, rc, rr, bins_c, bins_r, beta, lam, "conditional", MMD)[0],
        "crm": lambda: crm_loss(beta * (pc - rc), beta * (pr - rr), bins_c, bins_r, lam, "conditional", MMD)[0],
    }
    for name, reference in references.items():
        chosen, rejected = beta * (pc - rc), beta * (pr - rr)  # the trainer hands the registry implicit rewards
        loss, metrics = pair_loss(name)(chosen, rejected, bins_c, bins_r, s)
        expected = reference()
        assert torch.allclose(loss, expected, atol=1e-12), name
        assert torch.allclose(torch.stack(_grads(loss, pc, pr)), torch.stack(_grads(expected, pc, pr))), name
        assert "mmd/penalty" in metrics  # every loss measures the bias, trained on or not
    with pytest.raises(ValueError, match="unknown pair loss 'dop'.*causal_dpo"):
        pair_loss("dop")


def test_causal_dpo_at_lambda_zero_is_dpo_with_the_same_gradient(batch):
    from ray_crm.losses import PairLossSettings, pair_loss

    chosen, rejected, bins_c, bins_r = batch
    s = PairLossSettings(lam=0.0, mmd=MMD)
    a, ma = pair_loss("causal_dpo")(chosen, rejected, bins_c, bins_r, s)
    b, mb = pair_loss("dpo")(chosen, rejected, bins_c, bins_r, s)
    assert torch.equal(a, b) and torch.equal(ma["mmd/penalty"], mb["mmd/penalty"])
    assert all(torch.equal(x, y) for x, y in zip(_grads(a, chosen, rejected), _grads(b, chosen, rejected)))


def test_calibration_scale_recovers_the_log_odds_and_minimises_the_held_out_bt_loss():
    """Pairs preferred with log-odds 2x, scored with margins 0.05x: the scale is ~40, and it is the BT loss's
    minimum (a little more or less scores worse); pairs all ranked one way give no scale (1)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, generator=g, dtype=torch.float64)
    won = torch.rand(20000, generator=g, dtype=torch.float64) < torch.sigmoid(2 * x)
    margins = torch.where(won, 0.05 * x, -0.05 * x)
    c = bt_calibration_scale(margins)
    assert c == pytest.approx(40, rel=0.05)
    loss = lambda k: float(bradley_terry_loss(k * margins, torch.zeros_like(margins))[0])
    assert loss(c) < min(loss(0.95 * c), loss(1.05 * c), loss(1.0))
    assert bt_calibration_scale(torch.tensor([0.5, 1.0])) == bt_calibration_scale(torch.tensor([-1.0, 0.0])) == 1.0
