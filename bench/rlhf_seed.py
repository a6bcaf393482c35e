"""The default's rlhf stage again with a seed of its own, on a reward model you name, then its eval.

    python -m bench.rlhf_seed --rm runs/default/rm --seed 1 --out runs/seed1
    python -m bench.rlhf_seed --rm runs/default/rm --seed 1 --out runs/ptx1 --set rlhf.ptx_coef=1.0 --set rlhf.data.ptx=configs/data/demo_sft.jsonl

PPO's outcome varies with its seed. This runs the rlhf stage alone, in a run of its own at OUT
(`bench.estimators.run_rlhf`: configs/default.yaml's settings, the default run's SFT model as
policy and reference, `run.seed` set to --seed, so nothing of the default run is rebuilt; a killed
run resumes when started again), then the eval stage with seed 0, so SFT's answers are the same
stream every other eval of the default drew. Prints one JSON line with the timings; the report is
OUT/eval/report.md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from bench import default_config, require_finished
from bench.estimators import run_rlhf


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rm", required=True, type=Path, help="a finished rm folder (the reward PPO trains on)")
    parser.add_argument("--seed", required=True, type=int, help="rlhf's seed")
    parser.add_argument("--out", required=True, type=Path, help="the run folder for rlhf/ and eval/")
    parser.add_argument("--run", default=Path("runs/default"), type=Path, help="the run whose base and sft to use (default runs/default)")
    parser.add_argument("--samples", default=4, type=int, help="answers per eval prompt (default 4)")
    parser.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE", help="another rlhf setting, as the CLI's --set (repeatable): --set rlhf.ptx_coef=1.0")
    args = parser.parse_args(argv)
    # Checked before anything trains, so a typo costs nothing and overwrites nothing.
    for folder in (args.rm, args.run / "base", args.run / "sft"):
        require_finished(parser, folder, str(folder))
    if (args.out / "eval").exists():
        parser.error(f"--out {args.out}: already holds an eval; give a new folder")

    from stages import evaluation

    # --set is checked here too, so a bad key or value stops before rlhf starts.
    cfg = default_config(parser, [*args.sets, f"eval.samples_per_prompt={args.samples}"])
    start = time.time()
    policy = run_rlhf(args.out, args.run, [f"run.seed={args.seed}", f"rlhf.reward_model={args.rm}", *args.sets])
    rlhf_s = time.time() - start
    start = time.time()
    policies = {"base": args.run / "base", "sft": args.run / "sft", "rm": args.rm, "rlhf": policy}
    evaluation.run(cfg.stages["eval"], policies, args.out / "eval", 0)
    print(json.dumps({"rm": str(args.rm), "seed": args.seed, "sets": args.sets, "rlhf_seconds": round(rlhf_s), "eval_seconds": round(time.time() - start)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
