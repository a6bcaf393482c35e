"""Make the demo reward-model data as InstructGPT made its own: sample K completions
per prompt from the SFT model, then have a rater rank them. The rater is the gold
judge (`pipeline.demo_judge`) with Gaussian noise, so the reward model learns from
rankings, as it would from people, never from the judge's scores.

The shipped configs/data/demo_rm.jsonl was made once from the default run's SFT model:

    make sft && python -m pipeline.demo_rankings --policy runs/default/sft

(about ten minutes on 2 CPU cores). It is a cached set: retraining SFT does not
change it, and sampling differs across machines, so rebuild it rather than expect
the same bytes.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter

import torch

from pipeline import demo_judge, demo_prefs
from stages import generation

DEFAULT_OUT = "configs/data/demo_rm.jsonl"


def make_rankings(policy: str, k: int, noise: float, sampling: generation.Sampling, batch_size: int, seed: int, limit: int | None = None) -> tuple[list[dict], dict]:
    from tqdm.auto import tqdm

    prompts = demo_prefs.split_prompts(seed)["rank"][:limit]
    torch.manual_seed(seed)
    model, tokenizer = generation.load(policy)
    with tqdm(total=len(prompts), desc="sampling", unit="prompt") as bar:
        samples = generation.generate(model, tokenizer, [generation.user_prompt(r["prompt"]) for r in prompts], sampling, batch_size, num_return_sequences=k, progress=bar)
    rng = random.Random(f"demo_rankings/{seed}")
    rows, counts = [], Counter()
    for row, responses in zip(prompts, samples, strict=True):
        finished = [r.text for r in responses if r.ended]
        counts["samples"] += len(responses)
        counts["unfinished"] += len(responses) - len(finished)
        completions, stats = demo_prefs.rank(row["prompt"], finished, demo_judge.gold_score, noise, rng)
        if not completions:
            counts["prompts_without_a_preference"] += 1
            continue
        counts["pairs"] += stats["pairs"]
        counts["flipped_pairs"] += stats["flipped"]
        counts[f"k{len(completions)}"] += 1
        rows.append({"prompt": row["prompt"], "completions": completions, "task": row["task"]})
    return rows, dict(counts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Sample from an SFT model and rank with the demo judge (plus noise).")
    parser.add_argument("--policy", default="runs/default/sft", help="checkpoint to sample from (default runs/default/sft)")
    parser.add_argument("--out", default=DEFAULT_OUT, help=f"rankings file (default {DEFAULT_OUT})")
    parser.add_argument("--k", type=int, default=4, help="completions sampled per prompt (default 4)")
    parser.add_argument("--noise", type=float, default=0.25, help="std of the rater's noise on the gold score (default 0.25)")
    parser.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (default 1.0)")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per generate call (default 16)")
    parser.add_argument("--limit", type=int, default=None, help="use only the first N rank prompts")
    parser.add_argument("--seed", type=int, default=demo_prefs.DEFAULT_SEED)
    args = parser.parse_args(argv)
    if args.k < 2:
        parser.error("--k must be at least 2")
    start = time.time()
    sampling = generation.Sampling(max_new_tokens=args.max_new_tokens, temperature=args.temperature)
    rows, counts = make_rankings(args.policy, args.k, args.noise, sampling, args.batch_size, args.seed, args.limit)
    demo_prefs.write_jsonl(rows, args.out)
    print(f"wrote {len(rows)} rankings to {args.out} in {time.time() - start:.0f}s: {counts}")


if __name__ == "__main__":
    main()
