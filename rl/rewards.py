"""From reward sources' ratings to per-token rewards: normalisation (held-out or
running), the weighted sum of the train sources, the missing-EOS penalty, the per-token
KL penalty (Ziegler et al. 2019, arXiv:1909.08593) and the controllers that set its
coefficient.

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


def ppo_rewards(batch: Rollout, settings, kl_coef: float) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Step 2 for one rollout whose train reward `batch.scores` is already standardised
    and summed (`combine_ratings`): clipped to +-settings.score_clip, minus the
    missing-EOS penalty, on the last real token; -kl_coef * KL (k1) on every real token
    (kl_coef 0 when the KL is a loss term instead); whitened without moving their mean
    if settings.whiten_rewards.

    Returns (scores (batch,), rewards, non_score_rewards, kl), the last three
    (batch, response_len); kl is the k1 estimate, whatever the coefficient."""
    scores = normalize_scores(batch.scores, None, settings.score_clip)
    scores = penalize_missing_eos(scores, batch.ended, settings.missing_eos_penalty)
    kl = per_token_kl(batch.logprobs, batch.ref_logprobs, batch.response_mask)
    rewards, non_score = shaped_rewards(scores, kl, kl_coef, batch.response_mask)
    if settings.whiten_rewards:
        rewards = masked_whiten(rewards, batch.response_mask, shift_mean=False)
    return scores, rewards, non_score, kl


# Several reward sources: each standardised on its own, then weighted and summed.


class RunningMoments:
    """Mean and variance of every value seen so far (Chan et al.'s parallel update, exact
    for any split into batches), checkpointed with the run. A reward function's scale
    is unknown in advance, so its ratings are standardised by what it has given."""

    def __init__(self):
        self.count, self.mean, self.m2 = 0, 0.0, 0.0

    def update(self, values: Tensor) -> None:
        """Take in a batch; NaN (unrated) values are skipped."""
        values = values[~torch.isnan(values)].double()
        n = len(values)
        if n == 0:
            return
        batch_mean = values.mean().item()
        batch_m2 = ((values - batch_mean) ** 2).sum().item()
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * n / total
        self.m2 += batch_m2 + delta**2 * self.count * n / total
        self.count = total

    def mean_std(self) -> tuple[float, float]:
        """(mean, std) with Bessel's correction; std 1 until two values differ, so an early
        run of equal ratings (every answer wrong) is centred, not blown up."""
        if self.count < 2 or self.m2 <= 1e-12:
            return self.mean, 1.0
        return self.mean, (self.m2 / (self.count - 1)) ** 0.5

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = int(state["count"]), float(state["mean"]), float(state["m2"])


def combine_ratings(ratings: Tensor, means: Tensor, stds: Tensor, weights: Tensor) -> tuple[Tensor, Tensor]:
    """The train reward from several sources' ratings.

    ratings: (batch, sources), NaN where a source could not rate; means, stds, weights:
    (sources,), weight 0 for a source that only audits. Each rating is standardised,
    (r - mean) / std, weighted and summed over the sources that rated the episode, so
    an unrated source counts as its mean. Returns (scores (batch,), rated (batch,)
    bool: some weighted source rated the episode; its score is 0 otherwise)."""
    standard = (ratings - means) / stds * weights
    counts = ~torch.isnan(ratings) & (weights != 0)
    scores = torch.where(counts, standard, torch.zeros_like(standard)).sum(1)
    return scores, counts.any(1)
