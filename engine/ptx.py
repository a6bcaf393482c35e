"""PPO-ptx (InstructGPT §3.5): microbatches of SFT rows mixed into the update, the loss
on the response only. The stream is a pure function of how many microbatches it has
given, which is checkpointed, so a resumed run draws on exactly where the killed one
stopped; each process takes its own share of every global round, so processes never
train on the same rows at once."""

from __future__ import annotations

import random

from engine.chat import encode_prompt
from engine.packing import pad_sequences


class PtxStream:
    def __init__(self, examples: list[tuple[list[int], list[int]]], microbatch_size: int, pad_id: int, device, seed: int, rank: int = 0, world: int = 1):
        """examples: (input ids, labels with -100 on the prompt) per SFT row."""
        self.examples, self.size, self.pad_id, self.device = examples, microbatch_size, pad_id, device
        self.seed, self.rank, self.world = seed, rank, world
        self.per_epoch = len(examples) // microbatch_size  # whole microbatches per pass over the rows
        self.drawn = 0  # microbatches this process has taken; the same count on every process

    def state_dict(self) -> dict:
        return {"drawn": self.drawn}

    def load_state_dict(self, state: dict) -> None:
        self.drawn = state["drawn"]

    def indices(self, drawn: int) -> list[int]:
        """Rows of this process's `drawn`-th microbatch: global microbatch drawn * world +
        rank of an endless series of fixed-seed shuffles."""
        epoch, k = divmod(drawn * self.world + self.rank, self.per_epoch)
        order = list(range(len(self.examples)))
        random.Random(f"ptx:{self.seed}:{epoch}").shuffle(order)
        return order[k * self.size : (k + 1) * self.size]

    def __iter__(self):
        return self

    def __next__(self):
        chunk = [self.examples[i] for i in self.indices(self.drawn)]
        self.drawn += 1
        ids, mask = pad_sequences([seq for seq, _ in chunk], self.pad_id, "right", self.device)
        labels, _ = pad_sequences([lab for _, lab in chunk], -100, "right", self.device)
        return ids, mask, labels


def ptx_examples(rows: list[dict], tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """SFT rows (conversational prompt-completion form) as (ids, labels), cut to max_length."""
    examples = []
    for row in rows:
        prompt = encode_prompt(tokenizer, row["prompt"])
        response = tokenizer(row["completion"][0]["content"], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        ids = (prompt + response)[:max_length]
        examples.append((ids, ([-100] * len(prompt) + response)[: len(ids)]))
    return examples

