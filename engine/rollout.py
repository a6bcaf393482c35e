"""Step 1: sample responses to a batch of prompts and score them, giving a `Rollout`
with every reward model's scores (`ratings`; reward functions rate the text in step 2),
the reference's log-probs and, unless the update's own forward will provide them, the
policy's old log-probs and values."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from engine.forward import reward_scores
from engine.models import Models
from engine.packing import Layout, pack_rollout
from engine.sampling import sample
from rl.tokens import INVALID_LOGPROB, sequence_lengths, truncate_after_eos
from rl.trajectory import Rollout


@dataclass(frozen=True)
class RolloutSettings:
    """How a run samples and scores, fixed at its start."""

    generation: object  # transformers GenerationConfig: temperature, max_new_tokens, EOS and pad ids
    temperature: float  # log-probs are taken at the sampling temperature
    layout: Layout  # how forward passes pack sequences (engine.probes.layout_for)
    policy_pass: bool = True  # False in one-pass mode: the update's first forward gives the old log-probs and values
    merge: bool = False  # LoRA: sample with the policy adapter folded into the weights


@torch.no_grad()
def make_rollout(models: Models, queries: torch.Tensor, query_mask: torch.Tensor, how: RolloutSettings, timer, note: Callable[[str], None] = print) -> Rollout:
    """queries, query_mask: (batch, prompt_len), left-padded; the K answers to one
    prompt are K consecutive rows, sampled in this one batch."""
    trained = models.trained
    config = how.generation
    with timer("generation"), trained.policy.sampling_weights(how.merge, note) as sampler:
        raw = sample(sampler, queries, query_mask, config)
    responses, mask, ended = truncate_after_eos(raw, config.eos_token_id, config.pad_token_id)
    width = int(sequence_lengths(mask).max())  # columns past the longest response hold only padding
    batch = Rollout(queries=queries, query_mask=query_mask, responses=responses[:, :width], response_mask=mask[:, :width], ended=ended)
    packed = pack_rollout(batch, how.layout)
    with timer("scoring"):
        keep = trained.value.keep_layer
        columns = []
        for scorer in models.scorers:
            if keep is not None and scorer is models.reward_model:
                score, batch.value_inputs = reward_scores(scorer, packed, keep_layer=keep)
                packed.value_inputs = packed.from_grid(batch.value_inputs)
            else:
                score = reward_scores(scorer, packed)
            columns.append(score)
        batch.ratings = torch.stack(columns, 1) if columns else queries.new_zeros((len(queries), 0), dtype=torch.float32)
        if how.policy_pass:
            logprobs, values, _, _ = trained(packed, how.temperature)
            batch.set_old(logprobs, values)
        batch.ref_logprobs = packed.unpack(models.reference.logprobs(packed, how.temperature), INVALID_LOGPROB)
    return batch
