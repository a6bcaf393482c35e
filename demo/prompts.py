"""The demo task's prompt sets, disjoint from the SFT set and from each other.

One random stream of prompts that demo_sft does not use is cut into three sets, so
SFT, reward modelling, PPO and evaluation never share a prompt:

    rank    prompts whose sampled completions get ranked (`demo.rankings`)
    rl      PPO rollout prompts            configs/data/demo_prompts.jsonl
    eval    held-out evaluation prompts    configs/data/demo_eval.jsonl

and then `rank_more`, more rank prompts drawn on from the same stream after the three are
cut, so that adding it left the three sets (and the rankings made from them) as they were.

The two files rebuild byte for byte with `python -m demo.prompts --seed 0`; rebuild
them whenever demo_sft changes. Standard library only.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import random
from collections import Counter

from demo import sft_data
from demo.tasks import FAMILIES, draw_rows

DEFAULT_SEED = 0
DEFAULT_PROMPTS_PATH = "configs/data/demo_prompts.jsonl"
DEFAULT_EVAL_PATH = "configs/data/demo_eval.jsonl"
SPLITS = {"rank": 400, "rl": 256, "eval": 64}  # sizes, in drawing order
LATER = {"rank_more": 400}  # drawn after SPLITS are cut: growing it never moves a prompt of theirs
KEYS = ("prompt", "task")


@functools.cache
def _sft_prompts() -> tuple[tuple[str, str], ...]:
    rows = sft_data.generate(sft_data.DEFAULT_N, sft_data.DEFAULT_SEED)
    return tuple((r["task"], r["prompt"]) for r in rows)


def split_prompts(seed: int = DEFAULT_SEED, sizes: dict[str, int] = SPLITS, later: dict[str, int] = LATER) -> dict[str, list[dict]]:
    """Disjoint prompt sets, {name: rows {"prompt", "task", "response"}} for each name in
    `sizes` and then `later`; "response" is a correct answer written as the SFT demonstrations
    are (the rankings can show it to the rater beside the samples; the files keep prompt and task)."""
    sft = _sft_prompts()
    # A family leaves the rotation once the prompts demo_sft does not use run out.
    used = Counter(task for task, _ in sft)
    quotas = {name: family.capacity - used[name] for name, family in FAMILIES.items()}
    n = sum(sizes.values())
    if (asked := n + sum(later.values())) > sum(quotas.values()):
        raise ValueError(f"can make at most {sum(quotas.values())} prompts outside demo_sft, asked for {asked}")
    # The seed string still names the module's old home, demo_prefs: the shipped files come from it.
    rng = random.Random(f"demo_prefs/prompts/{seed}")
    stream = draw_rows(rng, quotas, avoid=(p for _, p in sft))
    drawn = list(itertools.islice(stream, n))
    rng.shuffle(drawn)  # any prefix is a mix of families
    out, start = {}, 0
    for name, size in sizes.items():
        out[name] = _rows(drawn[start : start + size])
        start += size
    for name, size in later.items():
        more = list(itertools.islice(stream, size))
        rng.shuffle(more)
        out[name] = _rows(more)
    return out


def _rows(drawn: list[tuple[str, str, str]]) -> list[dict]:
    return [{"prompt": prompt, "task": task, "response": response} for task, prompt, response in drawn]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the demo RL and evaluation prompt sets as JSONL.")
    parser.add_argument("--prompts-out", default=DEFAULT_PROMPTS_PATH, help=f"RL prompts (default {DEFAULT_PROMPTS_PATH})")
    parser.add_argument("--eval-out", default=DEFAULT_EVAL_PATH, help=f"held-out prompts (default {DEFAULT_EVAL_PATH})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    args = parser.parse_args(argv)
    sets = split_prompts(args.seed)
    sft_data.write_jsonl(sets["rl"], args.prompts_out, KEYS)
    sft_data.write_jsonl(sets["eval"], args.eval_out, KEYS)
    print(f"wrote {len(sets['rl'])} prompts to {args.prompts_out} and {len(sets['eval'])} to {args.eval_out}")


if __name__ == "__main__":
    main()
