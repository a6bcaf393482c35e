"""Per-token estimators of KL(pi || pi_ref) for tokens sampled from pi, after Schulman's
note "Approximating KL divergence" (http://joschu.net/blog/kl-approx.html).

With r = log pi_ref - log pi, the log ratio of a sampled token:
    k1 = -r                   unbiased, high variance, negative on some tokens
    k2 = 0.5 * r^2            biased, low variance, >= 0
    k3 = exp(r) - 1 - r       unbiased, low variance, >= 0
Each function here takes log pi - log pi_ref (that is, -r), the sign the rewards use.
All (batch, response_len); pure torch. "Unbiased" is about the estimate's value: as a loss
term, an estimate's own gradient is not the KL's gradient (rl/losses.py's kl_loss says
what corrects it).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


def k1(log_ratio: Tensor) -> Tensor:
    """log pi - log pi_ref; its sum over a response is that response's log density ratio."""
    return log_ratio


def k2(log_ratio: Tensor) -> Tensor:
    """0.5 * (log pi - log pi_ref)^2."""
    return 0.5 * log_ratio**2


def k3(log_ratio: Tensor) -> Tensor:
    """exp(r) - 1 - r with r = log pi_ref - log pi; >= 0 since exp(r) >= 1 + r."""
    r = -log_ratio
    return torch.expm1(r) - r


KL_ESTIMATORS: dict[str, Callable[[Tensor], Tensor]] = {"k1": k1, "k2": k2, "k3": k3}


def per_token_kl(logprobs: Tensor, ref_logprobs: Tensor, mask: Tensor, kind: str = "k1") -> Tensor:
    """The `kind` estimate of KL(pi || pi_ref) per token, 0 off the mask.

    All (batch, response_len). Differentiable in `logprobs`, so it can serve as a loss
    term as well as a reward penalty.
    """
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"per_token_kl: unknown KL estimator {kind!r}; known: {', '.join(KL_ESTIMATORS)}")
    # Zero the log-ratio off the mask before any exp: junk there (INVALID_LOGPROB, padding)
    # would give inf, and inf in a where's unselected branch still makes the gradient nan.
    log_ratio = torch.where(mask.bool(), logprobs - ref_logprobs, torch.zeros_like(logprobs))
    return KL_ESTIMATORS[kind](log_ratio)
