"""PPO's clipped losses (Schulman et al. 2017, arXiv:1707.06347), each returning
(loss to minimise, detached stats). Inputs are (batch, response_len); the mean runs
over real tokens only.
"""

from __future__ import annotations

import torch
from torch import Tensor

from rl.masked import masked_mean, masked_var


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
