"""The reward model on real human preferences (Anthropic HH-RLHF, harmless-base test split):
`configs/hh_rm.yaml` through the project's own rm stage, then one JSON summary.

    python -m bench.rm_hh [--init-from runs/default/base] [--set rm.max_steps=90 ...]

The data is not shipped with the project: the config reads it from ../shared/data/ (a
workplace folder); where that is absent this skips with a message. The base checkpoint comes
from `make base`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

CONFIG = "configs/hh_rm.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--init-from", default="runs/default/base", help="causal-LM folder the RM starts from (make base)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="more overrides of the config, e.g. rm.max_steps=90")
    args = parser.parse_args(argv)

    from pipeline import cli
    from pipeline import config as configuration
    from stages import config_classes

    overrides = [f"rm.init_from={args.init_from}", *args.set]
    named = [o.partition("=")[2] for o in overrides if o.startswith("rm.data.train=")]
    data = Path(named[-1] if named else yaml.safe_load(Path(CONFIG).read_text())["rm"]["data"]["train"])
    if not data.is_file():
        print(f"skipped: {data} is absent (the HH-RLHF file lives in the workplace's shared/data, not in this project)")
        return 0
    start = time.time()
    code = cli.main(["run", "rm", "--config", CONFIG, *[a for o in overrides for a in ("--set", o)]])
    if code:
        return code
    cfg = configuration.load(CONFIG, overrides, config_classes())
    manifest = json.loads((cfg.run_dir / "rm" / "manifest.json").read_text())
    metrics, log = manifest["metrics"], [json.loads(line) for line in (cfg.run_dir / "rm" / "trainer_log.jsonl").read_text().splitlines()]
    summary = next((row for row in log if "train_runtime" in row), {})
    print(json.dumps({
        "data": data.name,
        "settings": manifest["config"],
        "train_pairs": metrics["train_pairs"],
        "pairs_seen": metrics["steps"] * cfg.stages["rm"].batch_size * cfg.stages["rm"].gradient_accumulation_steps,
        "held_out_pairs": metrics["eval_after"]["pairs"],
        "dropped_bad_rows": metrics["dropped_bad_rows"],
        "cut_prompts": metrics.get("cut_prompts"),
        "held_out_accuracy_before": round(metrics["eval_before"]["accuracy"], 4),
        "held_out_accuracy_after": round(metrics["eval_after"]["accuracy"], 4),
        "train_seconds": summary.get("train_runtime"),
        "curve_eval_seconds_inside_training": round(sum(p.get("measure_seconds", 0) for p in metrics.get("curve", [])), 1),
        "curve": metrics.get("curve"),
        "stage_seconds": manifest["timings"]["seconds"],
        "wall_seconds": round(time.time() - start, 1),
    }, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
