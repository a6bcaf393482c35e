"""The reward model's training step, padded against packed, on real rankings: seconds per
step, real tokens per second, and how close the step's arithmetic runs to this CPU's
matmul peak.

    python -m bench.rm_speed [--model runs/default/sft] [--data configs/data/demo_rm.jsonl]
                             [--batch-size 4] [--steps 6] [--rounds 2] [--max-length 256]
                             [--max-prompt-length N]

Padded is one completion per row, right-padded to the batch's longest (what the rm stage
ran before packing, `Layout(row_tokens=0)`); packed is the rm stage's layout: no padding,
each ranking's prompt once per row (`Layout()`). Both run the same batches, forward and
backward, with the same loss; rounds interleave the two (padded, packed, padded, ...)
because this machine's speed drifts. The matmul peak is a 2048^3 float32 matmul timed
here; a training step's arithmetic is about 6 x parameters x tokens run (forward 2,
backward 4), attention aside. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from engine.forward import packed_scores
from engine.packing import Layout
from stages import rm
from stages import rm_ranking as ranking
from stages.shared import preferences, training

LAYOUTS = {"padded": Layout(row_tokens=0, share_prefix=False), "packed": Layout()}


def matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    a @ b  # warm up
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def step(model, batch: dict) -> None:
    loss = ranking.ranking_loss(packed_scores(model, batch), *(batch[k] for k in ("better", "worse", "group", "margins")))
    model.zero_grad(set_to_none=True)
    loss.backward()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="runs/default/sft")
    parser.add_argument("--data", default="configs/data/demo_rm.jsonl")
    parser.add_argument("--batch-size", type=int, default=4, help="rankings per step (default 4, the demo's)")
    parser.add_argument("--steps", type=int, default=6, help="batches timed per round and layout")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--max-prompt-length", type=int, default=None)
    args = parser.parse_args()

    cfg = rm.RmConfig(data=preferences.PreferenceData(train=args.data, drop_bad_rows=True), max_length=args.max_length, max_prompt_length=args.max_prompt_length)
    rankings, _, _ = rm.check(cfg)
    tokenizer = training.load_tokenizer(args.model)
    examples = rm.encode_all(tokenizer, rankings[: args.batch_size * args.steps], cfg, {})
    batches = [examples[i : i + args.batch_size] for i in range(0, len(examples), args.batch_size)]
    model = rm.load_reward_model(args.model, tokenizer, seed=0).train()
    params = sum(p.numel() for p in model.parameters())
    real = sum(len(ids) for e in examples for ids in e["input_ids"])
    collated = {name: [rm.RankingCollator(tokenizer, layout)(batch) for batch in batches] for name, layout in LAYOUTS.items()}
    run_tokens = {name: sum(b["input_ids"].numel() for b in cb) for name, cb in collated.items()}
    peak = [matmul_gflops()]
    step(model, collated["packed"][0])  # warm up
    seconds: dict[str, list[float]] = {name: [] for name in LAYOUTS}
    for _ in range(args.rounds):
        for name in LAYOUTS:
            start = time.perf_counter()
            for batch in collated[name]:
                step(model, batch)
            seconds[name].append((time.perf_counter() - start) / len(batches))
        peak.append(matmul_gflops())
    out = {
        "model": args.model,
        "data": args.data,
        "rankings_per_step": args.batch_size,
        "steps": len(batches),
        "rounds": args.rounds,
        "threads": torch.get_num_threads(),
        "real_tokens_per_step": real / len(batches),
        "matmul_peak_gflops": round(statistics.median(peak), 1),
    }
    for name in LAYOUTS:
        s = statistics.median(seconds[name])
        tokens_run = run_tokens[name] / len(batches)
        out[name] = {
            "seconds_per_step": [round(x, 3) for x in seconds[name]],
            "tokens_run_per_step": tokens_run,
            "real_tokens_per_second": round(real / len(batches) / s, 1),
            "share_of_matmul_peak": round(6 * params * tokens_run / s / 1e9 / out["matmul_peak_gflops"], 3),
        }
    out["packed_speedup"] = round(statistics.median(seconds["padded"]) / statistics.median(seconds["packed"]), 3)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
