"""The one sampling path: PPO's rollouts, its held-out check, the eval stage,
`python -m pipeline generate` and the demo rankings all frame a chat prompt, left-pad
it, sample and cut after the first EOS here, so they sample the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from engine.chat import encode_prompt, user_prompt  # noqa: F401  (user_prompt: part of this module's interface)
from engine.packing import pad_sequences, position_ids
from rl.tokens import sequence_lengths, truncate_after_eos


@dataclass
class Sampling:
    max_new_tokens: int = 64
    temperature: float = 0.7  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off


@dataclass
class Response:
    text: str  # decoded, special tokens dropped
    ids: list[int]  # response tokens up to and including the EOS
    ended: bool  # produced an EOS within max_new_tokens


def load(path: str | Path, device: str | torch.device = "cpu"):
    """A checkpoint folder's causal LM (eval mode) and tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).to(device).eval()
    return model, tokenizer


def generation_config(tokenizer, sampling: Sampling, num_return_sequences: int = 1):
    from transformers import GenerationConfig

    greedy = sampling.temperature <= 0
    return GenerationConfig(
        do_sample=not greedy,
        temperature=None if greedy else sampling.temperature,
        top_k=None if greedy or not sampling.top_k else sampling.top_k,
        top_p=None if greedy else sampling.top_p,
        max_new_tokens=sampling.max_new_tokens,
        num_return_sequences=num_return_sequences,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


@torch.no_grad()
def sample(policy: nn.Module, queries, query_mask, generation_config) -> torch.Tensor:
    """Responses (batch, max_new_tokens), padded with pad after the EOS and to full length.

    Greedy and plain temperature sampling (what PPO should use) go through the short loop
    below; top-k, top-p and anything else go through `generate`."""
    c = generation_config
    if not (c.top_k or 0) and (c.top_p is None or c.top_p >= 1.0) and c.num_return_sequences in (None, 1):
        temperature = (c.temperature or 1.0) if c.do_sample else 0.0
        return sample_plain(policy, queries, query_mask, temperature, c.max_new_tokens, c.eos_token_id, c.pad_token_id)
    out = policy.generate(input_ids=queries, attention_mask=query_mask, generation_config=generation_config)
    responses = out[:, queries.shape[1] :]
    width = generation_config.max_new_tokens
    if responses.shape[1] < width:  # every row stopped early
        pad = torch.full((responses.shape[0], width - responses.shape[1]), generation_config.pad_token_id, dtype=responses.dtype, device=responses.device)
        responses = torch.cat([responses, pad], dim=1)
    return responses


def sample_plain(policy: nn.Module, queries, query_mask, temperature: float, max_new_tokens: int, eos_token_id: int, pad_token_id: int) -> torch.Tensor:
    """Token by token with a KV cache; temperature 0 is greedy. The draw is by inverse
    CDF (one uniform number per row), the same categorical distribution `generate`
    samples with multinomial but without its vocabulary-sized exponential draw, which
    costs about a tenth of the generation time on a CPU. A prompt repeated in the batch
    (the K answers of a group) is read once and its cache copied to each of its rows:
    the prompt's forward was about a fifth of a GRPO rollout's generation time at K = 4."""
    from transformers import DynamicCache

    cache = DynamicCache()

    def next_logits(ids, mask, positions):  # the last position's logits, the cache extended
        return policy(input_ids=ids, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True, logits_to_keep=1).logits[:, -1].float()

    batch = queries.shape[0]
    mask = query_mask.clone()
    positions = position_ids(mask)
    shared = repeated_prompts(queries, query_mask)
    rows = slice(None) if shared is None else shared[0]
    logits = next_logits(queries[rows], mask[rows], positions[rows])
    if shared is not None:
        cache.reorder_cache(shared[1])
        logits = logits[shared[1]]
    responses = torch.full((batch, max_new_tokens), pad_token_id, dtype=queries.dtype, device=queries.device)
    done = torch.zeros(batch, dtype=torch.bool, device=queries.device)
    eos = torch.tensor(eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id], device=queries.device)
    for t in range(max_new_tokens):
        if temperature > 0:
            cdf = torch.softmax(logits / temperature, dim=-1).cumsum(-1)
            u = torch.rand(batch, 1, device=cdf.device) * cdf[:, -1:]
            token = torch.searchsorted(cdf, u).clamp(max=cdf.shape[-1] - 1).squeeze(-1)
        else:
            token = logits.argmax(-1)
        responses[:, t] = torch.where(done, torch.full_like(token, pad_token_id), token)
        done |= torch.isin(token, eos)
        if done.all() or t == max_new_tokens - 1:
            break
        step_input = token.unsqueeze(-1)
        mask = torch.cat([mask, torch.ones_like(step_input)], dim=1)
        positions = positions[:, -1:] + 1
        logits = next_logits(step_input, mask, positions)
    return responses


def repeated_prompts(queries: torch.Tensor, query_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """For a batch whose rows repeat: the first row of each distinct prompt, and each
    row's index among those. None when every row is distinct."""
    distinct, inverse = torch.unique(torch.cat([queries, query_mask.to(queries.dtype)], 1), dim=0, return_inverse=True)
    if len(distinct) == len(queries):
        return None
    order = torch.arange(len(queries), device=queries.device)
    first = torch.full((len(distinct),), len(queries), device=queries.device).scatter_reduce(0, inverse, order, "amin")
    return first, inverse


@torch.no_grad()
def sample_batch(model, tokenizer, prompts: list[list[dict]], config, device):
    """One batch of chat prompts through the rollout's path: (queries, query_mask,
    responses cut after the first EOS, response_mask, ended, lengths)."""
    queries, query_mask = pad_sequences([encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id, "left", device)
    raw = sample(model, queries, query_mask, config)
    responses, mask, ended = truncate_after_eos(raw, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return queries, query_mask, responses, mask, ended, sequence_lengths(mask)


@torch.no_grad()
def generate(model, tokenizer, prompts: list[list[dict]], sampling: Sampling, batch_size: int = 16, num_return_sequences: int = 1, progress=None) -> list[list[Response]]:
    """For each chat prompt (a message list), num_return_sequences responses."""
    config = generation_config(tokenizer, sampling, num_return_sequences)
    device = next(model.parameters()).device
    out: list[list[Response]] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        _, _, responses, _, ended, lengths = sample_batch(model, tokenizer, chunk, config, device)
        lengths = lengths.tolist()
        rows = [
            Response(tokenizer.decode(responses[r, : lengths[r]], skip_special_tokens=True).strip(), responses[r, : lengths[r]].tolist(), bool(ended[r]))
            for r in range(len(lengths))
        ]
        out.extend(rows[i : i + num_return_sequences] for i in range(0, len(rows), num_return_sequences))
        if progress is not None:
            progress.update(len(chunk))
    return out
