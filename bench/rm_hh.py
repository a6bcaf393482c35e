"""Acceptance run: the reward model on real human preferences (Anthropic HH-RLHF,
harmless-base test split), held-out pairwise accuracy against the 50% chance line.

    python -m bench.rm_hh [--steps 60] [--init-from runs/default/sft]

The data is not shipped with the project: it is read from ../shared/data/ (a
workplace folder), and the script skips with a message where that is absent. The
pairs are split by prompt into train and held-out (10%), whole dialogues split at
their last assistant turn, rows with an empty reply dropped and counted.
"""

from __future__ import annotations

import argparse
import gzip
import json
import sys
import time
from pathlib import Path

import yaml

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "hh-rlhf-harmless-base-test.jsonl.gz"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DATA))
    parser.add_argument("--init-from", default="runs/default/sft", help="causal-LM folder the RM starts from")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--learning-rate", type=float, default=2e-5)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--output-dir", default="runs")
    args = parser.parse_args(argv)

    source = Path(args.data)
    if not source.is_file():
        print(f"skipped: {source} is absent (the HH-RLHF file lives in the workplace's shared/data, not in this project)")
        return 0
    if not (Path(args.init_from) / "config.json").is_file():
        print(f"error: {args.init_from} is not a model folder; build it first (make sft)", file=sys.stderr)
        return 2
    work = Path(args.output_dir) / "hh-rm"
    work.mkdir(parents=True, exist_ok=True)
    rows = work / "hh-rlhf-harmless-base-test.jsonl"
    with gzip.open(source, "rt", encoding="utf-8") as f:
        rows.write_text(f.read(), encoding="utf-8")
    config = {
        "run": {"name": "hh-rm", "output_dir": args.output_dir, "seed": 0},
        "rm": {
            "init_from": args.init_from,
            "data": {"train": str(rows), "eval_fraction": 0.1, "drop_bad_rows": True},
            "max_steps": args.steps, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
            "lr_scheduler": "linear", "warmup_ratio": 0.05, "max_length": args.max_length,
            "save_steps": 20, "logging_steps": 5, "eval_batch_size": 16,
        },
    }
    config_path = work / "hh-rm.yaml"
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))

    from pipeline import cli

    start = time.time()
    code = cli.main(["run", "rm", "--config", str(config_path)])
    if code:
        return code
    manifest = json.loads((Path(args.output_dir) / "hh-rm" / "rm" / "manifest.json").read_text())
    metrics = manifest["metrics"]
    before, after = metrics["eval_before"], metrics["eval_after"]
    print(json.dumps({
        "data": source.name,
        "train_pairs": metrics["train_pairs"],
        "held_out_pairs": after["pairs"],
        "dropped_bad_rows": metrics["dropped_bad_rows"],
        "settings": config["rm"],
        "held_out_accuracy_before": round(before["accuracy"], 4),
        "held_out_accuracy_after": round(after["accuracy"], 4),
        "chance": 0.5,
        "wall_seconds": round(time.time() - start, 1),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
