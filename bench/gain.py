"""Reward gain at the bench's setup: train PPO variants for a number of steps, then
sample every policy on the held-out eval prompts and score it with the run's reward
model and the demo's gold judge. The speed target only counts "with at least the
same reward gain", and this is where that is measured.

    python -m bench.gain --steps 24 --variants lora-shared,lora-fp32
    python -m bench.gain --steps 24 --policy trl=/tmp/trl_policy   # from bench/trl_ppo.py --save

Every policy answers each prompt `--samples` times, from the same random streams, at
the eval stage's settings (temperature 0.7, 32 new tokens). Prints JSON: per policy
the mean RM score (standardised as PPO saw it), gold score, KL from SFT, length and
EOS fraction, and its win rate over SFT by gold score (ties count half).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

from bench.ppo_speed import LEARNING_RATE, SETUP, VARIANTS


def train(variant: str, steps: int, run_dir: Path, out: Path, learning_rate: float | None = None, seed: int = 0) -> dict:
    from stages import rlhf

    settings = {**SETUP, **VARIANTS[variant]}
    settings["learning_rate"] = learning_rate or LEARNING_RATE[settings["method"]]
    cfg = rlhf.RlhfConfig(data=rlhf.RlhfData(prompts="configs/data/demo_prompts.jsonl"), steps=steps, save_steps=10_000, sample_steps=10_000, num_samples=1, eval_batch_size=32, **settings)
    start = time.time()
    metrics = rlhf.train(cfg, run_dir / "sft", run_dir / "rm", out, seed=seed)
    return {"variant": variant, "seed": seed, "learning_rate": settings["learning_rate"], "train_seconds": round(time.time() - start, 1), "seconds_per_step": round(metrics["seconds_per_step"], 2)}


def evaluate(policies: dict[str, Path], run_dir: Path, samples: int) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    from engine.probes import layout_for
    from stages import evaluation
    from stages.shared import data
    from stages.shared.judge import load_judge, reward_stats

    cfg = evaluation.EvalConfig(judge="demo.judge:gold_score")
    judge = load_judge(cfg.judge, "judge")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "sft")
    prompts = data.read_prompts(cfg.prompts, "eval.prompts", cfg.max_prompt_length, tokenizer)
    texts = [p[-1]["content"] for p in prompts]
    stats = reward_stats(run_dir / "rm")
    reward_model = AutoModelForSequenceClassification.from_pretrained(run_dir / "rm", num_labels=1).eval()
    reference = AutoModelForCausalLM.from_pretrained(run_dir / "sft").eval()
    rows: dict[str, list[dict]] = {}
    for name, folder in policies.items():
        policy = AutoModelForCausalLM.from_pretrained(folder).eval()
        rows[name] = []
        for seed in range(samples):
            torch.manual_seed(seed)  # the same streams for every policy
            scorers = evaluation.Scorers(policy, reference, reward_model, tokenizer, stats, layout_for(policy, reference, reward_model))
            for row, text in zip(evaluation.sample_and_score(scorers, prompts, cfg), texts, strict=True):
                rows[name].append({**row, "gold": judge(text, row["response"])})
        print(f"[bench_gain] {name}: {len(rows[name])} responses scored", file=sys.stderr, flush=True)

    def mean(values):
        values = list(values)
        return round(sum(values) / len(values), 4)

    table = {}
    for name, scored in rows.items():
        table[name] = {
            "rm_score": mean(r["rm_score"] for r in scored),
            "gold_score": mean(r["gold"] for r in scored),
            "kl_from_sft": mean(r["kl_from_sft"] for r in scored),
            "length": mean(r["length"] for r in scored),
            "eos_fraction": mean(float(r["ended"]) for r in scored),
            "win_rate_gold_vs_sft": mean(1.0 if a["gold"] > b["gold"] else 0.5 if a["gold"] == b["gold"] else 0.0 for a, b in zip(scored, rows["sft"], strict=True)),
        }
    return {"responses_per_policy": len(prompts) * samples, "policies": table}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/default", help="run folder holding sft/ and rm/")
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--variants", default="lora-shared", help=f"comma-separated, from: {', '.join(VARIANTS)}; empty for none")
    parser.add_argument("--policy", action="append", default=[], metavar="NAME=DIR", help="another trained policy folder to score (e.g. TRL's)")
    parser.add_argument("--lr", type=float, help=f"learning rate for every variant (default: {LEARNING_RATE})")
    parser.add_argument("--samples", type=int, default=4, help="responses per eval prompt")
    parser.add_argument("--seed", type=int, default=0, help="training seed (sampling and prompt order); the eval streams stay fixed")
    parser.add_argument("--out", default="runs/bench_gain", help="where the trained variants go")
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    for needed in ("sft", "rm"):
        if not (run_dir / needed / "manifest.json").is_file():
            print(f"error: {run_dir / needed} is missing; build it first (make rm)", file=sys.stderr)
            return 2
    variants = [v for v in args.variants.split(",") if v]
    for variant in variants:
        if variant not in VARIANTS:
            print(f"error: unknown variant {variant!r} (known: {', '.join(VARIANTS)})", file=sys.stderr)
            return 2
    policies = {"sft": run_dir / "sft"}
    for spec in args.policy:
        name, _, folder = spec.partition("=")
        if not folder or not (Path(folder) / "config.json").is_file():
            print(f"error: --policy {spec}: expected NAME=DIR with a model folder", file=sys.stderr)
            return 2
        policies[name] = Path(folder)
    training = []
    for variant in variants:
        name = variant + (f"-lr{args.lr:g}" if args.lr is not None else "") + (f"-seed{args.seed}" if args.seed else "")
        out = Path(args.out) / f"{variant}-{args.steps}{name[len(variant):]}"
        if out.exists():
            shutil.rmtree(out)  # a fresh run, not a resumed one
        print(f"[bench_gain] training {variant} for {args.steps} steps -> {out}", file=sys.stderr, flush=True)
        training.append(train(variant, args.steps, run_dir, out, args.lr, args.seed))
        policies[name] = out
    result = {"setup": {**SETUP, "steps": args.steps, "episodes": SETUP["batch_size"] * args.steps}, "training": training, **evaluate(policies, run_dir, args.samples)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
