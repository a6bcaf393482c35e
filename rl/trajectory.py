"""The rollout record: one batch of episodes and everything PPO computes about it."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from rl.tokens import INVALID_LOGPROB


@dataclass
class Rollout:
    """One batch of episodes. Shapes: (batch, prompt_len) for the prompt, (batch,
    response_len) for per-token fields, (batch,) for per-episode ones."""

    queries: torch.Tensor  # prompt ids, left-padded
    query_mask: torch.Tensor  # 1 on real prompt tokens
    responses: torch.Tensor  # sampled ids, pad after the first EOS
    response_mask: torch.Tensor  # bool, true up to and including the first EOS
    ended: torch.Tensor  # (batch,) bool: the response produced an EOS
    ref_logprobs: torch.Tensor | None = None  # log pi_ref(token), INVALID_LOGPROB off the mask
    ratings: torch.Tensor | None = None  # (batch, sources) raw rating by each reward source (engine/rewards.py), NaN where a function could not rate
    scores: torch.Tensor | None = None  # (batch,) the train reward: each train source normalised on its own, weighted and summed
    rated: torch.Tensor | None = None  # (batch,) bool: some train source rated the episode (its score means something)
    logprobs: torch.Tensor | None = None  # log pi_old(token), INVALID_LOGPROB off the mask
    values: torch.Tensor | None = None  # V_old(prefix), 0 off the mask
    value_inputs: torch.Tensor | None = None  # (batch, prompt_len + response_len, hidden): the reward model's hidden states entering the value's first layer, when the value runs only its top layers

    def set_old(self, logprobs: torch.Tensor, values: torch.Tensor | None) -> None:
        """Record the policy's log-probs (and values) at rollout time, masked."""
        self.logprobs = torch.where(self.response_mask, logprobs, torch.full_like(logprobs, INVALID_LOGPROB))
        if values is not None:
            self.values = torch.where(self.response_mask, values, torch.zeros_like(values))

    def select(self, index: torch.Tensor) -> Rollout:
        """The episodes at `index`, every field sliced alike."""
        return Rollout(**{k: v[index] if v is not None else None for k, v in vars(self).items()})
