"""PPO's clipped losses (Schulman et al. 2017, arXiv:1707.06347) and the KL loss term,
each returning (loss to minimise, detached stats). Inputs are (batch, response_len);
only real tokens count.

How per-token terms become one scalar is kept apart from the terms themselves
(`AGGREGATIONS`, as OpenRLHF's aggregate_loss): the token mean weighs every token
alike; the sequence mean (DeepSeekMath eq. 3) weighs every response alike, so a
long response's tokens count less; the constant (Dr. GRPO, Liu et al. 2025,
arXiv:2503.20783) divides the token sum by rows * max_len, which removes that
length bias without making the scale depend on the batch's lengths; the sequence sum
(RLOO, Ahmadian et al. 2024, arXiv:2402.14740, and TRL's RLOOTrainer) treats a whole
response as one action, its log-probability the sum of its tokens', averaged over rows.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from rl.kl import per_token_kl
from rl.masked import masked_mean, masked_var


def token_mean(values: Tensor, mask: Tensor, max_len: int) -> Tensor:
    """Mean over all real tokens of the batch."""
    return masked_mean(values, mask)


def sequence_mean(values: Tensor, mask: Tensor, max_len: int) -> Tensor:
    """Mean over each row's real tokens, then over rows (every row has one)."""
    return masked_mean(values, mask, dim=1).mean()


def constant(values: Tensor, mask: Tensor, max_len: int) -> Tensor:
    """Sum over real tokens / (rows * max_len)."""
    if values.shape[1] > max_len:
        raise ValueError(f"constant aggregation: {values.shape[1]} response tokens exceed max_len {max_len}")
    total = torch.where(mask.bool(), values, torch.zeros_like(values)).sum()
    return total / (values.shape[0] * max_len)


def sequence_sum(values: Tensor, mask: Tensor, max_len: int) -> Tensor:
    """Sum over each row's real tokens, then the mean over rows."""
    return torch.where(mask.bool(), values, torch.zeros_like(values)).sum(1).mean()


AGGREGATIONS: dict[str, Callable[[Tensor, Tensor, int], Tensor]] = {
    "token_mean": token_mean,
    "sequence_mean": sequence_mean,
    "constant": constant,
    "sequence_sum": sequence_sum,
}


def aggregator(name: str, max_len: int) -> Callable[[Tensor, Tensor], Tensor]:
    """The `name` aggregation as f(values, mask) -> scalar; max_len is the longest a
    response may be (max_new_tokens), used by `constant` only."""
    if name not in AGGREGATIONS:
        raise ValueError(f"unknown loss aggregation {name!r}; known: {', '.join(AGGREGATIONS)}")
    if max_len < 1:
        raise ValueError(f"loss aggregation: max_len must be >= 1, got {max_len}")
    aggregate = AGGREGATIONS[name]
    return lambda values, mask: aggregate(values, mask, max_len)


def masked_log_ratio(logprobs: Tensor, old_logprobs: Tensor, mask: Tensor) -> Tensor:
    """log pi - log pi_old on the mask, 0 off it: exp of the junk there would be inf, and
    inf in the unselected branch of a where still turns the gradient into nan."""
    return torch.where(mask.bool(), logprobs - old_logprobs, torch.zeros_like(logprobs))


def policy_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    aggregate: Callable[[Tensor, Tensor], Tensor] | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """PPO clipped surrogate (Schulman et al. 2017), a scalar to minimise.

    All inputs (batch, response_len). `aggregate` (from `aggregator`) reduces the
    per-token terms; None is the mean over real tokens. stats holds detached 0-dim
    tensors, token means whatever the aggregation: clipfrac, approx_kl, ratio_mean,
    ratio_max, ratio_min.
    """
    mask = mask.bool()
    logratio = masked_log_ratio(logprobs, old_logprobs, mask)
    ratio = torch.exp(logratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    per_token = torch.max(unclipped, clipped)
    loss = masked_mean(per_token, mask) if aggregate is None else aggregate(per_token, mask)
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


def kl_loss(
    logprobs: Tensor,
    ref_logprobs: Tensor,
    mask: Tensor,
    kind: str,
    aggregate: Callable[[Tensor, Tensor], Tensor],
    old_logprobs: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The `kind` estimate of KL(pi || pi_ref) (rl/kl.py), aggregated: the term the
    driver adds as kl_coef * kl_loss when the KL sits beside the policy loss rather
    than in the reward (DeepSeekMath eq. 3 with k3).

    With `old_logprobs` (those the tokens were sampled with), each token's estimate is
    weighted by the ratio pi / pi_old (DeepSeek-V3.2, arXiv:2512.02556; TRL's
    use_bias_correction_kl). On-policy the ratio is 1, so the loss's value does not
    change, but its gradient does: k3's own gradient, (1 - pi_ref/pi) grad log pi, is
    not the gradient of the KL it estimates; with the ratio's score term added it is
    (log pi - log pi_ref) grad log pi, the unbiased reverse-KL gradient per token.

    All inputs (batch, response_len). stats: kl, the detached mean over real tokens.
    """
    kl = per_token_kl(logprobs, ref_logprobs, mask, kind)
    with torch.no_grad():
        stats = {"kl": masked_mean(kl, mask)}
    if old_logprobs is not None:
        kl = kl * torch.exp(masked_log_ratio(logprobs, old_logprobs, mask))
    return aggregate(kl, mask), stats
