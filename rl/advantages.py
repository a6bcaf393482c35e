"""Advantage estimators behind one signature, chosen by name from `ESTIMATORS`.

An estimator takes an `AdvantageInputs` (per-token rewards, the response mask and,
when it has a critic, the old values) and the stage's settings, and returns
(advantages, returns), both (batch, response_len) and 0 off the mask. The driver
never knows which one runs; a new estimator is a function here and a line in the
table (with `needs_values=False` when it has no critic).

References: Schulman et al. 2016 (GAE, arXiv:1506.02438); Huang et al. 2024, "The N+
implementation details of RLHF with PPO" (advantage whitening).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rl.masked import masked_whiten


@dataclass
class AdvantageInputs:
    """What every estimator may read. Shapes: (batch, response_len)."""

    rewards: Tensor  # per-token rewards: -kl_coef * KL on every real token, the score added on the last
    mask: Tensor  # bool, true on real response tokens
    values: Tensor | None = None  # V_old(prefix), 0 off the mask; None for critic-free estimators


def gae(rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, lam: float) -> tuple[Tensor, Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2016) over response tokens.

    rewards, values, mask: (batch, response_len). The episode ends at the last real
    token, so V beyond it counts as 0. Returns (advantages, returns), both
    (batch, response_len), 0 off the mask; returns = advantages + values.
    """
    # Both are targets for the losses: no gradient may flow back through them.
    rewards, values = rewards.detach(), values.detach()
    m = mask.to(values.dtype)
    values = torch.where(mask.bool(), values, torch.zeros_like(values))
    response_len = rewards.shape[1]
    next_value = torch.zeros_like(values[:, 0])
    next_mask = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    reversed_advs = []
    for t in reversed(range(response_len)):
        delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]
        next_adv = delta + gamma * lam * next_mask * next_adv
        reversed_advs.append(next_adv)
        next_value, next_mask = values[:, t], m[:, t]
    advantages = torch.stack(reversed_advs[::-1], dim=1)
    advantages = torch.where(mask.bool(), advantages, torch.zeros_like(advantages))
    return advantages, advantages + values


def whitened_gae(inputs: AdvantageInputs, settings) -> tuple[Tensor, Tensor]:
    """GAE with `settings.gamma` and `settings.lam`, advantages whitened over the batch's
    real tokens (returns stay raw: they are the value's targets)."""
    advantages, returns = gae(inputs.rewards, inputs.values, inputs.mask, settings.gamma, settings.lam)
    return masked_whiten(advantages, inputs.mask), returns


@dataclass(frozen=True)
class Estimator:
    estimate: Callable[[AdvantageInputs, object], tuple[Tensor, Tensor]]
    needs_values: bool
    """True: the run trains a value model, and `inputs.values` holds its old values."""


ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(whitened_gae, needs_values=True),
}
