"""PPO speed and memory on a fixed setup, printed as JSON.

    python -m bench.ppo_speed                    # every variant, 4 PPO steps each
    python -m bench.ppo_speed --variants lora-bf16 --steps 6

The setup matches the figure issue 4 compares against (TRL 1.12's PPOTrainer on
this kind of machine): SmolLM2-135M as policy, reference, value and reward model,
batch 8, 32 new tokens, 1 PPO epoch, one minibatch. Policy and reward model are the
run's sft and rm checkpoints (build them first: `make rm`). Each variant runs in its
own process so its peak RSS is its own. The first step (warm-up) is left out of
the per-step figures.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

VARIANTS = {
    "full-fp32": {"method": "full", "precision": "fp32"},
    "lora-fp32": {"method": "lora", "precision": "fp32"},  # value adapter on the policy's frozen weights
    "lora-value15": {"method": "lora", "precision": "fp32", "value_layers": 15},  # value adapter on the top 15 of 30 layers
    "lora-reward": {"method": "lora", "precision": "fp32", "value_model": "reward"},  # value adapter on the reward model
    "lora-reward8": {"method": "lora", "precision": "fp32", "value_model": "reward", "value_layers": 8},  # the default: on its top 8 layers, fed its states below them
    "lora-reward8-ckpt": {"method": "lora", "precision": "fp32", "value_model": "reward", "value_layers": 8, "activation_checkpointing": True},  # the default, recomputing the policy's activations
    "lora-reward8-bf16": {"method": "lora", "precision": "bf16", "value_model": "reward", "value_layers": 8},  # the default as a GPU runs it (precision auto)
    "lora-reward4": {"method": "lora", "precision": "fp32", "value_model": "reward", "value_layers": 4},
    "lora-unmerged": {"method": "lora", "precision": "fp32", "merge_for_sampling": False},
    "lora-fp32-micro4": {"method": "lora", "precision": "fp32", "microbatch_size": 4},
    "lora-shared": {"method": "lora", "value_model": "shared", "precision": "fp32"},
    "lora-shared-micro4": {"method": "lora", "value_model": "shared", "precision": "fp32", "microbatch_size": 4},
    "lora-bf16": {"method": "lora", "precision": "bf16"},  # only pays on CPUs with native bf16 (AVX512-BF16, AMX)
}
SETUP = {"batch_size": 8, "minibatch_size": 8, "microbatch_size": 8, "ppo_epochs": 1, "max_new_tokens": 32, "temperature": 0.7}
LEARNING_RATE = {"lora": 3e-4, "full": 1e-5}
"""Each method's rate, as the default config (LoRA) and TRL users (full) set it. It matters
for speed too: how far the policy moves in a few steps sets how long its answers are."""
TRL_1_12 = {"seconds_per_batch": 19.5, "episodes_per_second": 0.40, "peak_rss_gb": 7.3}


def run_one(variant: str, steps: int, run_dir: Path) -> dict:
    import torch

    from stages import rlhf

    settings = {**SETUP, **VARIANTS[variant]}
    settings["learning_rate"] = LEARNING_RATE[settings["method"]]
    cfg = rlhf.RlhfConfig(
        data=rlhf.RlhfData(prompts="configs/data/demo_prompts.jsonl"),
        steps=steps, save_steps=10_000, sample_steps=10_000, num_samples=1, eval_batch_size=32, **settings,
    )
    with tempfile.TemporaryDirectory() as out:
        rlhf.train(cfg, run_dir / "sft", run_dir / "rm", Path(out), seed=0)
        rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    timed = rows[1:] or rows
    phases = {k.removeprefix("time/"): round(statistics.mean(r[k] for r in timed), 3) for k in timed[0] if k.startswith("time/")}
    return {
        "variant": variant,
        "learning_rate": settings["learning_rate"],
        "steps_timed": len(timed),
        "seconds_per_batch": phases["step"],
        "episodes_per_second": round(SETUP["batch_size"] / phases["step"], 3),
        "seconds_per_phase": phases,
        "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "peak_gpu_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None,
        "mean_score_first_last": [rows[0]["objective/scores"], rows[-1]["objective/scores"]],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run-dir", default="runs/default", help="run folder holding sft/ and rm/")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--variants", default="lora-reward8,lora-fp32,full-fp32", help=f"comma-separated, from: {', '.join(VARIANTS)}")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    run_dir = Path(args.run_dir)
    if args.one:
        print("BENCH " + json.dumps(run_one(args.one, args.steps, run_dir)), flush=True)
        return 0
    for needed in ("sft", "rm"):
        if not (run_dir / needed / "manifest.json").is_file():
            print(f"error: {run_dir / needed} is missing; build it first (make rm)", file=sys.stderr)
            return 2
    results = []
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            print(f"error: unknown variant {variant!r} (known: {', '.join(VARIANTS)})", file=sys.stderr)
            return 2
        print(f"[bench] {variant} ...", file=sys.stderr, flush=True)
        done = subprocess.run([sys.executable, "-m", "bench.ppo_speed", "--one", variant, "--steps", str(args.steps), "--run-dir", str(run_dir)], capture_output=True, text=True)
        line = next((ln for ln in done.stdout.splitlines() if ln.startswith("BENCH ")), None)
        if done.returncode or line is None:
            print(done.stderr[-3000:], file=sys.stderr)
            return 1
        results.append(json.loads(line[len("BENCH ") :]))
        print(f"[bench] {variant}: {json.dumps(results[-1])}", file=sys.stderr, flush=True)
    print(json.dumps({"setup": {**SETUP, "model": "SmolLM2-135M-Instruct (run's sft and rm)", "threads": __import__("torch").get_num_threads()}, "baseline_trl_1_12": TRL_1_12, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
