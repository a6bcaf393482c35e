"""Advantage estimators behind one signature, chosen by name from `ESTIMATORS`.

An estimator takes an `AdvantageInputs` (per-token rewards, the response mask and,
when it has a critic, the old values; the critic-free ones also read the group
layout, the sequence scores and which episodes were rated) and the stage's settings,
and returns (advantages, returns), both (batch, response_len) and 0 off the mask.
The driver never knows which one runs: a new estimator is a function here and a
line in ESTIMATORS, whose record also carries the estimator's default KL placement,
KL estimator (rl/kl.py) and loss aggregation (rl/losses.py).

References: Schulman et al. 2016 (GAE, arXiv:1506.02438); Huang et al. 2024, "The N+
implementation details of RLHF with PPO" (advantage whitening); Shao et al. 2024,
DeepSeekMath (GRPO, arXiv:2402.03300); Liu et al. 2025, "Understanding R1-Zero-Like
Training" (Dr. GRPO, arXiv:2503.20783); Ahmadian et al. 2024 (RLOO, arXiv:2402.14740)
and Kool et al. 2019 ("Buy 4 REINFORCE samples, get a baseline for free"); Hu 2025
(REINFORCE++, arXiv:2501.03262).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from rl.masked import masked_whiten
from rl.tokens import sequence_lengths


@dataclass
class AdvantageInputs:
    """What every estimator may read. Shapes: (batch, response_len)."""

    rewards: Tensor  # per-token rewards: -kl_coef * KL on every real token (when the KL is in the reward), the score added on the last
    mask: Tensor  # bool, true on real response tokens
    values: Tensor | None = None  # V_old(prefix), 0 off the mask; None for critic-free estimators
    scores: Tensor | None = None  # (batch,) the sequence score already in `rewards` on the last real token; 0 where unrated
    rated: Tensor | None = None  # (batch,) bool: some train reward source rated this episode; None = all rated
    group_size: int = 1  # K: episodes [g*K, (g+1)*K) answer the same prompt


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


# Critic-free estimators: the baseline is the other answers to the same prompt.
# Episodes no train reward source rated carry no signal: they are left out of their
# group's statistics and get advantage 0, as does a group with fewer than 2 rated.


def _groups(values: Tensor, inputs: AdvantageInputs) -> tuple[Tensor, Tensor, Tensor]:
    """values (batch,) as (groups, K), with rated (groups, K) and the rated count (groups, 1)."""
    batch, k = values.shape[0], inputs.group_size
    if k < 2 or batch % k:
        raise ValueError(f"group estimators need group_size >= 2 dividing the batch; got group_size {k}, batch {batch}")
    rated = torch.ones(batch, dtype=torch.bool, device=values.device) if inputs.rated is None else inputs.rated.bool()
    rated = rated.reshape(-1, k)
    return values.reshape(-1, k), rated, rated.sum(1, keepdim=True)


def _group_mean(values: Tensor, rated: Tensor, count: Tensor) -> Tensor:
    total = torch.where(rated, values, torch.zeros_like(values)).sum(1, keepdim=True)
    return total / count.clamp(min=1)


def _group_relative(inputs: AdvantageInputs, relative: Callable[[Tensor, Tensor, Tensor], Tensor]) -> tuple[Tensor, Tensor]:
    """R_i, the sum of row i's rewards, turned into a (groups, K) advantage by
    relative(R, rated, count) and put on every real token; returns = R_i there."""
    mask = inputs.mask.bool()
    rewards = torch.where(mask, inputs.rewards.detach(), torch.zeros_like(inputs.rewards))
    sequence_return = rewards.sum(1)
    grouped, rated, count = _groups(sequence_return, inputs)
    advantage = torch.where(rated & (count >= 2), relative(grouped, rated, count), torch.zeros_like(grouped))
    zeros = torch.zeros_like(rewards)
    return torch.where(mask, advantage.reshape(-1, 1), zeros), torch.where(mask, sequence_return[:, None], zeros)


def _standardised(returns: Tensor, rated: Tensor, count: Tensor) -> Tensor:
    mean = _group_mean(returns, rated, count)
    squares = torch.where(rated, (returns - mean) ** 2, torch.zeros_like(returns)).sum(1, keepdim=True)
    # Bessel-corrected, as TRL's nanstd and torch.std; with the 1e-4 a tied group gets 0, not 0/0.
    std = torch.sqrt(squares / (count - 1).clamp(min=1))
    return (returns - mean) / (std + 1e-4)


def _centred(returns: Tensor, rated: Tensor, count: Tensor) -> Tensor:
    return returns - _group_mean(returns, rated, count)


def _leave_one_out(returns: Tensor, rated: Tensor, count: Tensor) -> Tensor:
    total = torch.where(rated, returns, torch.zeros_like(returns)).sum(1, keepdim=True)
    return returns - (total - returns) / (count - 1).clamp(min=1)


def grpo(inputs: AdvantageInputs, settings) -> tuple[Tensor, Tensor]:
    """GRPO, outcome supervision (DeepSeekMath): (R_i - mean_g R) / (std_g R + 1e-4)
    on every real token."""
    return _group_relative(inputs, _standardised)


def dr_grpo(inputs: AdvantageInputs, settings) -> tuple[Tensor, Tensor]:
    """Dr. GRPO: R_i - mean_g R; dividing by the std would weigh most the prompts whose
    answers barely differ, the too easy and the too hard (Liu et al. 2025)."""
    return _group_relative(inputs, _centred)


def rloo(inputs: AdvantageInputs, settings) -> tuple[Tensor, Tensor]:
    """RLOO: R_i minus the mean of the other rated answers to its prompt, a baseline
    independent of R_i, so the estimate stays unbiased (Kool et al. 2019)."""
    return _group_relative(inputs, _leave_one_out)


def reinforce_baseline(inputs: AdvantageInputs, settings) -> tuple[Tensor, Tensor]:
    """REINFORCE++-baseline (Hu 2025): the group mean of the scores subtracted at the
    last real token, returns-to-go with gamma 1, advantages whitened over the real
    tokens of the rows that got a baseline; returns are the raw returns-to-go."""
    if inputs.scores is None:
        raise ValueError("reinforce_baseline needs inputs.scores, the sequence scores")
    mask = inputs.mask.bool()
    rewards = torch.where(mask, inputs.rewards.detach(), torch.zeros_like(inputs.rewards))
    grouped, rated, count = _groups(inputs.scores.detach().to(rewards.dtype), inputs)
    has_baseline = rated & (count >= 2)
    baseline = torch.where(has_baseline, _group_mean(grouped, rated, count), torch.zeros_like(grouped)).reshape(-1)
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, sequence_lengths(mask) - 1] -= baseline
    returns = torch.where(mask, rewards.flip(1).cumsum(1).flip(1), torch.zeros_like(rewards))
    trained = mask & has_baseline.reshape(-1, 1)
    if not trained.any():
        return torch.zeros_like(returns), returns
    return masked_whiten(returns, trained), returns


@dataclass(frozen=True)
class Estimator:
    estimate: Callable[[AdvantageInputs, object], tuple[Tensor, Tensor]]
    needs_values: bool
    """True: the run trains a value model, and `inputs.values` holds its old values."""
    needs_groups: bool = False
    """True: the baseline comes from the other answers to a prompt (samples_per_prompt >= 2)."""
    kl_penalty: str = "reward"
    """Default KL placement: "reward" (shaped per token into the rewards) or "loss" (a term beside the policy loss)."""
    kl_estimator: str = "k1"
    """Default KL estimator, a name in rl/kl.py's KL_ESTIMATORS."""
    aggregation: str = "token_mean"
    """Default loss aggregation, a name in rl/losses.py's AGGREGATIONS."""
    kl_bias_correction: bool = False
    """Default for a KL loss term: weighted by pi / pi_old, so that its gradient is the
    reverse KL's (rl/losses.py's kl_loss)."""


# The defaults follow each method's anchor: DeepSeekMath and TRL's GRPOTrainer (k3 loss
# term, per-sequence mean, and, as in TRL 1.16, the bias-corrected KL gradient of
# DeepSeek-V3.2), TRL's loss_type="dr_grpo", TRL's RLOOTrainer (k1 in the reward, the
# answer's summed log-prob as one action), OpenRLHF's REINFORCE++-baseline example (k2 loss term).
ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator(whitened_gae, needs_values=True),
    "grpo": Estimator(grpo, needs_values=False, needs_groups=True, kl_penalty="loss", kl_estimator="k3", aggregation="sequence_mean", kl_bias_correction=True),
    "dr_grpo": Estimator(dr_grpo, needs_values=False, needs_groups=True, kl_penalty="loss", kl_estimator="k3", aggregation="constant", kl_bias_correction=True),
    "rloo": Estimator(rloo, needs_values=False, needs_groups=True, aggregation="sequence_sum"),
    "reinforce_baseline": Estimator(reinforce_baseline, needs_values=False, needs_groups=True, kl_penalty="loss", kl_estimator="k2"),
}
