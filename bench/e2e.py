"""The slow end-to-end check (`make e2e`, about 15-20 minutes on 2 CPU cores): run the
real default config under its own run name, then require that on held-out prompts the
RLHF policy beats the SFT policy on the gold judge. Exits 1 if it does not.

    python -m bench.e2e [--config configs/default.yaml] [--name e2e]

Stages already built and up to date under that name are reused, so a second call
only re-checks; add --fresh to rebuild everything.
"""

from __future__ import annotations

import argparse
import json
import sys

from pipeline import cli
from pipeline import config as configuration
from stages import config_classes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run the default pipeline and check that RLHF beats SFT on the gold judge.")
    parser.add_argument("--config", default=cli.DEFAULT_CONFIG)
    parser.add_argument("--name", default="e2e", help="run name (default e2e), so the check never touches runs/default")
    parser.add_argument("--fresh", action="store_true", help="delete the run's folder first")
    args = parser.parse_args(argv)
    overrides = [f"run.name={args.name}"]
    run_dir = configuration.load(args.config, overrides, config_classes()).run_dir
    if args.fresh and run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    code = cli.main(["run", "--config", args.config, "--set", overrides[0]])
    if code != 0:
        return code
    metrics = json.loads((run_dir / "eval" / "report.json").read_text())["metrics"]
    sft, rlhf = metrics["policies"]["sft"], metrics["policies"]["rlhf"]
    if sft["gold_score"] is None:
        print(f"e2e: {args.config} has no gold judge (eval.judge); nothing to check", file=sys.stderr)
        return 1
    gain = rlhf["gold_score"] - sft["gold_score"]
    print(
        f"e2e: gold score on {metrics['prompts']} held-out prompts: sft {sft['gold_score']:.3f} -> rlhf {rlhf['gold_score']:.3f} "
        f"({gain:+.3f}), win rate {metrics['win_rate_gold']:.2f}, KL {rlhf['kl_from_sft']:.2f}"
    )
    if gain <= 0:
        print("e2e: FAILED: RLHF does not beat SFT on the gold judge", file=sys.stderr)
        return 1
    print("e2e: passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
