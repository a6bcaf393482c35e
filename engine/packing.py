"""Sequences as tensors for the forward passes after sampling: padding, and packing
several prompt + response sequences into one row without padding.

Every forward pass sees the same tensors: the prompt, then the response cut after
its first EOS, with position ids counted over real tokens only. So a token gets the
same log-probability when the rollout scores it and when the update recomputes it,
whatever its neighbours in the batch.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch
from torch import nn

from rl.trajectory import Rollout


def pad_sequences(sequences: list[list[int]], pad_id: int, side: str = "right", device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention_mask), both (len(sequences), longest) long: each sequence padded
    with `pad_id` on `side` ("left" for prompts that generation continues, "right"
    for everything else)."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, seq in enumerate(sequences):
        span = slice(width - len(seq), width) if side == "left" else slice(0, len(seq))
        ids[row, span] = torch.tensor(seq, dtype=torch.long)
        mask[row, span] = 1
    return ids.to(device), mask.to(device)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """0, 1, 2, ... over real tokens; left padding gets 0 (it is masked anyway). The
    same rule `generate` uses, so sampling and scoring agree."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def attention_kind(model: nn.Module) -> str | None:
    """The attention implementation transformers runs `model` with (sdpa, eager, ...)."""
    return getattr(model.config, "_attn_implementation", None)


ROW_TOKENS = 1024
"""Longest packed row, unless one sequence is longer on its own. Attention kernels without
variable-length support build a (row, row) mask per row; this bounds it."""


@dataclass(frozen=True)
class Layout:
    """How `pack` lays out sequences: up to `row_tokens` per row (0: one sequence per
    row, for models that attend across packed sequences), and with `share_prefix`
    the prompt tokens every sequence starts with once per row (a chat template's
    system prompt: SmolLM2's is 24 of the demo prompts' 41 tokens on average)."""

    row_tokens: int = ROW_TOKENS
    share_prefix: bool = True


@dataclass
class Packed:
    """A batch of prompt + response sequences laid end to end in rows, without padding,
    for every forward pass after sampling. Padded, a batch of uneven prompts and of
    responses that mostly stop early is about a third padding, and every forward and
    backward paid for it.

    Each sequence keeps the position ids it has alone. Without a shared prefix they
    restart at 0 for each sequence, and transformers builds the block-causal mask from
    them. With one, each row starts with the prefix, the sequences after it hold only
    what follows it, and `attention_mask` lets each attend to the prefix and to itself:
    the prefix attends only to itself, so its keys and values are the ones every
    sequence computes alone, computed once.

    Likewise the K answers to one prompt (GRPO, RLOO): consecutive sequences with the
    same prompt share its tokens after the prefix, but for the last, once per row; each
    member then holds its last prompt token and its response, and attends to the row
    prefix, the group's prompt and itself. The prompt's keys and values are again those
    of each sequence alone, and its gradient the sum of what each copy would collect."""

    input_ids: torch.Tensor  # (rows, row_len); filler after the last sequence of a row
    position_ids: torch.Tensor  # (rows, row_len)
    predicts: torch.Tensor  # (rows, row_len) bool: the token before a real response token, whose output predicts it and is the state it was chosen in
    last: torch.Tensor  # (batch,) flat position of each sequence's last real token (its EOS when it has one)
    response_mask: torch.Tensor  # (batch, response_len) bool
    tokens: torch.Tensor  # (n,) the real response tokens, sequence by sequence
    source: torch.Tensor | None = None  # (rows, row_len): where each packed token sits in the (batch, prompt_len + response_len) grid, flattened
    place: torch.Tensor | None = None  # (batch, prompt_len + response_len): where each grid token sits in the packed rows, flattened (0 on padding)
    attention_mask: torch.Tensor | None = None  # (rows, 1, row_len, row_len) bool, true where a query may attend a key; None when nothing is shared
    prefix: int = 0  # tokens shared at the start of every row
    value_inputs: torch.Tensor | None = None  # (rows, row_len, hidden), laid out from Rollout.value_inputs
    # What `attention_mask` is built from: a token sees the earlier tokens of its segment,
    # of its parent and of the row's prefix.
    segments: torch.Tensor | None = None  # (rows, row_len): 0 the row's prefix, k > 0 a group's prompt or a sequence's own tokens, -1 filler
    parents: torch.Tensor | None = None  # (rows, row_len): for a group member's own tokens, its group's prompt segment; else the token's own segment

    # Sequences are laid out in batch order, so positions taken from `predicts` in
    # memory order line up with `tokens` and with the true entries of `response_mask`.

    def unpack(self, flat: torch.Tensor, fill: float) -> torch.Tensor:
        """Per-token values (n,) back onto the (batch, response_len) grid, `fill` off the mask."""
        grid = torch.full(self.response_mask.shape, fill, dtype=flat.dtype, device=flat.device)
        return grid.index_put((self.response_mask,), flat)

    def to_grid(self, states: torch.Tensor) -> torch.Tensor:
        """Per-position states of these rows, (rows, row_len, ...), onto the unpacked
        (batch, prompt_len + response_len, ...) grid; padding gets a copy of some real state."""
        return states.flatten(0, 1)[self.place]

    def from_grid(self, grid: torch.Tensor) -> torch.Tensor:
        """The inverse of `to_grid` for this packing (filler gets some real state)."""
        return grid.flatten(0, 1)[self.source]

    def inputs(self, model: nn.Module) -> dict:
        """Keyword arguments for `model`'s forward: ids, positions and, with a shared
        prefix, the mask in the form its attention kernel takes."""
        kwargs = {"input_ids": self.input_ids, "position_ids": self.position_ids, "use_cache": False}
        if self.attention_mask is not None:
            kwargs["attention_mask"] = mask_argument(model, self.attention_mask)
        return kwargs


def mask_argument(model: nn.Module, attention_mask: torch.Tensor) -> torch.Tensor:
    """A packed (rows, 1, row_len, row_len) bool mask in the form `model`'s attention takes:
    as it is for SDPA, additive for eager attention (which adds the mask to its scores)."""
    if attention_kind(model) != "eager":
        return attention_mask
    dtype = next(model.parameters()).dtype
    return torch.zeros(attention_mask.shape, dtype=dtype, device=attention_mask.device).masked_fill(~attention_mask, torch.finfo(dtype).min)


def pack(queries, query_mask, responses, response_mask, layout: Layout = Layout()) -> Packed:
    """Lay each (left-padded prompt, right-padded response) end to end: consecutive
    sequences share a row while it stays within `layout.row_tokens`. With row_tokens=0
    each sequence gets a row of its own, right-padded, which any causal model reads
    right without packing support. With `layout.share_prefix`, the batch's common
    prompt start and each group's prompt are shared (see `Packed`). No real token
    attends to the filler (token 0) after the sequences of a row, so its id does not
    matter."""
    device = queries.device
    ids = torch.cat([queries, responses], 1)
    real = torch.cat([query_mask.bool(), response_mask.bool()], 1)
    sequences = [ids[b][real[b]] for b in range(ids.shape[0])]
    prompt_lengths = query_mask.long().sum(1)
    share = layout.share_prefix and layout.row_tokens > 0
    prefix = _common_prefix(sequences, int(prompt_lengths.min()) - 1) if share else 0
    heads, groups = _groups(queries, query_mask, prefix) if share else ([prefix] * len(sequences), list(range(len(sequences))))
    rows, reads, width = _lay_out([len(s) for s in sequences], heads, groups, prefix, layout.row_tokens)
    input_ids = torch.zeros((len(rows), width), dtype=ids.dtype, device=device)
    # The filler stays at position 0, each token a sequence of its own: counting on would run past
    # the position table of a model with learned absolute positions (GPT-2).
    positions = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    segments = torch.full((len(rows), width), -1, device=device)
    parents = torch.full((len(rows), width), -1, device=device)
    columns = [real[b].nonzero().squeeze(-1) + b * ids.shape[1] for b in range(ids.shape[0])]  # each sequence's real tokens in the flat grid
    source = torch.zeros((len(rows), width), dtype=torch.long, device=device)
    for r, spans in enumerate(rows):
        for b, lo, hi, offset, segment, parent in spans:
            cut = slice(offset, offset + hi - lo)
            input_ids[r, cut] = sequences[b][lo:hi]
            positions[r, cut] = torch.arange(lo, hi, device=device)
            segments[r, cut], parents[r, cut] = segment, parent
            source[r, cut] = columns[b][lo:hi]
    place = torch.zeros(ids.numel(), dtype=torch.long, device=device)
    for b, (r, spans) in enumerate(reads):
        for lo, hi, offset in spans:
            place[columns[b][lo:hi]] = r * width + offset + torch.arange(hi - lo, device=device)
    # Flat position each sequence's first token would have, had its whole sequence been laid out
    # with its own segment: position i of the sequence sits at start + i from its head on.
    start_t = torch.tensor([r * width + spans[-1][2] - spans[-1][0] for r, spans in reads], device=device)
    attention_mask = None
    if prefix or any(head > prefix for head in heads):
        causal = torch.ones((width, width), dtype=torch.bool, device=device).tril()
        seen = (segments[:, None, :] == segments[:, :, None]) | (segments[:, None, :] == parents[:, :, None]) | (segments[:, None, :] == 0)
        attention_mask = (causal & seen)[:, None]
    steps = torch.arange(responses.shape[1], device=device)
    before = (start_t + prompt_lengths - 1)[:, None] + steps[None, :]
    predicts = torch.zeros(input_ids.numel(), dtype=torch.bool, device=device)
    predicts[before[response_mask.bool()]] = True
    return Packed(
        input_ids=input_ids,
        position_ids=positions,
        predicts=predicts.view_as(input_ids),
        last=start_t + torch.tensor([len(s) for s in sequences], device=device) - 1,
        response_mask=response_mask.bool(),
        tokens=responses[response_mask.bool()],
        source=source,
        place=place.view_as(ids),
        attention_mask=attention_mask,
        prefix=prefix,
        segments=segments,
        parents=parents,
    )


def _groups(queries: torch.Tensor, query_mask: torch.Tensor, prefix: int) -> tuple[list[int], list[int]]:
    """Consecutive sequences with the same real prompt tokens (K answers sampled for one
    prompt) form a group: (heads, groups), per sequence where its own tokens start and
    the index of its group's first sequence. A member's own tokens start at its last
    prompt token, whose output is its own (it predicts the member's first response
    token); everything before that and after `prefix` is the group's, laid out once
    per row. Identical tokens at identical positions give identical keys and values,
    so sharing them is exact."""
    real = query_mask.bool()
    same = ((real[1:] == real[:-1]) & ((queries[1:] == queries[:-1]) | ~real[1:])).all(1).tolist()
    groups = [0]
    for b, repeat in enumerate(same, start=1):
        groups.append(groups[-1] if repeat else b)
    members = Counter(groups)
    lengths = real.sum(1).tolist()
    heads = [lengths[b] - 1 if members[g] > 1 and lengths[b] - 1 > prefix else prefix for b, g in enumerate(groups)]
    return heads, groups


def _lay_out(lengths: list[int], heads: list[int], groups: list[int], prefix: int, row_tokens: int):
    """Where each token goes: (rows, reads, width). rows[r] lists the spans laid out in row r
    as (b, lo, hi, offset, segment, parent): sequence b's tokens lo:hi at `offset`, in
    `segment` (0: the row's prefix), attending also to `parent` (the group's prompt
    segment for a member's own tokens). reads[b] = (r, [(lo, hi, offset), ...]): where
    all of sequence b's tokens sit, its own tokens last. A group that does not fit in
    a row lays its prompt out again in the next."""
    rows: list[list[tuple]] = []
    reads: list[tuple[int, list[tuple]]] = []
    widths: list[int] = []
    open_group = group_span = group_segment = None
    for b, (n, head, group) in enumerate(zip(lengths, heads, groups)):
        shared = head - prefix  # a group member's prompt after the prefix, laid out once per row; 0 for a lone prompt
        if not rows or widths[-1] + (shared if group != open_group else 0) + n - head > row_tokens:
            rows.append([(b, 0, prefix, 0, 0, 0)] if prefix else [])
            widths.append(prefix)
            open_group = None
        row = rows[-1]
        if shared and group != open_group:
            open_group, group_span, group_segment = group, (prefix, head, widths[-1]), len(row) + 1
            row.append((b, prefix, head, widths[-1], group_segment, group_segment))
            widths[-1] += shared
        segment = len(row) + 1
        row.append((b, head, n, widths[-1], segment, group_segment if shared else segment))
        reads.append((len(rows) - 1, [(0, prefix, 0)] * bool(prefix) + [group_span] * bool(shared) + [(head, n, widths[-1])]))
        widths[-1] += n - head
    return rows, reads, max(widths)


def _common_prefix(sequences: list[torch.Tensor], limit: int) -> int:
    """How many leading tokens every sequence shares, at most `limit` (so that each keeps
    at least its last prompt token, whose output is its own: the state its first
    response token was chosen in)."""
    if len(sequences) < 2 or limit <= 0:
        return 0
    first = sequences[0][:limit]
    n = len(first)
    for seq in sequences[1:]:
        differs = (seq[:n] != first[:n]).nonzero()
        n = int(differs[0]) if len(differs) else min(n, len(seq))
        if n == 0:
            return 0
    return n


def pack_rollout(batch: Rollout, layout: Layout) -> Packed:
    """`pack` for a rollout, with the value's recorded input states laid out alike."""
    packed = pack(batch.queries, batch.query_mask, batch.responses, batch.response_mask, layout)
    if batch.value_inputs is not None:
        packed.value_inputs = packed.from_grid(batch.value_inputs)
    return packed
