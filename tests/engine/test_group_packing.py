"""The K answers sampled for one prompt (GRPO, RLOO) share that prompt in a packed row:
laid out once, each member keeping its last prompt token and its response. Every
sequence must still get the numbers it gets alone, and a batch with no repeated
prompt must pack exactly as before groups existed (`old_pack`, frozen below)."""

from __future__ import annotations

import pytest
import torch

from engine import forward, packing
from rl import tokens as rl_tokens
from tests.engine.test_packing import EOS, PAD, VOCAB, llama

SYSTEM = (5, 6, 7)  # a chat template's start, shared by every prompt


def grouped_batch(system: tuple = SYSTEM):
    """Two prompts answered 3 times each, then one answered once: prompts of 4, 2 and 6
    tokens after `system` (left-padded), responses of uneven lengths, with and without EOS."""
    a, b, c = [*system, 11, 12, 13, 14], [*system, 21, 22], [*system, 31, 32, 33, 34, 35, 36]
    prompts = [a, a, a, b, b, b, c]
    responses = [[41, EOS], [42, 43, 44, 45], [EOS], [46, 47, EOS], [48, 49, 50, 51], [EOS], [52, 53, EOS]]
    return prompts, responses, *tensors(prompts, responses)


def tensors(prompts, responses, width: int = 4):
    queries, query_mask = packing.pad_sequences(prompts, PAD, "left", "cpu")
    raw = torch.full((len(responses), width), PAD)
    for r, seq in enumerate(responses):
        raw[r, : len(seq)] = torch.tensor(seq)
    responses_t, mask, _ = rl_tokens.truncate_after_eos(raw, EOS, PAD)
    return queries, query_mask, responses_t, mask


LAYOUTS = {  # name: (layout, rows with SYSTEM)
    "one row": (packing.Layout(), 1),
    # prefix 3 + A's prompt 3 + 3 + 5 | 3 + 3 + 2, then B's prompt 1 + 4 | 3 + 1 + 5 + 2 | C: both groups span two rows
    "rows of 14": (packing.Layout(14), 4),
    "rows of 12": (packing.Layout(12), 6),  # mostly one member a row, each with its group's prompt again
}


def alone_logprobs(policy, prompt, response):
    ids = torch.tensor([prompt + response])
    return torch.log_softmax(policy(ids).logits[0, len(prompt) - 1 : -1], -1).gather(-1, ids[0, len(prompt) :, None]).squeeze(-1)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("system", [SYSTEM, ()], ids=["system prompt", "no common prefix"])
@pytest.mark.parametrize("name", list(LAYOUTS))
def test_grouped_log_probs_and_scores_equal_each_sequence_alone(name, system, attention):
    layout, rows = LAYOUTS[name]
    prompts, responses, queries, query_mask, responses_t, mask = grouped_batch(system)
    packed = packing.pack(queries, query_mask, responses_t, mask, layout)
    assert packed.prefix == len(system) and packed.attention_mask is not None
    assert (packed.parents != packed.segments).any(), "the groups must be shared for this test to mean anything"
    if system:
        assert packed.input_ids.shape[0] == rows
    policy, reward_model = llama("lm", attention=attention), llama("rm", seed=1, attention=attention)
    with torch.no_grad():
        logprobs = packed.unpack(rl_tokens.logprobs_from_logits(forward.response_logits(policy, packed), packed.tokens), rl_tokens.INVALID_LOGPROB)
        scores = forward.reward_scores(reward_model, packed)
        for r, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            torch.testing.assert_close(logprobs[r, : len(response)], alone_logprobs(policy, prompt, response), rtol=1e-5, atol=1e-5)
            assert (logprobs[r, len(response) :] == rl_tokens.INVALID_LOGPROB).all()
            torch.testing.assert_close(scores[r], reward_model(torch.tensor([prompt + response])).logits[0, 0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", ["one row", "rows of 12"])
def test_a_group_prompt_keeps_its_positions_under_learned_position_embeddings(name):
    """GPT-2 adds a learned embedding per position: a member's own tokens must continue
    the numbering of its group's prompt, not restart after it."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=16, bos_token_id=None, eos_token_id=EOS)).eval()
    prompts, responses, queries, query_mask, responses_t, mask = grouped_batch()
    packed = packing.pack(queries, query_mask, responses_t, mask, LAYOUTS[name][0])
    with torch.no_grad():
        logprobs = packed.unpack(rl_tokens.logprobs_from_logits(forward.response_logits(model, packed), packed.tokens), 0.0)
        for r, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
            torch.testing.assert_close(logprobs[r, : len(response)], alone_logprobs(model, prompt, response), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("name", ["one row", "rows of 14"])
def test_a_group_prompt_collects_the_gradients_of_its_members_alone(name, attention):
    """The group's prompt runs once per row; its gradient is the sum of what each
    member's own copy would have collected."""
    prompts, responses, queries, query_mask, responses_t, mask = grouped_batch()
    weights = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0))  # any scalar of the log-probs, not only their sum
    packed_policy, alone_policy = llama(attention=attention), llama(attention=attention)
    packed = packing.pack(queries, query_mask, responses_t, mask, LAYOUTS[name][0])
    logprobs = rl_tokens.logprobs_from_logits(forward.response_logits(packed_policy, packed), packed.tokens)
    (packed.unpack(logprobs, 0.0) * weights).sum().backward()
    for r, (prompt, response) in enumerate(zip(prompts, responses, strict=True)):
        (alone_logprobs(alone_policy, prompt, response) * weights[r, : len(response)]).sum().backward()
    grads = dict(alone_policy.named_parameters())
    checked = 0
    for n, p in packed_policy.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(p.grad, grads[n].grad, rtol=1e-4, atol=1e-5, msg=n)
            checked += 1
    assert checked > 10


def test_each_group_saves_its_prompt_but_the_last_token_for_all_members_but_one():
    prompts, responses, queries, query_mask, responses_t, mask = grouped_batch()
    packed = packing.pack(queries, query_mask, responses_t, mask)
    before = old_pack(queries, query_mask, responses_t, mask)
    assert (before.input_ids.shape, packed.prefix) == ((1, 45), 3)
    # (K - 1) * (prompt beyond the prefix - 1): A's 4 tokens and B's 2, each answered 3 times
    assert packed.input_ids.shape == (1, 45 - 2 * 3 - 2 * 1)
    assert int((packed.segments >= 0).sum()) == 37, "one row: no filler"


def test_a_member_keeps_its_last_prompt_token_and_attends_to_its_group_only():
    """Two answers to [5, 6, 7, 8], then one to [5, 6, 9]: the row prefix [5, 6], the
    group's [7], then each member's last prompt token and response."""
    queries, query_mask, responses, mask = tensors([[5, 6, 7, 8], [5, 6, 7, 8], [5, 6, 9]], [[10, EOS], [11, 13], [12, EOS]], width=2)
    packed = packing.pack(queries, query_mask, responses, mask)
    assert packed.prefix == 2
    assert packed.input_ids[0].tolist() == [5, 6, 7, 8, 10, EOS, 8, 11, 13, 9, 12, EOS]
    assert packed.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 2, 3, 4]
    assert packed.predicts[0].nonzero().squeeze(-1).tolist() == [3, 4, 6, 7, 9, 10]
    assert packed.last.tolist() == [5, 8, 11]
    sees = packed.attention_mask[0, 0]
    assert sees[7].nonzero().squeeze(-1).tolist() == [0, 1, 2, 6, 7], "the second answer: prefix, group prompt, itself"
    assert sees[10].nonzero().squeeze(-1).tolist() == [0, 1, 9, 10], "the lone prompt: prefix and itself"
    assert sees[2].nonzero().squeeze(-1).tolist() == [0, 1, 2], "the group prompt: prefix and itself"


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_grouped_states_go_to_the_grid_and_back(name):
    prompts, responses, queries, query_mask, responses_t, mask = grouped_batch()
    packed = packing.pack(queries, query_mask, responses_t, mask, LAYOUTS[name][0])
    real = torch.cat([query_mask.bool(), mask], 1)
    grid = packed.to_grid(packed.input_ids)
    assert torch.equal(grid[real], torch.cat([queries, responses_t], 1)[real])
    positions = packed.to_grid(packed.position_ids)
    assert torch.equal(positions[real], packing.position_ids(real)[real]), "each grid token reads the position it has alone"
    laid = packed.segments >= 0
    assert torch.equal(packed.from_grid(grid)[laid], packed.input_ids[laid])
    # every packed token is the grid token that reads it: the inverse, not only the same id
    assert torch.equal(packed.place.flatten()[packed.source[laid]], torch.arange(packed.input_ids.numel()).view_as(laid)[laid])


def random_batch(seed: int, repeats: bool):
    """Prompts of 1-7 tokens, often sharing a start, responses of 1-5; with `repeats`,
    some prompts answered 2-3 times in a row."""
    g = torch.Generator().manual_seed(seed)
    start = torch.randint(3, VOCAB, (3,), generator=g).tolist()

    def draw(low, high):
        return torch.randint(3, VOCAB, (int(torch.randint(low, high, (1,), generator=g)),), generator=g).tolist()

    prompts = []
    while len(prompts) < 6:
        prompt = start[: int(torch.randint(0, 4, (1,), generator=g))] + draw(1, 5)
        if prompts and prompt == prompts[-1]:  # by chance: a repeat only where asked for
            continue
        prompts += [prompt] * (int(torch.randint(1, 4, (1,), generator=g)) if repeats else 1)
    responses = [draw(1, 5) + ([EOS] if torch.rand(1, generator=g) < 0.5 else []) for _ in prompts]
    return tensors(prompts, responses, width=6)


OLD_LAYOUTS = [packing.Layout(), packing.Layout(16), packing.Layout(share_prefix=False), packing.Layout(9, share_prefix=False), packing.Layout(0, share_prefix=False), packing.Layout(0)]


@pytest.mark.parametrize("seed", range(20))
def test_without_repeated_prompts_or_prefix_sharing_the_packing_is_as_before_groups(seed):
    """PPO's one answer a prompt, and any model that takes no custom mask, get exactly
    the tensors they got before groups existed."""
    for repeats, layouts in ((False, OLD_LAYOUTS), (True, [layout for layout in OLD_LAYOUTS if not (layout.share_prefix and layout.row_tokens)])):
        queries, query_mask, responses, mask = random_batch(seed, repeats)
        for layout in layouts:
            new, old = packing.pack(queries, query_mask, responses, mask, layout), old_pack(queries, query_mask, responses, mask, layout)
            for field in ("input_ids", "position_ids", "predicts", "last", "response_mask", "tokens", "source", "place", "attention_mask"):
                assert torch.equal(getattr(new, field), getattr(old, field)) if getattr(old, field) is not None else getattr(new, field) is None, (field, layout, repeats)
            assert new.prefix == old.prefix


@pytest.mark.parametrize("seed", range(20))
def test_random_groups_read_as_each_sequence_alone(seed):
    queries, query_mask, responses, mask = random_batch(seed, repeats=True)
    policy = llama()
    real = torch.cat([query_mask.bool(), mask], 1)
    ids = torch.cat([queries, responses], 1)
    with torch.no_grad():
        for layout in (packing.Layout(), packing.Layout(16)):
            packed = packing.pack(queries, query_mask, responses, mask, layout)
            logprobs = packed.unpack(rl_tokens.logprobs_from_logits(forward.response_logits(policy, packed), packed.tokens), 0.0)
            for b in range(len(ids)):
                prompt, response = queries[b][query_mask[b].bool()].tolist(), responses[b][mask[b]].tolist()
                assert ids[b][real[b]].tolist() == prompt + response
                torch.testing.assert_close(logprobs[b][mask[b]], alone_logprobs(policy, prompt, response), rtol=1e-5, atol=1e-5)


# `engine.packing.pack` as it was before groups (commit dbb8d24), kept to check that a
# batch without repeated prompts packs exactly as it did.
def old_pack(queries, query_mask, responses, response_mask, layout: packing.Layout = packing.Layout()) -> packing.Packed:
    device = queries.device
    ids = torch.cat([queries, responses], 1)
    real = torch.cat([query_mask.bool(), response_mask.bool()], 1)
    sequences = [ids[b][real[b]] for b in range(ids.shape[0])]
    prompt_lengths = query_mask.long().sum(1)
    # _common_prefix is unchanged by groups, so the oracle uses the module's own.
    prefix = packing._common_prefix(sequences, int(prompt_lengths.min()) - 1) if layout.share_prefix and layout.row_tokens else 0
    lengths = [len(s) - prefix for s in sequences]  # what each sequence adds to a row
    rows: list[list[int]] = [[]]
    for b, n in enumerate(lengths):
        if rows[-1] and prefix + sum(lengths[i] for i in rows[-1]) + n > layout.row_tokens:
            rows.append([])
        rows[-1].append(b)
    width = max(prefix + sum(lengths[i] for i in row) for row in rows)
    input_ids = torch.zeros((len(rows), width), dtype=ids.dtype, device=device)
    # The filler stays at position 0, each token a sequence of its own: counting on would run past
    # the position table of a model with learned absolute positions (GPT-2).
    positions = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    segments = torch.full((len(rows), width), -1, device=device)  # 0: the prefix, k: the row's k-th sequence, -1: filler
    start = [0] * len(lengths)  # flat position of each sequence's first token, had its prefix been laid out with it
    columns = [real[b].nonzero().squeeze(-1) + b * ids.shape[1] for b in range(ids.shape[0])]  # each sequence's real tokens in the flat grid
    source = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    place = torch.zeros(ids.numel(), dtype=torch.long, device=device)
    for r, row in enumerate(rows):
        input_ids[r, :prefix] = sequences[0][:prefix]
        positions[r, :prefix] = torch.arange(prefix, device=device)
        segments[r, :prefix] = 0
        source[r, :prefix] = columns[row[0]][:prefix]
        offset = prefix
        for k, b in enumerate(row, start=1):
            n = lengths[b]
            input_ids[r, offset : offset + n] = sequences[b][prefix:]
            positions[r, offset : offset + n] = torch.arange(prefix, prefix + n, device=device)
            segments[r, offset : offset + n] = k
            source[r, offset : offset + n] = columns[b][prefix:]
            place[columns[b][:prefix]] = r * width + torch.arange(prefix, device=device)
            place[columns[b][prefix:]] = r * width + offset + torch.arange(n, device=device)
            start[b] = r * width + offset - prefix
            offset += n
    attention_mask = None
    if prefix:
        causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
        same = segments[:, :, None] == segments[:, None, :]
        attention_mask = (causal & (same | (segments[:, None, :] == 0)))[:, None]
    start_t = torch.tensor(start, device=device)
    steps = torch.arange(responses.shape[1], device=device)
    before = (start_t + prompt_lengths - 1)[:, None] + steps[None, :]
    predicts = torch.zeros(input_ids.numel(), dtype=torch.bool, device=device)
    predicts[before[response_mask.bool()]] = True
    return packing.Packed(
        input_ids=input_ids,
        position_ids=positions,
        predicts=predicts.view_as(input_ids),
        last=start_t + prefix + torch.tensor(lengths, device=device) - 1,
        response_mask=response_mask.bool(),
        tokens=responses[response_mask.bool()],
        source=source,
        place=place.view_as(ids),
        attention_mask=attention_mask,
        prefix=prefix,
    )
