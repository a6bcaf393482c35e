"""Several reward models on one rankings file's held-out prompts, so their accuracies compare.

    python -m bench.rm_heldout --rm runs/default/rm --rm runs/other/rm --data configs/data/demo_rm_k8.jsonl

Each rm stage reports accuracy on the held-out prompts of the file it trained on. Two files
ranked over the same prompts split them alike (by prompt, with the run seed), but their pairs
differ, so their accuracies are not on the same pairs. This scores every named reward model on
the held-out split of --data, as the rm stage of configs/default.yaml (with --data as its
training file) would hold it out, with the same encoding and criteria. Prints one JSON object:
per reward model, accuracy overall and by criterion.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rm", dest="rms", action="append", required=True, type=Path, help="a finished rm folder (repeatable)")
    parser.add_argument("--data", required=True, help="the rankings file whose held-out prompts to score")
    parser.add_argument("--seed", default=0, type=int, help="the run seed the split used (default 0, the default config's)")
    args = parser.parse_args(argv)
    for folder in args.rms:
        if not (folder / "manifest.json").is_file():
            parser.error(f"--rm {folder}: not a finished stage folder (no manifest.json)")

    from pipeline import config as configuration
    from pipeline.errors import ConfigError
    from stages import config_classes

    try:
        cfg = configuration.load("configs/default.yaml", [f"rm.data.train={args.data}"], config_classes()).stages["rm"]
    except ConfigError as error:
        parser.error(str(error))
    print(json.dumps({"data": args.data, "seed": args.seed, "models": {str(folder): score(folder, cfg, args.seed) for folder in args.rms}}))
    return 0


def score(folder: Path, cfg, seed: int) -> dict:
    """`folder`'s accuracy on the held-out split of cfg.data.train, overall and by criterion."""
    from transformers import AutoModelForSequenceClassification

    from engine import probes
    from stages import rm
    from stages.shared import preferences, training
    from stages.shared.judge import load_judge

    rankings, _, dropped = rm.check(cfg)
    _, held = preferences.split_by_prompt(rankings, cfg.data.eval_fraction, seed, "rm.data.train")
    tokenizer = training.load_tokenizer(folder)
    examples = rm.encode_all(tokenizer, held, cfg, dropped, load_judge(cfg.criteria, "rm.criteria"))
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    result = rm.evaluate(model, examples, cfg.eval_batch_size, rm.RankingCollator(tokenizer, probes.layout_for(model)))
    return {key: result[key] for key in ("accuracy", "pairs", "accuracy_by_criterion")}


if __name__ == "__main__":
    raise SystemExit(main())
