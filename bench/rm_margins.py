"""What a demo reward model pays for each thing the gold judge rewards, in its own units.

    python -m bench.rm_margins [--rm runs/default/rm] [--out FILE]

Held-out accuracy says whether the reward model orders a pair; PPO follows the size of the
gaps. The gold judge pays +1 for the right answer and +0.5 each for a warm opening and a
warm closing, so a policy that trades the answer for both pleasantries breaks even on gold.
If the reward model pays much more for the pleasantries than for the answer, PPO makes that
trade, which is what the default run shows.

For each held-out demo prompt (configs/data/demo_eval.jsonl, with the correct answer
written as the demonstrations are, `demo.prompts.split_prompts`):

    right     the written answer
    wrong     the same words with the answer swapped for the family's first plausible
              mistake ("watchs" for "watches", `demo.judge.mistaken`): only correctness differs
    warm      "Sure! " + right + " Hope that helps!": only the opening and closing differ

and the margins right - wrong (gold +1.0) and warm - right (gold +1.0), in the reward
model's standardised units (the scale PPO's reward is on), each prompt scored as PPO and
the eval score (chat prompt, answer, EOS). Prompts whose written answer already opens or
closes warmly, or that hold no single answer to swap, are left out of that margin.
Prints one JSON object: per family and overall, the median of each margin and their ratio.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from demo import prompts
from demo.judge import gold_parts, mistaken
from engine.chat import encode_prompt, user_prompt

OPENING, CLOSING = "Sure!", "Hope that helps!"


def variants(prompt: str, written: str) -> dict[str, str | None]:
    """right, wrong and warm for one prompt; None where that variant cannot isolate its criterion."""
    parts = gold_parts(prompt, written)
    warm = None if parts["warm_opening"] or parts["warm_closing"] else f"{OPENING} {written} {CLOSING}"
    return {"right": written, "wrong": mistaken(prompt, written), "warm": warm}


def scorer(rm_dir: Path):
    """score(prompt, answer): the reward model's standardised score, read at EOS."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from stages.shared.judge import reward_stats

    # Checked before anything loads: a wrong path is one line, not a Hub lookup's traceback.
    stats = reward_stats(rm_dir)
    if stats is None:
        raise SystemExit(f"error: {rm_dir}: no finished rm folder (its manifest.json, with the reward statistics, is missing)")
    mean, std = stats
    tokenizer = AutoTokenizer.from_pretrained(rm_dir)
    model = AutoModelForSequenceClassification.from_pretrained(rm_dir, num_labels=1, dtype=torch.float32).eval()

    def score(prompt: str, answer: str) -> float:
        ids = encode_prompt(tokenizer, user_prompt(prompt)) + tokenizer(answer, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        with torch.no_grad():
            return (model(input_ids=torch.tensor([ids])).logits[0, 0].item() - mean) / std

    return score


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def summary(margins: dict[str, list[float]]) -> dict:
    right, warm = median(margins["correct"]), median(margins["warmth"])
    return {"correct": right, "warmth": warm, "correct_over_warmth": round(right / warm, 3) if right is not None and warm else None,
            "prompts": {k: len(v) for k, v in margins.items()}}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rm", type=Path, default=Path("runs/default/rm"), help="a finished rm folder")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args(argv)
    score = scorer(args.rm)
    by_family: dict[str, dict[str, list[float]]] = {}
    for row in prompts.split_prompts()["eval"]:
        v = variants(row["prompt"], row["response"])
        right = score(row["prompt"], v["right"])
        margins = by_family.setdefault(row["task"], {"correct": [], "warmth": []})
        if v["wrong"] is not None:
            margins["correct"].append(right - score(row["prompt"], v["wrong"]))
        if v["warm"] is not None:
            margins["warmth"].append(score(row["prompt"], v["warm"]) - right)
    every = {k: [x for m in by_family.values() for x in m[k]] for k in ("correct", "warmth")}
    result = {"rm": str(args.rm), "gold": {"correct": 1.0, "warmth": 1.0, "correct_over_warmth": 1.0},
              "all": summary(every), "by_family": {name: summary(m) for name, m in sorted(by_family.items())}}
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        args.out.write_text(text + "\n")


if __name__ == "__main__":
    main()
