"""The demo reward-model data, made as InstructGPT made its own: sample K completions
per rank prompt (`demo.prompts`) from the SFT model, then have a rater rank them. The
rater is the gold judge (`demo.judge`) with Gaussian noise, so the reward model learns
from rankings, as it would from people, never from the judge's scores.

With --written, the rater also sees one answer per prompt written as the SFT demonstrations
are (correct, in the demonstrations' styles, a closing line at their rate): as datasets like
UltraFeedback rank a stronger model's answer beside the weaker ones', so that most rankings
contrast a right answer with the samples' wrong ones (SFT samples are right about one time
in five).

The shipped sets were made once from the default run's SFT model:

    make sft
    python -m demo.rankings --policy runs/default/sft --written --k 8 --out configs/data/demo_rm_k8.jsonl
    python -m demo.rankings --policy runs/default/sft

The first, the default reward model's (400 rankings, 1,844 pairs), took 11 minutes on 2 CPU
cores; the second, K = 4 without written answers, is what the DPO config trains on. They
are cached sets: retraining SFT does not change them, and sampling differs across machines,
so rebuild them rather than expect the same bytes. `rank` is standard library only;
sampling imports the ML stack when it runs.
"""

from __future__ import annotations

import argparse
import random
import time
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from demo import prompts, sft_data
from demo.judge import CLOSERS, gold_score, mistaken

DEFAULT_OUT = "configs/data/demo_rm.jsonl"
KEYS = ("prompt", "completions", "task")


def rank(prompt: str, samples: Iterable[str], judge: Callable[[str, str], float], noise: float, rng: random.Random, prefer: str | None = None) -> tuple[list[str], dict]:
    """Order distinct samples best first, as a rater who follows `judge` with some noise.

    Samples the judge scores equally are one level: the rater has no preference
    among them, so one of them (at random; `prefer` where the level holds it) stands for
    the level. Each level's score gets Gaussian noise of std `noise` before sorting, so
    close calls flip now and then, as between human labellers. Returns (completions best first, counts); fewer
    than two levels means nothing to rank and an empty list.
    """
    by_level: dict[float, list[str]] = {}
    for text in dict.fromkeys(s.strip() for s in samples):  # distinct, in order
        if text:
            by_level.setdefault(judge(prompt, text), []).append(text)
    picked = [(gold + rng.gauss(0.0, noise), gold, prefer if prefer in texts else rng.choice(texts)) for gold, texts in sorted(by_level.items())]
    picked.sort(key=lambda t: -t[0])
    golds = [g for _, g, _ in picked]
    flips = sum(golds[i] < golds[j] for i in range(len(golds)) for j in range(i + 1, len(golds)))
    pairs = len(golds) * (len(golds) - 1) // 2
    return ([t for _, _, t in picked] if len(picked) >= 2 else []), {"pairs": pairs, "flipped": flips}


@dataclass(frozen=True)
class Settings:
    k: int = 4
    noise: float = 0.25
    max_new_tokens: int = 48
    temperature: float = 1.0
    batch_size: int = 16
    seed: int = prompts.DEFAULT_SEED
    limit: int | None = None
    written: bool = False
    contrast: bool = False  # with written: also its twin with the answer swapped for a mistake
    prompt_set: str = "rank"  # or "rank_more": more rank prompts, disjoint from the first


def make_rankings(policy: str, settings: Settings) -> tuple[list[dict], dict]:
    """Rows {"prompt", "completions" (best first), "task"} for the rank prompts, and counts."""
    import torch
    from tqdm.auto import tqdm

    from engine import sampling

    s = settings
    rows_in = prompts.split_prompts(s.seed)[s.prompt_set][: s.limit]
    torch.manual_seed(s.seed)
    model, tokenizer = sampling.load(policy)
    chats = [sampling.user_prompt(r["prompt"]) for r in rows_in]
    with tqdm(total=len(chats), desc="sampling", unit="prompt") as bar:
        samples = sampling.generate(model, tokenizer, chats, sampling.Sampling(max_new_tokens=s.max_new_tokens, temperature=s.temperature), s.batch_size, num_return_sequences=s.k, progress=bar)
    # The seed string keeps the module's old name, as the shipped rankings were made with it;
    # another prompt set gets its own rater noise, not a replay of the first set's draws.
    rng = random.Random(f"demo_rankings/{s.seed}" if s.prompt_set == "rank" else f"demo_rankings/{s.prompt_set}/{s.seed}")
    rows, counts = [], Counter()
    for row, responses in zip(rows_in, samples, strict=True):
        # A completion cut off at max_new_tokens is not one a rater would be shown.
        finished = [r.text for r in responses if r.ended]
        counts["samples"] += len(responses)
        counts["unfinished"] += len(responses) - len(finished)
        twin = None
        if s.written:
            finished.append(written := written_answer(row["response"], rng))
            counts["written"] += 1
            # The one contrast that isolates correctness: the same words, a wrong answer.
            # Kept for its level, since samples that score alike would otherwise stand in.
            if s.contrast and (twin := mistaken(row["prompt"], written)) is not None:
                finished.append(twin)
                counts["contrasts"] += 1
        completions, stats = rank(row["prompt"], finished, gold_score, s.noise, rng, prefer=twin)
        if not completions:
            counts["prompts_without_a_preference"] += 1
            continue
        counts["pairs"] += stats["pairs"]
        counts["flipped_pairs"] += stats["flipped"]
        counts[f"k{len(completions)}"] += 1
        rows.append({"prompt": row["prompt"], "completions": completions, "task": row["task"]})
    return rows, dict(counts)


def written_answer(response: str, rng: random.Random) -> str:
    """A demonstration-style answer: the drawn response, with a closing line at the SFT set's rate."""
    return f"{response} {rng.choice(CLOSERS)}" if rng.random() < sft_data.CLOSER_RATE else response


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
    parser.add_argument("--prompts", default="rank", choices=["rank", *prompts.LATER], help="which rank prompts (default rank; rank_more: 400 others)")
    parser.add_argument("--seed", type=int, default=prompts.DEFAULT_SEED)
    parser.add_argument("--written", action="store_true", help="also rank one demonstration-style answer per prompt")
    parser.add_argument("--contrast", action="store_true", help="with --written: also rank the written answer with its answer swapped for a plausible mistake")
    args = parser.parse_args(argv)
    if args.k < 2:
        parser.error("--k must be at least 2")
    if args.contrast and not args.written:
        parser.error("--contrast needs --written: the contrast is the written answer made wrong")
    start = time.time()
    settings = Settings(args.k, args.noise, args.max_new_tokens, args.temperature, args.batch_size, args.seed, args.limit, args.written, args.contrast, args.prompts)
    rows, counts = make_rankings(args.policy, settings)
    sft_data.write_jsonl(rows, args.out, KEYS)
    print(f"wrote {len(rows)} rankings to {args.out} in {time.time() - start:.0f}s: {counts}")


if __name__ == "__main__":
    main()
