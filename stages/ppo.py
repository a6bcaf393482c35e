"""The math of PPO for RLHF: masking, reward shaping, GAE, the clipped losses and the
KL-coefficient controllers. Pure torch, no model code, so every piece is testable
on hand-written tensors.

Conventions. Responses are right-padded, shape (batch, response_len). `mask` is 1
for real response tokens up to and including the first EOS and 0 after it. The pad
id may equal the EOS id, so positions always come from `truncate_after_eos`, never
from searching for pad.

References: Schulman et al. 2017 (PPO, arXiv:1707.06347), Schulman et al. 2016
(GAE, arXiv:1506.02438), Ziegler et al. 2019 (arXiv:1909.08593), Huang et al. 2024,
"The N+ implementation details of RLHF with PPO".
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

INVALID_LOGPROB = 1.0
"""Written into logprob positions past the response, where no token was sampled."""


# ----------------------------------------------------------------------------- masking


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of `values` where `mask` is true; over everything when `dim` is None.

    values, mask: same shape, e.g. (batch, response_len).
    """
    mask = mask.bool()
    # where, not multiply: masked positions may hold inf/nan and 0 * inf is nan.
    total = torch.where(mask, values, torch.zeros_like(values))
    if dim is None:
        return total.sum() / mask.sum()
    return total.sum(dim) / mask.sum(dim)


def masked_var(values: Tensor, mask: Tensor, unbiased: bool = True) -> Tensor:
    """Variance (a scalar) of `values` over all positions where `mask` is true."""
    mask = mask.bool()
    count = mask.sum()
    if count == 0:
        raise ValueError("masked_var: the mask selects no positions")
    centered = values - masked_mean(values, mask)
    var = masked_mean(centered**2, mask)
    if unbiased and count > 1:
        var = var * count / (count - 1)
    return var


def masked_whiten(values: Tensor, mask: Tensor, shift_mean: bool = True) -> Tensor:
    """(values - mean) / std over the masked positions; masked-out positions become 0.

    With shift_mean=False the mean is added back: the rewards are rescaled without
    moving their mean, which would change what the policy is rewarded for (N+ details).
    """
    mask = mask.bool()
    mean = masked_mean(values, mask)
    whitened = (values - mean) * torch.rsqrt(masked_var(values, mask) + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros_like(whitened))


def truncate_after_eos(responses: Tensor, eos_token_id: int, pad_token_id: int) -> tuple[Tensor, Tensor, Tensor]:
    """Cut every response after its first EOS.

    responses: (batch, response_len) long.
    Returns (responses, mask, ended): responses with every token after the first
    EOS set to pad; mask (batch, response_len) bool, true up to and including that
    EOS; ended (batch,) bool, whether the row had an EOS at all.
    """
    is_eos = (responses == eos_token_id).long()
    # A position is real when no EOS came strictly before it, which keeps the first
    # EOS itself and works whatever the pad id is.
    eos_before = is_eos.cumsum(dim=1) - is_eos
    mask = eos_before == 0
    return responses.masked_fill(~mask, pad_token_id), mask, is_eos.bool().any(dim=1)


def sequence_lengths(mask: Tensor) -> Tensor:
    """(batch,) long: real tokens per row; the last real token sits at length - 1."""
    return mask.long().sum(dim=1)


# ------------------------------------------------------------------------ log-probs


def logprobs_from_logits(logits: Tensor, tokens: Tensor, temperature: float = 1.0) -> Tensor:
    """log pi(token_t) under softmax(logits / temperature).

    logits: (batch, response_len, vocab), aligned so logits[:, t] predicts tokens[:, t].
    tokens: (batch, response_len). Returns (batch, response_len) float32.
    """
    # The temperature must match sampling, or the ratio is off before any update.
    # float32: bf16 log_softmax is too coarse for ratios near 1.
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return logp.gather(-1, tokens.long().unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """Entropy of softmax(logits / temperature). logits: (batch, response_len, vocab);
    returns (batch, response_len)."""
    logp = F.log_softmax(logits.float() / temperature, dim=-1)
    return -(logp.exp() * logp).sum(dim=-1)


# ------------------------------------------------------------------------- rewards


def per_token_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """k1 estimator of KL(pi || pi_ref) per token, log pi - log pi_ref, 0 off the mask.

    All (batch, response_len). k1 is unbiased per sample, and its sum over a sampled
    response is exactly that response's log density ratio (the reward penalty).
    """
    kl = logprobs - ref_logprobs
    return torch.where(mask.bool(), kl, torch.zeros_like(kl))


def normalize_scores(scores: Tensor, mean_std: tuple[float, float] | None, clip: float | None) -> Tensor:
    """(scores - mean) / std with the reward model's held-out statistics, so an SFT-like
    completion scores about 0 (InstructGPT's bias); then clipped to +-clip if given."""
    if mean_std is not None:
        scores = (scores - mean_std[0]) / mean_std[1]
    if clip is not None:
        scores = scores.clamp(-clip, clip)
    return scores


def penalize_missing_eos(scores: Tensor, ended: Tensor, penalty: float) -> Tensor:
    """scores (batch,) minus `penalty` where ended (batch,) is false; a new tensor.

    Without it the policy learns to ramble up to the length cap (N+ details).
    """
    return scores - penalty * (~ended.bool()).to(scores.dtype)


def shaped_rewards(scores: Tensor, kl: Tensor, kl_coef: float, mask: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token rewards: -kl_coef * kl on every real token, plus the reward model's
    score on the last real token (Ziegler et al. 2019).

    scores: (batch,). kl, mask: (batch, response_len).
    Returns (rewards, non_score_rewards), both (batch, response_len).
    """
    mask = mask.bool()
    lengths = sequence_lengths(mask)
    if (lengths == 0).any():
        raise ValueError("shaped_rewards: a row has no response token to carry its score")
    non_score = torch.where(mask, -kl_coef * kl, torch.zeros_like(kl))
    rewards = non_score.clone()
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, lengths - 1] += scores.to(rewards.dtype)
    return rewards, non_score


# ---------------------------------------------------------------------------- GAE


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


# --------------------------------------------------------------------------- losses


def policy_loss(
    logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017), a scalar to minimise.

    All inputs (batch, response_len). stats holds detached 0-dim tensors: clipfrac,
    approx_kl, ratio_mean, ratio_max, ratio_min.
    """
    mask = mask.bool()
    # Zero the log-ratio off the mask: exp of junk there would be inf, and inf in the
    # unselected branch of a where still turns the gradient into nan.
    logratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))
    ratio = torch.exp(logratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_mean(torch.max(unclipped, clipped), mask)
    with torch.no_grad():
        real_ratio = ratio[mask]
        stats = {
            "clipfrac": masked_mean((clipped > unclipped).float(), mask),
            # Schulman's k2, 0.5 * (log r)^2: low variance, always >= 0 (N+ details).
            "approx_kl": masked_mean(0.5 * logratio**2, mask),
            "ratio_mean": masked_mean(ratio, mask),
            "ratio_max": real_ratio.max(),
            "ratio_min": real_ratio.min(),
        }
    return loss, stats


def value_loss(
    values: Tensor, old_values: Tensor, returns: Tensor, mask: Tensor, clip_range: float
) -> tuple[Tensor, dict[str, Tensor]]:
    """Clipped value loss, 0.5 * the worse of the plain and clipped squared errors.

    All inputs (batch, response_len). stats holds detached 0-dim tensors: vf_clipfrac,
    value_mean, explained_variance (nan when the returns have no variance).
    """
    mask = mask.bool()
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    plain = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_mean(torch.max(plain, clipped), mask)
    with torch.no_grad():
        var_returns = masked_var(returns, mask)
        explained = 1.0 - masked_var(returns - values, mask) / var_returns
        stats = {
            "vf_clipfrac": masked_mean((clipped > plain).float(), mask),
            "value_mean": masked_mean(values, mask),
            "explained_variance": torch.where(var_returns > 0, explained, torch.full_like(explained, float("nan"))),
        }
    return loss, stats


# ----------------------------------------------------------------- KL controllers


class FixedKLController:
    """A constant KL coefficient, with the adaptive controller's interface."""

    def __init__(self, kl_coef: float):
        self.value = float(kl_coef)

    def update(self, current_kl: float, n_steps: int) -> None:
        pass

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


class AdaptiveKLController(FixedKLController):
    """Steers the KL coefficient so the policy's KL to the reference nears `target`."""

    # Ziegler et al. 2019, "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593.

    def __init__(self, init_kl_coef: float, target: float, horizon: float):
        if target <= 0 or horizon <= 0:
            raise ValueError(f"target and horizon must be positive, got {target} and {horizon}")
        super().__init__(init_kl_coef)
        self.target = float(target)
        self.horizon = float(horizon)

    def update(self, current_kl: float, n_steps: int) -> None:
        # The clip keeps one wild KL estimate from moving the coefficient by more than 20% per horizon.
        proportional_error = min(max(float(current_kl) / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + proportional_error * n_steps / self.horizon
