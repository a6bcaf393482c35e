"""From reward-model scores to per-token rewards: normalisation, the missing-EOS
penalty, the per-token KL penalty (Ziegler et al. 2019, arXiv:1909.08593) and the
controllers that set its coefficient.

All (batch,) or (batch, response_len); pure torch.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rl.kl import per_token_kl as kl_estimate
from rl.masked import masked_whiten
from rl.tokens import sequence_lengths
from rl.trajectory import Rollout


def per_token_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor) -> Tensor:
    """k1 estimator of KL(pi || pi_ref) per token, log pi - log pi_ref, 0 off the mask.

    All (batch, response_len). k1 is unbiased per sample, and its sum over a sampled
    response is exactly that response's log density ratio (the reward penalty).
    The estimators themselves live in rl/kl.py.
    """
    return kl_estimate(logprobs, ref_logprobs, mask, "k1")


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


# The KL coefficient: fixed, or steered toward a target KL.


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


def ppo_rewards(batch: Rollout, settings, stats: tuple[float, float] | None, kl_coef: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Step 2 of PPO for one rollout: the score standardised with the reward model's
    held-out `stats` (and clipped to +-settings.score_clip), minus the missing-EOS
    penalty, on the last real token; -kl_coef * KL on every real token; whitened
    without moving their mean if settings.whiten_rewards.

    Returns (scores (batch,), rewards, non_score_rewards, kl), the last three
    (batch, response_len)."""
    scores = normalize_scores(batch.scores, stats, settings.score_clip)
    scores = penalize_missing_eos(scores, batch.ended, settings.missing_eos_penalty)
    kl = per_token_kl(batch.logprobs, batch.ref_logprobs, batch.response_mask)
    rewards, non_score = shaped_rewards(scores, kl, kl_coef, batch.response_mask)
    if settings.whiten_rewards:
        rewards = masked_whiten(rewards, batch.response_mask, shift_mean=False)
    return scores, rewards, non_score, kl
