"""Each advantage estimator against the PPO default on the demo, at equal episodes.

Every variant trains from the default run's SFT policy against its reward model (the
rlhf stage in a fresh process, `rlhf.init_from` and `rlhf.reward_model` pointing into
the default run, so nothing else is rebuilt), with the default's settings except
those the variant names; then one eval stage samples every policy on the 64 held-out
prompts with the same random stream and reports, per policy: RM score, gold score,
correctness share (and the other judge parts), KL from SFT, win rates over SFT, and
the training wall time.

    make pipeline                                  # the default run, if not built
    python -m bench.estimators --out bench/results/<date>-estimators.json
    python -m bench.estimators --variants grpo,grpo-correct --out ...

PPO rolls out 8 prompts a step for 24 steps (192 episodes); the group estimators 4
prompts x K=4 answers for 12 steps (192 episodes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

GROUPS = {"samples_per_prompt": 4, "batch_size": 16, "minibatch_size": 16, "microbatch_size": 16, "steps": 12}
GOLD_AUDIT = {"source": "demo.rewards:gold", "role": "audit", "name": "gold"}
VARIANTS = {  # the PPO default itself is the default run's rlhf, "rlhf" in the eval
    "grpo": {"advantage": "grpo", **GROUPS},
    "rloo": {"advantage": "rloo", **GROUPS},
    "reinforce_baseline": {"advantage": "reinforce_baseline", **GROUPS},
    "dr_grpo": {"advantage": "dr_grpo", **GROUPS},
    # configs/demo_grpo.yaml's rlhf: the correctness check as a second train reward
    "grpo-correct": {"advantage": "grpo", **GROUPS, "rewards": [{"source": "rm"}, {"source": "demo.rewards:correct", "name": "correct"}, GOLD_AUDIT]},
}


def run_rlhf(work: Path, run_dir: Path, sets: list[str]) -> Path:
    """The default config's rlhf stage alone, in a run of its own at `work` and in a process of
    its own: `run_dir`'s SFT model as policy and reference, `run_dir`'s rm as the reward unless
    `sets` names another (later --set wins); nothing of `run_dir` is rebuilt, and the runner
    reuses or resumes `work`'s stage. Returns the rlhf folder."""
    sets = [f"run.name={work.name}", f"run.output_dir={work.parent}", f"rlhf.init_from={run_dir / 'sft'}", f"rlhf.reward_model={run_dir / 'rm'}", *sets]
    command = [sys.executable, "-m", "pipeline", "run", "rlhf", "--config", "configs/default.yaml"] + [arg for s in sets for arg in ("--set", s)]
    subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    return work / "rlhf"


def train(name: str, run_dir: Path, out_root: Path) -> dict:
    """The rlhf stage for one variant, in a process of its own; returns its wall time and manifest metrics."""
    sets = [f"rlhf.{key}={json.dumps(value)}" for key, value in VARIANTS[name].items()]
    folder = run_rlhf(out_root.parent / f"{out_root.name}-{name}", run_dir, sets)
    manifest = json.loads((folder / "manifest.json").read_text())
    metrics = manifest["metrics"]  # a variant already built is reused by the runner: its build time is in the manifest
    return {"folder": str(folder), "wall_seconds": manifest["timings"]["seconds"], "episodes": metrics["episodes"], "seconds_per_step": metrics["seconds_per_step"],
            "mean_scores_first": metrics["mean_scores_first"], "mean_scores_last": metrics["mean_scores_last"], "final_kl": metrics["final_kl"]}


def evaluate(trained: dict[str, dict], run_dir: Path, out: Path) -> dict:
    """One eval stage over base, SFT and every variant, as `compare_with` policies."""
    from stages import evaluation

    others = tuple(evaluation.OtherPolicy(name.replace("-", "_"), row["folder"]) for name, row in trained.items())  # report names are identifiers
    cfg = evaluation.EvalConfig(judge="demo.judge:gold_score", criteria="demo.judge:gold_parts", compare_with=others)
    inputs = {name: run_dir / name for name in ("base", "sft", "rm", "rlhf")}
    return evaluation.run(cfg, inputs, out, seed=0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/default", type=Path, help="the default run (its base, sft, rm and rlhf)")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--work", default="runs/estimators", type=Path, help="variant runs go to <work>-<variant>/, the eval to <work>-eval/eval/")
    parser.add_argument("--out", type=Path, help="JSON file for the raw results")
    args = parser.parse_args()
    names = [n for n in args.variants.split(",") if n]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:  # before any training
        parser.error(f"--variants: unknown {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    trained = {}
    for name in names:
        trained[name] = train(name, args.run, args.work)
        print(json.dumps({"variant": name, **trained[name]}), flush=True)
    metrics = evaluate(trained, args.run, Path(f"{args.work}-eval") / "eval")  # a run folder: the stage copies its report one level up
    ppo = json.loads((args.run / "rlhf" / "manifest.json").read_text())
    trained = {"rlhf": {"folder": str(args.run / "rlhf"), "wall_seconds": ppo["timings"]["seconds"], **{k: ppo["metrics"][k] for k in ("episodes", "seconds_per_step", "mean_scores_first", "mean_scores_last", "final_kl")}}, **trained}
    result = {"variants": {name: {"settings": VARIANTS.get(name, "the default (PPO, GAE)"), **row} for name, row in trained.items()}, "eval": metrics}
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
