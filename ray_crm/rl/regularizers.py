"""Policy-update regularizers by name: what `rl.regularizer` selects, as verl's `core_algos` registers losses.

A regularizer says how the learner turns the loss's gradient into the update: whether the loss carries a KL to a
reference snapshot (and when that snapshot is renewed), and which gradient estimator runs (plain, or GR's
finite-difference gradient of L + gamma/2 ||grad L||^2). Plain torch, no Ray. A new regularizer is one entry
here (and its name in `RLConfig.regularizer`), not a change to the learner.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from torch import Tensor

from ray_crm.rl.policy_losses import Editor, gradient_regularized_grads

if TYPE_CHECKING:
    from ray_crm.config import RLConfig

GradFn = Callable[[], Sequence[Tensor]]
# (gradient function, parameters, config, which parameters GR may move, the context for writing to them)
Estimator = Callable[[GradFn, Sequence[Tensor], "RLConfig", Sequence[bool], Editor],
                     tuple[list[Tensor], dict[str, float]]]


def plain_gradient(grad_fn: GradFn, params: Sequence[Tensor], cfg: RLConfig, perturb: Sequence[bool],
                   edit: Editor) -> tuple[list[Tensor], dict[str, float]]:
    return list(grad_fn()), {}


def gr_gradient(grad_fn: GradFn, params: Sequence[Tensor], cfg: RLConfig, perturb: Sequence[bool],
                edit: Editor) -> tuple[list[Tensor], dict[str, float]]:
    """GR's estimator with the config's gamma, finite-difference step, norm clip and clip mode."""
    return gradient_regularized_grads(grad_fn, params, cfg.gr_gamma, cfg.gr_fd_eps, cfg.gr_g_clip, perturb,
                                      clip=cfg.gr_clip, edit=edit)


@dataclass(frozen=True)
class Regularizer:
    estimator: Estimator = plain_gradient
    uses_reference: bool = False  # the loss adds rl.kl_beta * KL(policy || a snapshot of the trainable tensors)
    resets_reference: bool = False  # the snapshot is taken again every rl.reset_every steps
    perturbs_blocks: bool = False  # needs trainable transformer-block parameters to perturb
    metrics: tuple[str, ...] = ()  # what its step adds to the learner's statistics (rl.csv columns)


REGULARIZERS: dict[str, Regularizer] = {
    "none": Regularizer(),
    "kl": Regularizer(uses_reference=True, metrics=("policy/kl_to_reference",)),  # reference: the initial policy
    "reset": Regularizer(uses_reference=True, resets_reference=True, metrics=("policy/kl_to_reference",)),
    "gr": Regularizer(estimator=gr_gradient, perturbs_blocks=True, metrics=("gr/g1_norm", "gr/g2_norm")),
}


def regularizer(name: str) -> Regularizer:
    try:
        return REGULARIZERS[name]
    except KeyError:
        raise ValueError(f"unknown regularizer {name!r}; registered: {', '.join(sorted(REGULARIZERS))}") from None
