"""Our critic-free RL (GRPO, RLOO) against TRL 1.16's GRPOTrainer and RLOOTrainer on one
setup, interleaved in each round (TRL, ours), every run in a fresh process.

    python -m bench.trl_grpo --run runs/default --steps 12 --rounds 3 \\
        --out bench/results/$(date +%F)-trl-grpo.json

Setup, alike on both sides (bench/grpo_child.py's SETUP holds the shared values, and
every setting each side ran with is recorded): the run's `sft` folder as policy, a
LoRA adapter (r 16, alpha 32, all linear layers, no dropout) at lr 3e-4 constant;
each step samples K = 4 answers (32 new tokens, temperature 0.7, no top-k/top-p) to
each of the next --prompts-per-step demo PPO prompts and makes one optimiser step on
them; KL coefficient 0.05 (GRPO: a k3 loss term; RLOO: k1 in the reward); the reward
is the demo's gold judge as a function (`demo.rewards:gold`), raw; fp32, same device.
The run trains on the first steps x prompts-per-step prompts of
configs/data/demo_prompts.jsonl, each seen once (in each side's own shuffled order);
round r uses seed --seed + r on both sides. `--sides ours` reruns our side alone after
a change to it: TRL's runs are deterministic on a CPU for a seed (seed 8's policy scored
the same gain on 2026-12-01 as in section 24), so its gains from an earlier file stand,
seed for seed; time and memory ratios need both sides in the same round.

Per run: seconds per step (the first is warm-up and left out of the median), episodes
per second, the process's peak RSS (loading, training and saving the policy), the
training reward each side logged on its first and last step, and the reward gain: the
mean gold reward on the first --eval-prompts held-out prompts (configs/data/demo_eval.jsonl),
one answer each from a fixed seed, of the saved policy minus that of the SFT policy,
scored by one function in a process of its own for both sides.

What still differs, because one side has no setting for it: TRL's RLOO loss scales the
gradient by 1/answers where ours (token mean) scales it by 1/tokens, the same direction;
TRL's RLOO runs an extra no-grad forward for the old log-probs, ours reuses the update's;
TRL's optimiser is its default fused AdamW, ours torch's AdamW (same arithmetic); each
side shuffles the prompts its own way; ours' train_call_seconds includes its greedy
check of one held-out prompt and a final checkpoint, which TRL's does not.

Prints one JSON line per run as it finishes, then the summary: per algorithm and side
the medians over rounds, ours/TRL ratios of time per episode and peak RSS (of the
medians and per round) and whether the issue's target holds (at most half the time per
episode and half the peak RSS, at least TRL's reward gain). --out gets the settings,
every run's row and the summary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
from importlib import metadata
from pathlib import Path

from bench.grpo_child import EVAL_PROMPTS, PROMPTS, SETUP

SIDES = ("trl", "ours")  # in this order within every round


def child(argv: list[str], log: Path) -> dict:
    """Run bench.grpo_child with `argv` and return the row it printed; its output goes to `log`."""
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, "-m", "bench.grpo_child", *argv], stdout=subprocess.PIPE, stderr=f, text=True)
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("ROW ")), None)
    if done.returncode or line is None:
        sys.stderr.write(log.read_text()[-4000:])
        raise SystemExit(f"error: bench.grpo_child {' '.join(argv)} failed (exit {done.returncode}); its log: {log}")
    return json.loads(line[len("ROW "):])


def median(values) -> float:
    return round(statistics.median(values), 4)


def summarize(rows: list[dict], algos: list[str], ran: list[str]) -> dict:
    """Per algorithm: each side's medians over rounds, then ours/TRL when both ran."""
    summary = {}
    for algo in algos:
        sides = {}
        for side in ran:
            mine = [r for r in rows if r["algo"] == algo and r["side"] == side]
            sides[side] = {
                "seconds_per_step": median(r["seconds_per_step_median"] for r in mine),
                "seconds_per_episode": median(1 / r["episodes_per_second"] for r in mine),
                "episodes_per_second": median(r["episodes_per_second"] for r in mine),
                "peak_rss_gb": median(r["peak_rss_gb"] for r in mine),
                "reward_gain": median(r["reward_gain"] for r in mine),
                "eval_reward_after": median(r["eval_reward_after"] for r in mine),
                "train_reward_first": median(r["train_reward_first_last"][0] for r in mine),
                "train_reward_last": median(r["train_reward_first_last"][1] for r in mine),
                "rounds": len(mine),
            }
        if len(sides) < 2:
            summary[algo] = sides
            continue
        trl, ours = sides["trl"], sides["ours"]
        # Same-round ratios: the machine's speed drifts between rounds (bench/RESULTS.md).
        by_round = {(r["round"], r["side"]): r for r in rows if r["algo"] == algo}
        rounds = sorted({key[0] for key in by_round})
        per_round = [{
            "round": n,
            "time_per_episode": round(by_round[n, "trl"]["episodes_per_second"] / by_round[n, "ours"]["episodes_per_second"], 3),
            "peak_rss": round(by_round[n, "ours"]["peak_rss_gb"] / by_round[n, "trl"]["peak_rss_gb"], 3),
            "reward_gain_minus_trl": round(by_round[n, "ours"]["reward_gain"] - by_round[n, "trl"]["reward_gain"], 4),
        } for n in rounds]
        ratios = {
            "time_per_episode": round(ours["seconds_per_episode"] / trl["seconds_per_episode"], 3),
            "peak_rss": round(ours["peak_rss_gb"] / trl["peak_rss_gb"], 3),
            "reward_gain_minus_trl": round(ours["reward_gain"] - trl["reward_gain"], 4),
        }
        target = {
            "time_per_episode_at_most_half": ratios["time_per_episode"] <= 0.5,
            "peak_rss_at_most_half": ratios["peak_rss"] <= 0.5,
            "reward_gain_at_least_trls": ours["reward_gain"] >= trl["reward_gain"],
        }
        summary[algo] = {**sides, "ours_over_trl": ratios, "ours_over_trl_per_round": per_round, "target": {**target, "met": all(target.values())}}
    return summary


def versions() -> dict:
    names = ("trl", "transformers", "torch", "peft", "accelerate", "datasets")
    return {"python": platform.python_version(), **{n: metadata.version(n) for n in names}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=Path("runs/default"), help="run folder holding sft/")
    parser.add_argument("--steps", type=int, default=12, help="optimiser steps per run (the first is warm-up)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--prompts-per-step", type=int, default=4, help="prompts per step; each gets K = 4 answers")
    parser.add_argument("--algos", default="grpo,rloo", help="comma-separated: grpo, rloo")
    parser.add_argument("--sides", default=",".join(SIDES), help="comma-separated: trl, ours (both, in that order within a round, for the ratios)")
    parser.add_argument("--seed", type=int, default=0, help="round r trains with seed SEED + r, on both sides")
    parser.add_argument("--eval-prompts", type=int, default=64, help=f"held-out prompts scored before and after (from {EVAL_PROMPTS})")
    parser.add_argument("--eval-seed", type=int, default=1234, help="the sampling seed of every scoring, so all policies share one random stream")
    parser.add_argument("--out", type=Path, default=Path(f"bench/results/{datetime.date.today()}-trl-grpo.json"))
    parser.add_argument("--work", type=Path, help="folder for the runs' policies and logs (default: a temporary one, removed at the end)")
    args = parser.parse_args(argv)
    algos = [a for a in args.algos.split(",") if a]
    if not algos or set(algos) - {"grpo", "rloo"}:
        parser.error(f"--algos: expected grpo and/or rloo, got {args.algos!r}")
    sides = [s for s in SIDES if s in args.sides.split(",")]
    if not sides or set(args.sides.split(",")) - set(SIDES):
        parser.error(f"--sides: expected trl and/or ours, got {args.sides!r}")
    if min(args.steps, args.rounds, args.prompts_per_step, args.eval_prompts) < 1:
        parser.error("--steps, --rounds, --prompts-per-step and --eval-prompts must be at least 1")
    sft = args.run / "sft"
    if not (sft / "config.json").is_file():
        print(f"error: {sft} is not a model folder; build it first (make sft)", file=sys.stderr)
        return 2
    work = args.work or Path(tempfile.mkdtemp(prefix="trl_grpo_"))
    work.mkdir(parents=True, exist_ok=True)
    common = ["--run", str(args.run), "--steps", str(args.steps), "--prompts-per-step", str(args.prompts_per_step)]
    scoring = ["--tokenizer", str(sft), "--prompts", str(args.eval_prompts), "--seed", str(args.eval_seed)]
    print(f"[trl_grpo] scoring {sft} (the policy before training); runs go to {work}", file=sys.stderr, flush=True)
    before = child(["score", "--policy", str(sft), *scoring], work / "score-sft.log")
    rows, settings = [], {side: {} for side in SIDES}
    for n in range(args.rounds):
        for algo in algos:
            for side in sides:
                name, seed = f"r{n}-{algo}-{side}", args.seed + n
                print(f"[trl_grpo] round {n + 1}/{args.rounds}: {algo}, {side} ...", file=sys.stderr, flush=True)
                row = child(["train", "--side", side, "--algo", algo, "--seed", str(seed), "--out", str(work / name), *common], work / f"{name}.log")
                after = child(["score", "--policy", row.pop("policy"), *scoring], work / f"score-{name}.log")
                settings[side].setdefault(algo, row.pop("settings"))  # alike in every round but for seed and paths
                row = {"round": n, "algo": algo, "side": side, "seed": seed, **row,
                       "eval_reward_before": before["mean_reward"], "eval_reward_after": after["mean_reward"],
                       "reward_gain": round(after["mean_reward"] - before["mean_reward"], 4), "eval_rated": after["rated"]}
                shutil.rmtree(work / name)  # 0.5 GB per SmolLM2 policy: keep only the logs
                rows.append(row)
                print(json.dumps(row), flush=True)
    summary = summarize(rows, algos, sides)
    setup = {**SETUP, "steps": args.steps, "prompts_per_step": args.prompts_per_step,
             "episodes_per_step": args.prompts_per_step * SETUP["samples_per_prompt"],
             "episodes": args.steps * args.prompts_per_step * SETUP["samples_per_prompt"],
             "train_prompts": f"the first {args.steps * args.prompts_per_step} of {PROMPTS}", "policy": str(sft),
             "eval": {"prompts": f"the first {args.eval_prompts} of {EVAL_PROMPTS}", "answers_per_prompt": 1, "seed": args.eval_seed}}
    result = {
        "command": " ".join(["python -m bench.trl_grpo", *(argv if argv is not None else sys.argv[1:])]),
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "versions": versions(),
        "machine": {"cpus": os.cpu_count(), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "torch_threads": rows[0]["torch_threads"]},
        "setup": setup, "eval_before": before, "summary": summary, "rows": rows, "settings": settings,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    if args.work is None:
        shutil.rmtree(work)
    print(json.dumps({"summary": summary, "out": str(args.out)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
