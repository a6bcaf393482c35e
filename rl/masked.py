"""Means, variances and whitening over the real tokens of right-padded batches.

`mask` is true on real tokens. Masked positions may hold anything, inf and nan
included, and never reach a result.
"""

from __future__ import annotations

import torch
from torch import Tensor


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
