"""The rollout's own sampling loop against transformers' `generate`: the same greedy
tokens, the same temperature-scaled distribution, pad after the EOS."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from engine import chat, packing, sampling
from stages import base


@pytest.fixture(scope="module")
def policy(tiny_model_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("policy")
    base.run(base.BaseConfig(model=str(tiny_model_dir)), {}, out, seed=0)
    return AutoModelForCausalLM.from_pretrained(out).eval(), AutoTokenizer.from_pretrained(out)


def prompts(tokenizer, texts):
    return packing.pad_sequences([chat.encode_prompt(tokenizer, [{"role": "user", "content": t}]) for t in texts], tokenizer.pad_token_id, "left", "cpu")


def test_greedy_matches_generate_token_for_token(policy):
    model, tokenizer = policy
    queries, mask = prompts(tokenizer, ["What is 2 + 2?", "Spell cat backwards, please, and be quick.", "Hi"])
    config = GenerationConfig(do_sample=False, max_new_tokens=12, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    ours = sampling.sample(model, queries, mask, config)
    theirs = model.generate(input_ids=queries, attention_mask=mask, generation_config=config)[:, queries.shape[1] :]
    assert torch.equal(ours[:, : theirs.shape[1]], theirs)


def test_sampling_uses_no_deprecated_model_argument(policy):
    """transformers 5.24 renamed the forward's past_key_values to cache and drops the old name in
    5.40, which pyproject's <6 admits: sampling must not lean on the old name."""
    model, tokenizer = policy
    queries, mask = prompts(tokenizer, ["What is 2 + 2?", "Hi"])
    config = GenerationConfig(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=3, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        sampling.sample(model, queries, mask, config)


def test_tokens_after_the_eos_are_pad(policy):
    model, tokenizer = policy
    queries, mask = prompts(tokenizer, ["What is 2 + 2?"] * 16)
    torch.manual_seed(0)
    # A huge temperature makes the EOS turn up early in some rows and not in others.
    config = GenerationConfig(do_sample=True, temperature=50.0, top_k=0, top_p=1.0, max_new_tokens=200, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    out = sampling.sample(model, queries, mask, config)
    assert out.shape == (16, 200)
    ended = 0
    for row in out.tolist():
        if tokenizer.eos_token_id in row:
            ended += 1
            cut = row.index(tokenizer.eos_token_id)
            assert all(t == tokenizer.pad_token_id for t in row[cut + 1 :])
    assert ended > 0


def test_sampling_follows_the_temperature_scaled_distribution(policy):
    model, tokenizer = policy
    n = 4000
    queries, mask = prompts(tokenizer, ["What is 2 + 2?"] * n)
    config = GenerationConfig(do_sample=True, temperature=0.5, top_k=0, top_p=1.0, max_new_tokens=1, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    first = sampling.sample(model, queries, mask, config)[:, 0]
    with torch.no_grad():
        logits = model(input_ids=queries[:1], attention_mask=mask[:1]).logits[0, -1]
    probs = torch.softmax(logits / 0.5, -1)
    counts = torch.bincount(first, minlength=probs.numel()).float()
    top = probs.topk(5).indices
    for token in top.tolist():  # each frequent token within 4 standard errors of its probability
        p = probs[token].item()
        assert abs(counts[token].item() / n - p) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3, (token, counts[token].item() / n, p)


def test_a_repeated_prompt_is_read_once_and_sampled_as_if_alone(policy):
    """The K answers of a group repeat one prompt: its forward runs once and its cache
    is copied to each row, in any order, with the tokens `generate` gives every row."""
    model, tokenizer = copy.deepcopy(policy[0]), policy[1]
    torch.manual_seed(0)
    with torch.no_grad():  # weights large enough that the greedy answer depends on the prompt
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 1.0)
    queries, mask = prompts(tokenizer, ["Hi", "Spell cat backwards, please.", "Hi", "Hi", "Spell cat backwards, please."])
    config = GenerationConfig(do_sample=False, max_new_tokens=10, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    rows_read = []
    hook = model.register_forward_pre_hook(lambda module, args, kwargs: rows_read.append(kwargs["input_ids"].shape), with_kwargs=True)
    try:
        ours = sampling.sample(model, queries, mask, config)
    finally:
        hook.remove()
    assert rows_read[0] == (2, queries.shape[1])  # the prompt forward: two distinct prompts
    assert all(shape == (5, 1) for shape in rows_read[1:])
    theirs = model.generate(input_ids=queries, attention_mask=mask, generation_config=config)[:, queries.shape[1] :]
    assert torch.equal(ours[:, : theirs.shape[1]], theirs)
    assert torch.equal(ours[0], ours[2]) and torch.equal(ours[1], ours[4])
    assert not torch.equal(ours[0], ours[1])  # so a row given the other prompt's cache would show


def test_repeated_prompts_names_each_rows_first_copy():
    queries = torch.tensor([[0, 5, 6], [7, 8, 9], [0, 5, 6], [7, 8, 9], [1, 5, 6]])
    mask = torch.tensor([[0, 1, 1], [1, 1, 1], [0, 1, 1], [1, 1, 1], [1, 1, 1]])
    first, index = sampling.repeated_prompts(queries, mask)
    assert torch.equal(queries[first][index], queries) and torch.equal(mask[first][index], mask)
    assert sorted(first.tolist()) == [0, 1, 4]
    assert sampling.repeated_prompts(queries[:2], mask[:2]) is None
    # the same ids under a different mask are a different prompt
    assert sampling.repeated_prompts(queries[:1].repeat(2, 1), torch.tensor([[0, 1, 1], [1, 1, 1]])) is None
