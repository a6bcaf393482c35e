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

from bench import default_config, require_finished


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rm", dest="rms", action="append", required=True, type=Path, help="a finished rm folder (repeatable)")
    parser.add_argument("--data", required=True, help="the rankings file whose held-out prompts to score")
    parser.add_argument("--seed", default=0, type=int, help="the run seed the split used (default 0, the default config's)")
    args = parser.parse_args(argv)
    for folder in args.rms:
        require_finished(parser, folder, f"--rm {folder}")
    cfg = default_config(parser, [f"rm.data.train={args.data}"]).stages["rm"]
    held = held_out(cfg, args.seed)
    print(json.dumps({"data": args.data, "seed": args.seed, "models": {str(folder): score(folder, cfg, held) for folder in args.rms}}))
    return 0


def held_out(cfg, seed: int) -> tuple[list, dict]:
    """The held-out rankings of cfg.data.train, split as the rm stage splits them, and the rows dropped."""
    from stages import rm
    from stages.shared import preferences

    rankings, _, dropped = rm.check(cfg)
    return preferences.split_by_prompt(rankings, cfg.data.eval_fraction, seed, "rm.data.train")[1], dropped


def score(folder: Path, cfg, held: tuple[list, dict]) -> dict:
    """`folder`'s accuracy on the `held` rankings, overall and by criterion."""
    from transformers import AutoModelForSequenceClassification

    from engine import probes
    from stages import rm
    from stages.shared import training
    from stages.shared.judge import load_judge

    rankings, dropped = held
    tokenizer = training.load_tokenizer(folder)  # each model encodes with its own tokenizer
    examples = rm.encode_all(tokenizer, rankings, cfg, dict(dropped), load_judge(cfg.criteria, "rm.criteria"))
    model = AutoModelForSequenceClassification.from_pretrained(folder)
    result = rm.evaluate(model, examples, cfg.eval_batch_size, rm.RankingCollator(tokenizer, probes.layout_for(model)))
    return {key: result[key] for key in ("accuracy", "pairs", "accuracy_by_criterion")}


if __name__ == "__main__":
    raise SystemExit(main())
