"""How many tokens a forward pass reads for a rollout of K answers per prompt, with each
group's prompt laid out once per row (engine/packing.py) and without: the same
sequences interleaved so that no two neighbours answer the same prompt, which leaves
only the system prompt shared, as before groups existed. Token counts only; no model.

    python -m bench.group_packing [--run runs/default] [--k 4]

The demo's answers average about 17 tokens; responses here are random ids of 8 to 24
tokens after the real demo prompts, 4 prompts x K answers per batch (the group runs'
batch). Prints JSON: tokens per layout, summed over 64 prompts.
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from engine.chat import encode_prompt
from engine.packing import Layout, pack, pad_sequences
from stages.shared import data


def batch_tokens(encoded: list[list[int]], lengths: list[int], pad_id: int) -> int:
    """Tokens `pack` lays out (filler excluded) for these prompts and response lengths, in this order."""
    queries, query_mask = pad_sequences(encoded, pad_id, "left")
    responses = torch.randint(10, 1000, (len(encoded), max(lengths)))
    response_mask = torch.arange(max(lengths))[None, :] < torch.tensor(lengths)[:, None]
    packed = pack(queries, query_mask, responses, response_mask, Layout())
    return int((packed.segments >= 0).sum())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/default")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--prompts", type=int, default=64)
    args = parser.parse_args()
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(f"{args.run}/sft")
    encoded = [encode_prompt(tokenizer, p) for p in data.read_prompts("configs/data/demo_prompts.jsonl", "prompts")[: args.prompts]]
    random.seed(0)
    totals = {"grouped": 0, "system_prompt_only": 0, "unpacked_real_tokens": 0, "padded": 0}
    for start in range(0, len(encoded), 4):
        prompts = encoded[start : start + 4]
        grouped = [p for p in prompts for _ in range(args.k)]  # the rollout's order: a group's answers together
        lengths = [random.randint(8, 24) for _ in grouped]
        interleaved = [i for member in range(args.k) for i in range(member, len(grouped), args.k)]
        totals["grouped"] += batch_tokens(grouped, lengths, tokenizer.pad_token_id)
        totals["system_prompt_only"] += batch_tokens([grouped[i] for i in interleaved], [lengths[i] for i in interleaved], tokenizer.pad_token_id)
        totals["unpacked_real_tokens"] += sum(len(p) for p in grouped) + sum(lengths)
        totals["padded"] += len(grouped) * (max(len(p) for p in grouped) + max(lengths))
    print(json.dumps({"k": args.k, "prompts": len(encoded), **totals, "grouped_over_system_prompt_only": round(totals["grouped"] / totals["system_prompt_only"], 3)}))


if __name__ == "__main__":
    main()
