"""Sampling responses from a checkpoint: the one generation path that evaluation,
the demo rankings and `python -m pipeline generate` share with PPO's rollouts
(same chat prompt, same left padding, same cut after the first EOS)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from stages import data, ppo, rollout


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
def sample_batch(model, tokenizer, prompts: list[list[dict]], config, device):
    """One batch of chat prompts through the rollout's path: (queries, query_mask,
    responses cut after the first EOS, response_mask, ended, lengths)."""
    queries, query_mask = rollout.left_pad([data.encode_prompt(tokenizer, p) for p in prompts], tokenizer.pad_token_id, device)
    raw = rollout.sample(model, queries, query_mask, config)
    responses, mask, ended = ppo.truncate_after_eos(raw, tokenizer.eos_token_id, tokenizer.pad_token_id)
    return queries, query_mask, responses, mask, ended, ppo.sequence_lengths(mask)


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


def user_prompt(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]
