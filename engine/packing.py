"""Sequences as tensors for the forward passes after sampling: padding, and packing
several prompt + response sequences into one row without padding.

Every forward pass sees the same tensors: the prompt, then the response cut after
its first EOS, with position ids counted over real tokens only. So a token gets the
same log-probability when the rollout scores it and when the update recomputes it,
whatever its neighbours in the batch.
"""

from __future__ import annotations

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
    sequence computes alone, computed once."""

    input_ids: torch.Tensor  # (rows, row_len); filler after the last sequence of a row
    position_ids: torch.Tensor  # (rows, row_len)
    predicts: torch.Tensor  # (rows, row_len) bool: the token before a real response token, whose output predicts it and is the state it was chosen in
    last: torch.Tensor  # (batch,) flat position of each sequence's last real token (its EOS when it has one)
    response_mask: torch.Tensor  # (batch, response_len) bool
    tokens: torch.Tensor  # (n,) the real response tokens, sequence by sequence
    source: torch.Tensor | None = None  # (rows, row_len): where each packed token sits in the (batch, prompt_len + response_len) grid, flattened
    place: torch.Tensor | None = None  # (batch, prompt_len + response_len): where each grid token sits in the packed rows, flattened (0 on padding)
    attention_mask: torch.Tensor | None = None  # (rows, 1, row_len, row_len) bool, true where a query may attend a key; None without a shared prefix
    prefix: int = 0  # tokens shared at the start of every row
    value_inputs: torch.Tensor | None = None  # (rows, row_len, hidden), laid out from Rollout.value_inputs

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
            if attention_kind(model) == "eager":  # eager attention adds the mask to its scores
                dtype = next(model.parameters()).dtype
                kwargs["attention_mask"] = torch.zeros(self.attention_mask.shape, dtype=dtype, device=self.attention_mask.device).masked_fill(~self.attention_mask, torch.finfo(dtype).min)
            else:
                kwargs["attention_mask"] = self.attention_mask
        return kwargs


def pack(queries, query_mask, responses, response_mask, layout: Layout = Layout()) -> Packed:
    """Lay each (left-padded prompt, right-padded response) end to end: consecutive
    sequences share a row while it stays within `layout.row_tokens`. With row_tokens=0
    each sequence gets a row of its own, right-padded, which any causal model reads
    right without packing support. No real token attends to the filler (token 0)
    after the sequences of a row, so its id does not matter."""
    device = queries.device
    ids = torch.cat([queries, responses], 1)
    real = torch.cat([query_mask.bool(), response_mask.bool()], 1)
    sequences = [ids[b][real[b]] for b in range(ids.shape[0])]
    prompt_lengths = query_mask.long().sum(1)
    prefix = _common_prefix(sequences, int(prompt_lengths.min()) - 1) if layout.share_prefix and layout.row_tokens else 0
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
    return Packed(
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
