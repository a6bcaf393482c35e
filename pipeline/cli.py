"""`python -m pipeline`, installed as `rlhf-pipeline`: the command line behind the make targets, and the one place
where the framework meets the stage registry (it hands `stages.STAGES` to the config
loader and the runner).

    python -m pipeline run [STAGE ...] [--config FILE] [--set KEY=VALUE ...] [--force]
    python -m pipeline status [--config FILE] [--set KEY=VALUE ...]
    python -m pipeline config [--config FILE] [--set KEY=VALUE ...]
    python -m pipeline generate [base|sft|rlhf|FOLDER] [--prompt TEXT] [--greedy | --temperature T --top-k K --top-p P]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from pipeline import config as configuration
from pipeline import generate
from pipeline.errors import EXIT_BAD_INPUT, EXIT_DIVERGED, ConfigError, TrainingDiverged
from pipeline.runner import Runner
from stages import STAGES, config_classes

DEFAULT_CONFIG = "configs/default.yaml"


def parser() -> argparse.ArgumentParser:
    names = [stage.name for stage in STAGES]
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", default=DEFAULT_CONFIG, help=f"run config (YAML); default {DEFAULT_CONFIG}")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a setting, e.g. sft.learning_rate=1e-5; repeatable; the value is YAML, spaces and all")
    common.add_argument("--set-many", action="append", default=[], metavar="'K=V K=V'", help="several overrides in one string, split as a shell would (make's SET)")
    prog = "rlhf-pipeline" if Path(sys.argv[0]).name == "rlhf-pipeline" else "python -m pipeline"
    top = argparse.ArgumentParser(prog=prog, description=f"rlhf-pipeline: {' -> '.join(names)}, with a checkpoint after each stage.")
    commands = top.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", parents=[common], help="run stages and whatever they need upstream")
    # No argparse choices: with nargs="*" Python 3.11 checks the empty default against them; main() names an unknown stage.
    run.add_argument("stage", nargs="*", metavar="STAGE", help=f"stages to reach, in one process ({', '.join(names)}; default: {names[-1]}, the whole pipeline)")
    run.add_argument("--force", action="store_true", help="rerun the named stages even if they are up to date")
    commands.add_parser("status", parents=[common], help="each stage's state, metrics and folder")
    commands.add_parser("config", parents=[common], help="print the resolved config as JSON")
    generate.add_arguments(commands.add_parser("generate", parents=[common], help="answer a prompt, or chat, with a checkpoint"))
    return top


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    names = [stage.name for stage in STAGES]
    unknown = [name for name in getattr(args, "stage", []) if name not in names]
    if unknown:
        print(f"error: run: unknown stage {unknown[0]!r} (stages: {', '.join(names)})", file=sys.stderr)
        return EXIT_BAD_INPUT
    # --set is one KEY=VALUE whatever its value holds (rlhf.rewards=[{source: rm, weight: 2}]);
    # make's SET="a=1 b='x y'" comes as --set-many and is split as a shell would
    overrides = [item for text in args.set_many for item in configuration.parse_overrides(text)] + list(args.set)
    if args.config == DEFAULT_CONFIG and not Path(DEFAULT_CONFIG).is_file():
        print(f"error: {DEFAULT_CONFIG}: config file not found (it is in the checkout; elsewhere pass --config FILE)", file=sys.stderr)
        return EXIT_BAD_INPUT
    try:
        cfg = configuration.load(args.config, overrides, config_classes())
        if args.command == "config":
            resolved = {"run": configuration.as_dict(cfg.run), **{k: configuration.as_dict(v) for k, v in cfg.stages.items()}}
            print(json.dumps(resolved, indent=2))
            return 0
        if args.command == "generate":
            return generate.main(args, cfg.run_dir)
        runner = Runner(cfg, STAGES)
        try:
            if args.command == "status":
                print(runner.status())
                return 0
            runner.run(*args.stage, force=args.force)
            return 0
        finally:
            runner.close()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except TrainingDiverged as e:
        print(f"diverged: {e}", file=sys.stderr)
        return EXIT_DIVERGED
    except KeyboardInterrupt:
        return 130


def launched() -> bool:
    """Whether this process is one of several a launcher started (torchrun and accelerate
    launch set WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def exit_process(code: int):
    """End the process with `code`. One of several launched processes ends with os._exit
    once its output is flushed, skipping the interpreter's teardown: there gloo's pending
    work can be freed after the process group is gone, and the process aborts with
    SIGABRT ("terminate called without an active exception") after a run that finished,
    which the launcher reports as a failed launch (seen in CI on 2026-12-01, 2 of 606 tests
    in two runs, despite destroy_process_group; pytorch/pytorch#179291 describes the cause).
    Every file a stage writes is complete and renamed into place before main() returns."""
    if not launched():
        raise SystemExit(code)
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def entry() -> None:
    """The console script and `python -m pipeline`: main(), then exit_process."""
    exit_process(main())
