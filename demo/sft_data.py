"""The demo supervised-fine-tuning set.

The responses teach the format without being the best a rater could ask for: some
open warmly ("Sure!"), about a quarter end with one of the judge's closing lines,
few do both, which is the room PPO has to improve on (see `demo.judge`). The shipped
`configs/data/demo_sft.jsonl` rebuilds byte for byte with:

    python -m demo.sft_data --out configs/data/demo_sft.jsonl --n 480 --seed 0

Standard library only: the generator must run before (and without) any ML stack.
"""

from __future__ import annotations

import argparse
import itertools
import json
import random
from collections.abc import Iterable, Sequence
from pathlib import Path

from demo.judge import CLOSERS
from demo.tasks import FAMILIES, draw_rows

DEFAULT_N = 480
DEFAULT_SEED = 0
DEFAULT_PATH = "configs/data/demo_sft.jsonl"
CLOSER_RATE = 0.25
KEYS = ("prompt", "response", "task")


def max_rows() -> int:
    """The largest n that `generate` accepts: every distinct prompt of every family."""
    return sum(family.capacity for family in FAMILIES.values())


def generate(n: int, seed: int = DEFAULT_SEED) -> list[dict]:
    """n distinct-prompt rows {"prompt", "response", "task"}, the same for the same seed.

    Families take turns so the set stays balanced; one whose prompts are used up
    drops out. Rows are shuffled at the end so that any prefix of the file is a mix
    of families too.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    if n > max_rows():
        raise ValueError(f"can make at most {max_rows()} distinct prompts, asked for {n}")
    rng = random.Random(seed)
    quotas = {name: family.capacity for name, family in FAMILIES.items()}
    rows = []
    for task, prompt, response in itertools.islice(draw_rows(rng, quotas), n):
        if rng.random() < CLOSER_RATE:
            response = f"{response} {rng.choice(CLOSERS)}"
        rows.append({"prompt": prompt, "response": response, "task": task})
    rng.shuffle(rows)
    return rows


def write_jsonl(rows: Iterable[dict], path: str | Path, keys: Sequence[str] = KEYS) -> None:
    """One JSON object per line with exactly `keys`, in that order, whatever the rows' own order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps({k: row[k] for k in keys}, ensure_ascii=False) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Write the demo SFT set as JSONL.")
    parser.add_argument("--out", default=DEFAULT_PATH, help=f"output file (default {DEFAULT_PATH})")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"number of rows (default {DEFAULT_N})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"random seed (default {DEFAULT_SEED})")
    args = parser.parse_args(argv)
    try:
        rows = generate(args.n, args.seed)
    except ValueError as e:
        parser.error(str(e))
    write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} rows to {args.out}")


if __name__ == "__main__":
    main()
