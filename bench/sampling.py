"""Our sampler against transformers' `generate` on a real policy: the same prompts and
settings, many answers each, compared on what a run is scored by (gold score, length, EOS
share). A check that the rollout samples the distribution `generate` does, in whole answers,
where tests/engine/test_sampling.py checks single tokens on a tiny model.

    python -m bench.sampling --side ours --repeats 2
    python -m bench.sampling --side generate --repeats 2
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

PROMPTS = "configs/data/demo_eval.jsonl"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--side", choices=("ours", "generate"), required=True)
    parser.add_argument("--policy", default="runs/default/sft")
    parser.add_argument("--repeats", type=int, default=2, help="passes over the 64 held-out prompts")
    parser.add_argument("--k", type=int, default=4, help="answers per prompt, sampled as one group (as GRPO's rollout)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import torch

    from demo.rewards import gold
    from engine import sampling
    from engine.chat import encode_prompt
    from engine.packing import pad_sequences
    from engine.reward_functions import prompt_text
    from rl.tokens import sequence_lengths, truncate_after_eos
    from stages.shared import data

    torch.manual_seed(args.seed)
    model, tokenizer = sampling.load(args.policy)
    prompts = data.read_prompts(PROMPTS, "eval")
    config = sampling.generation_config(tokenizer, sampling.Sampling(32, temperature=0.7, top_k=0, top_p=1.0))
    scores, lengths, ended, start = [], [], [], time.perf_counter()
    for _ in range(args.repeats):
        for i in range(0, len(prompts), 4):
            chunk = [p for p in prompts[i : i + 4] for _ in range(args.k)]
            queries, mask = pad_sequences([encode_prompt(tokenizer, p) for p in chunk], tokenizer.pad_token_id, "left", "cpu")
            with torch.no_grad():
                if args.side == "ours":
                    raw = sampling.sample(model, queries, mask, config)
                else:
                    raw = model.generate(input_ids=queries, attention_mask=mask, generation_config=config)[:, queries.shape[1] :]
            responses, response_mask, end = truncate_after_eos(raw, tokenizer.eos_token_id, tokenizer.pad_token_id)
            n = sequence_lengths(response_mask).tolist()
            texts = [tokenizer.decode(responses[j, : n[j]], skip_special_tokens=True).strip() for j in range(len(chunk))]
            scores += gold([prompt_text(p) for p in chunk], texts)
            lengths += n
            ended += end.tolist()
    print(json.dumps({"side": args.side, "policy": args.policy, "answers": len(scores), "gold_mean": round(statistics.mean(scores), 4),
                      "gold_standard_error": round(statistics.stdev(scores) / len(scores) ** 0.5, 4), "length_mean": round(statistics.mean(lengths), 3),
                      "eos_share": round(sum(ended) / len(ended), 4), "seconds": round(time.perf_counter() - start, 1)}))


if __name__ == "__main__":
    main()
