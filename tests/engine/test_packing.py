"""Packed forward passes give every sequence the numbers it gets alone: log-probs,
values and the reward model's score, read at the EOS where the RM stage trained it."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification, LlamaModel

from engine import forward, packing, probes
from rl import tokens as rl_tokens

VOCAB, PAD, EOS = 64, 0, 2


def llama(head: str = "lm", seed: int = 0, attention: str = "sdpa"):
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         num_labels=1, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=None, attn_implementation=attention)
    torch.manual_seed(seed)
    return (LlamaForCausalLM if head == "lm" else LlamaForSequenceClassification)(config).eval()


def batch(shared: tuple = ()):
    """Three sequences: prompts of 3, 5 and 2 tokens after the `shared` ones (left-padded),
    responses of 2 (ends with EOS), 4 (no EOS) and 1 (only the EOS) tokens, the pad after them."""
    prompts = [[*shared, 11, 12, 13], [*shared, 21, 22, 23, 24, 25], [*shared, 31, 32]]
    responses = [[41, EOS], [42, 43, 44, 45], [EOS]]
    queries, query_mask = packing.pad_sequences(prompts, PAD, "left", "cpu")
    raw = torch.full((3, 4), PAD)
    for r, seq in enumerate(responses):
        raw[r, : len(seq)] = torch.tensor(seq)
    responses_t, mask, _ = rl_tokens.truncate_after_eos(raw, EOS, PAD)
    return prompts, responses, queries, query_mask, responses_t, mask


LAYOUTS = {  # name: (layout, shared prompt start, rows, prefix)
    "one row": (packing.Layout(share_prefix=False), (), 1, 0),
    "rows of 8": (packing.Layout(8, share_prefix=False), (), 3, 0),  # 5 + 9 + 3 tokens do not share a row
    "a row each": (packing.Layout(0, share_prefix=False), (), 3, 0),
    "nothing to share": (packing.Layout(), (), 1, 0),
    "shared prefix": (packing.Layout(), (5, 6, 7), 1, 3),
    "shared prefix, rows of 17": (packing.Layout(17, share_prefix=True), (5, 6, 7), 2, 3),  # prefix 3 + 5 + 9 fill a row; the third opens one with its own prefix
    "prefix not shared": (packing.Layout(share_prefix=False), (5, 6, 7), 1, 0),
}


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_packed_log_probs_and_scores_equal_each_sequence_alone(name, attention):
    layout, shared, rows, prefix = LAYOUTS[name]
    prompts, responses, queries, query_mask, responses_t, mask = batch(shared)
    packed = packing.pack(queries, query_mask, responses_t, mask, layout)
    assert (packed.input_ids.shape[0], packed.prefix) == (rows, prefix)
    policy, reward_model = llama("lm", attention=attention), llama("rm", seed=1, attention=attention)
    with torch.no_grad():
        logprobs = packed.unpack(rl_tokens.logprobs_from_logits(forward.response_logits(policy, packed), packed.tokens), rl_tokens.INVALID_LOGPROB)
        scores = forward.reward_scores(reward_model, packed)
        for r, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            ids = torch.tensor([prompt + response])
            alone = torch.log_softmax(policy(ids).logits[0, len(prompt) - 1 : -1], -1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)
            torch.testing.assert_close(logprobs[r, : len(response)], alone, rtol=1e-5, atol=1e-5)
            assert (logprobs[r, len(response) :] == rl_tokens.INVALID_LOGPROB).all()
            # the score of the whole sequence, EOS included, as the sequence classifier reads it
            torch.testing.assert_close(scores[r], reward_model(ids).logits[0, 0], rtol=1e-5, atol=1e-5)


def test_a_shared_prefix_gives_the_gradients_of_each_sequence_alone():
    """The prefix runs once and collects the gradient of every sequence after it: the
    sum each sequence's own copy of it would have collected."""
    prompts, responses, queries, query_mask, responses_t, mask = batch((5, 6, 7))
    grads = []
    for share in (True, False):
        policy = llama()
        packed = packing.pack(queries, query_mask, responses_t, mask, packing.Layout(share_prefix=share))
        assert packed.prefix == (3 if share else 0)
        rl_tokens.logprobs_from_logits(forward.response_logits(policy, packed), packed.tokens).sum().backward()
        grads.append({n: p.grad for n, p in policy.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 10
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6, msg=name)


def test_the_prefix_leaves_each_sequence_its_last_prompt_token():
    """The first response token is chosen in the state after the last prompt token, which
    must be the sequence's own even when a prompt is nothing but the shared start."""
    queries, query_mask = packing.pad_sequences([[5, 6, 7], [5, 6, 7, 8]], PAD, "left", "cpu")
    responses, mask = torch.tensor([[9, EOS], [9, EOS]]), torch.ones(2, 2, dtype=torch.bool)
    packed = packing.pack(queries, query_mask, responses, mask)
    assert packed.prefix == 2
    assert packed.input_ids[0].tolist() == [5, 6, 7, 9, EOS, 7, 8, 9, EOS]
    assert packed.predicts[0].nonzero().squeeze(-1).tolist() == [2, 3, 6, 7]
    assert packed.last.tolist() == [4, 8]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 2, 3, 4, 5]


def test_the_score_is_read_at_the_eos_not_the_token_before():
    prompts, responses, queries, query_mask, responses_t, mask = batch()
    packed = packing.pack(queries, query_mask, responses_t, mask)
    reward_model = llama("rm", seed=1)
    with torch.no_grad():
        scores = forward.reward_scores(reward_model, packed)
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
    assert probes.packs_sequences(model) and not probes.packs_sequences(blind)
    notes = []
    assert probes.layout_for(model, note=notes.append) == packing.Layout(packing.ROW_TOKENS, share_prefix=True) and notes == []
    assert probes.layout_for(model, blind, note=notes.append) == packing.Layout(0, share_prefix=False)
    assert notes == ["one sequence per row in forward passes: LlamaForCausalLM attends across packed sequences (slower, same numbers)"]


def test_a_model_that_drops_custom_masks_packs_without_a_shared_prefix():
    class NoMask(LlamaModel):
        """Ignores the attention mask: transformers then builds the block-causal mask from
        the position ids, under which a sequence after the prefix cannot see it."""

        def forward(self, *args, attention_mask=None, **kwargs):
            return super().forward(*args, **kwargs)

    model = llama()
    model.model = NoMask(model.config)
    assert probes.packs_sequences(model) and not probes.shares_prefix(model)
    notes = []
    assert probes.layout_for(model, note=notes.append) == packing.Layout(packing.ROW_TOKENS, share_prefix=False)
    assert len(notes) == 1 and notes[0].startswith("packed without a shared prompt prefix:"), notes


def test_the_top_layers_run_alone_from_the_states_entering_them():
    """The "reward" value layout feeds the reward model's recorded states into its top
    layers; that must give the full forward's output, and a model that transforms its
    `inputs_embeds` (as Gemma scales them) must be caught."""

    class Scaled(LlamaModel):
        def forward(self, input_ids=None, inputs_embeds=None, **kwargs):
            if inputs_embeds is None:
                inputs_embeds = self.embed_tokens(input_ids)
            return super().forward(inputs_embeds=inputs_embeds * 2.0, **kwargs)

    model = llama("rm", seed=3)
    assert probes.runs_top_layers(model, 1)
    assert not probes.runs_top_layers(model, 2) and not probes.runs_top_layers(model, 0), "all layers or none is no split"
    scaled = llama("rm", seed=3)
    scaled.model = Scaled(scaled.config)
    assert not probes.runs_top_layers(scaled, 1)


def test_rows_with_filler_stay_within_learned_position_embeddings():
    """A short last row is filled up to the longest; the filler's position ids must stay
    within what a model with learned absolute positions (GPT-2) has, or its embedding
    lookup fails, and the real tokens must read as they do alone."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=10)).eval()
    queries, query_mask = packing.pad_sequences([[5, 6, 7], [5, 8, 4], [9]], PAD, "left", "cpu")
    responses = torch.tensor([[12, 13, 14, 15], [16, 17, 3, 2], [18, 0, 0, 0]])
    response_mask = torch.tensor([[True] * 4, [True] * 4, [True, False, False, False]])
    layout = packing.Layout(row_tokens=14, share_prefix=False)  # a row of 7 + 7 tokens, then 2 and 12 of filler
    packed = packing.pack(queries, query_mask, responses, response_mask, layout)
    assert packed.input_ids.shape == (2, 14)
    assert int(packed.position_ids.max()) < 7, packed.position_ids
    with torch.no_grad():
        together = rl_tokens.logprobs_from_logits(forward.response_logits(model, packed), packed.tokens)
        for b in range(3):
            ids = torch.cat([queries[b][query_mask[b].bool()], responses[b][response_mask[b]]])[None]
            alone = torch.log_softmax(model(ids).logits[0, -1 - int(response_mask[b].sum()) : -1], -1).gather(-1, ids[0, -int(response_mask[b].sum()) :, None]).squeeze(-1)
            mine = packed.unpack(together, 0.0)[b][response_mask[b]]
            torch.testing.assert_close(mine, alone, rtol=1e-5, atol=1e-5)
