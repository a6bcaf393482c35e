"""Packed forward passes give every sequence the numbers it gets alone: log-probs,
values and the reward model's score, read at the EOS where the RM stage trained it."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel

from stages import ppo, rollout

VOCAB, PAD, EOS = 64, 0, 2


def llama(head: str = "lm", seed: int = 0):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         num_labels=1, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None)
    torch.manual_seed(seed)
    return (LlamaForCausalLM if head == "lm" else LlamaForSequenceClassification)(config).eval()


def batch():
    """Three sequences: prompts of 3, 5 and 2 tokens (left-padded), responses of 2
    (ends with EOS), 4 (no EOS) and 1 (only the EOS) tokens, the pad after them."""
    prompts = [[11, 12, 13], [21, 22, 23, 24, 25], [31, 32]]
    responses = [[41, EOS], [42, 43, 44, 45], [EOS]]
    queries, query_mask = rollout.left_pad(prompts, PAD, "cpu")
    raw = torch.full((3, 4), PAD)
    for r, seq in enumerate(responses):
        raw[r, : len(seq)] = torch.tensor(seq)
    responses_t, mask, _ = ppo.truncate_after_eos(raw, EOS, PAD)
    return prompts, responses, queries, query_mask, responses_t, mask


@pytest.mark.parametrize("row_tokens", [rollout.ROW_TOKENS, 8, 0])
def test_packed_log_probs_and_scores_equal_each_sequence_alone(row_tokens):
    prompts, responses, queries, query_mask, responses_t, mask = batch()
    packed = rollout.pack(queries, query_mask, responses_t, mask, row_tokens)
    rows = {rollout.ROW_TOKENS: 1, 8: 3, 0: 3}[row_tokens]  # 8 tokens: 5 + 9 + 3 do not share
    assert packed.input_ids.shape[0] == rows
    policy, reward_model = llama("lm"), llama("rm", seed=1)
    with torch.no_grad():
        logprobs = packed.unpack(ppo.logprobs_from_logits(rollout.response_logits(policy, packed), packed.tokens), ppo.INVALID_LOGPROB)
        scores = rollout.reward_scores(reward_model, packed)
        for r, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            ids = torch.tensor([prompt + response])
            alone = torch.log_softmax(policy(ids).logits[0, len(prompt) - 1 : -1], -1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)
            torch.testing.assert_close(logprobs[r, : len(response)], alone, rtol=1e-5, atol=1e-5)
            assert (logprobs[r, len(response) :] == ppo.INVALID_LOGPROB).all()
            # the score of the whole sequence, EOS included, as the sequence classifier reads it
            torch.testing.assert_close(scores[r], reward_model(ids).logits[0, 0], rtol=1e-5, atol=1e-5)


def test_the_score_is_read_at_the_eos_not_the_token_before():
    prompts, responses, queries, query_mask, responses_t, mask = batch()
    packed = rollout.pack(queries, query_mask, responses_t, mask)
    reward_model = llama("rm", seed=1)
    with torch.no_grad():
        scores = rollout.reward_scores(reward_model, packed)
        without_eos = reward_model(torch.tensor([prompts[0] + responses[0][:-1]])).logits[0, 0]
    assert abs(scores[0] - without_eos) > 1e-4


def test_a_model_that_ignores_packing_gets_a_row_per_sequence():
    class Blind(LlamaModel):
        """Drops the position ids, so positions run over the whole row and no packed
        mask is built: sequences would see each other."""

        def forward(self, *args, position_ids=None, **kwargs):
            return super().forward(*args, **kwargs)

    model = llama()
    blind = llama()
    blind.model = Blind(blind.config)
    assert rollout.packs_sequences(model) and not rollout.packs_sequences(blind)
    assert rollout.row_tokens_for(model) == rollout.ROW_TOKENS
    assert rollout.row_tokens_for(model, blind) == 0
