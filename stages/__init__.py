"""The pipeline's stages, in order. The runner learns everything it knows about a
stage from its entry here; adding a stage is adding an entry.

Every stage module follows the same shape:

    XConfig                                  frozen dataclass, the YAML section `x:`
    check(cfg) -> None                       validate inputs (data files, ...) before anything runs
    run(cfg, inputs, out_dir, seed) -> dict  build the checkpoint in out_dir, return its metrics
    headline(metrics) -> str                 one line for logs and `make status`

`inputs` maps each parent stage to the folder to read (the run's checkpoint, or the
folder the user named with `init_from`). Stage modules import torch, transformers
and trl inside their functions, so that validating a config or printing the status
stays instant.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from stages import base, evaluation, rlhf, rm, sft


@dataclass(frozen=True)
class Stage:
    name: str
    config: type
    inputs: tuple[str, ...]
    """Parent stages."""
    check: Callable
    run: Callable
    headline: Callable
    input_settings: tuple[str, ...] = ("init_from",)
    """Config keys naming a folder that replaces the parent at the same position."""
    main_only: bool = False
    """Runs on the main process alone when launched on several (nothing to train)."""


STAGES: tuple[Stage, ...] = (
    Stage("base", base.BaseConfig, (), base.check, base.run, base.headline, main_only=True),
    Stage("sft", sft.SftConfig, ("base",), sft.check, sft.run, sft.headline),
    Stage("rm", rm.RmConfig, ("sft",), rm.check, rm.run, rm.headline),
    Stage("rlhf", rlhf.RlhfConfig, ("sft", "rm"), rlhf.check, rlhf.run, rlhf.headline, input_settings=("init_from", "reward_model")),
    # Not a model: the report comparing base, SFT and RLHF on held-out prompts.
    Stage("eval", evaluation.EvalConfig, ("base", "sft", "rm", "rlhf"), evaluation.check, evaluation.run, evaluation.headline, input_settings=(), main_only=True),
)

BY_NAME = {stage.name: stage for stage in STAGES}


def config_classes() -> dict[str, type]:
    return {stage.name: stage.config for stage in STAGES}
