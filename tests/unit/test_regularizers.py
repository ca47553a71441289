"""The regularizer registry: every name the config accepts is registered, and each entry runs its estimator."""

from __future__ import annotations

import contextlib
import typing

import pytest
import torch

from ray_crm.config import RLConfig
from ray_crm.rl.policy_losses import gradient_regularized_grads
from ray_crm.rl.regularizers import REGULARIZERS, regularizer


def test_every_configurable_regularizer_is_registered():
    names = typing.get_args(RLConfig.model_fields["regularizer"].annotation)
    assert set(names) == set(REGULARIZERS)
    with pytest.raises(ValueError, match="unknown regularizer 'lk'.*gr, kl, none, reset"):
        regularizer("lk")


def test_entries_say_what_the_learner_does():
    assert not REGULARIZERS["none"].uses_reference and REGULARIZERS["kl"].uses_reference
    assert REGULARIZERS["reset"].resets_reference and not REGULARIZERS["kl"].resets_reference
    assert REGULARIZERS["gr"].perturbs_blocks and "gr/g1_norm" in REGULARIZERS["gr"].metrics


def test_gr_entry_is_the_finite_difference_estimator_with_the_config_settings():
    w = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)

    def grad_fn():
        return torch.autograd.grad((w**4).sum() + (w[0] * w[1]), [w])

    cfg = RLConfig(regularizer="gr", gr_gamma=0.3, gr_fd_eps=1e-2, gr_g_clip=5.0, gr_clip="separate")
    ours, stats = regularizer("gr").estimator(grad_fn, [w], cfg, [True], contextlib.nullcontext)
    expected, _ = gradient_regularized_grads(grad_fn, [w], 0.3, 1e-2, 5.0, [True], clip="separate")
    assert torch.equal(ours[0], expected[0]) and stats["gr/g1_norm"] > 5.0
    plain, none_stats = regularizer("none").estimator(grad_fn, [w], RLConfig(regularizer="none"), [True],
                                                   contextlib.nullcontext)
    assert torch.equal(plain[0], grad_fn()[0]) and none_stats == {}
