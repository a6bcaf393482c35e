"""Responses as token tensors: where each one ends, and the log-probabilities of its tokens.

Responses are right-padded, shape (batch, response_len). The pad id may equal the
EOS id, so positions always come from `truncate_after_eos`, never from searching
for pad.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

INVALID_LOGPROB = 1.0
"""Written into logprob positions past the response, where no token was sampled."""


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
