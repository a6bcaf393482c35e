"""The pipeline's stages, in order: the registry the CLI hands to the framework.
Adding a stage is a module in this folder and an entry here (see pipeline/stage.py
for the shape every stage module has).

Stage modules import torch, transformers and trl inside their functions, so that
validating a config or printing the status stays instant. Stages never import one
another; what they share lives in stages/shared/.
"""

from __future__ import annotations

from pipeline.stage import Stage
from stages import base, dpo, evaluation, rlhf, rm, sft

STAGES: tuple[Stage, ...] = (
    Stage("base", base.BaseConfig, (), base.check, base.run, base.headline, main_only=True),
    Stage("sft", sft.SftConfig, ("base",), sft.check, sft.run, sft.headline, card=True),
    Stage("rm", rm.RmConfig, ("sft",), rm.check, rm.run, rm.headline, card=True),
    Stage("rlhf", rlhf.RlhfConfig, ("sft", "rm"), rlhf.check, rlhf.run, rlhf.headline, input_settings=("init_from", "reward_model"), card=True),
    # Optional: in a run whose config has a dpo section, beside rm + rlhf on the same preference rows.
    Stage("dpo", dpo.DpoConfig, ("sft",), dpo.check, dpo.run, dpo.headline, card=True, optional=True),
    # Not a model: the report comparing every policy of the run on held-out prompts.
    Stage("eval", evaluation.EvalConfig, ("base", "sft", "rm", "rlhf", "dpo"), evaluation.check, evaluation.run, evaluation.headline, input_settings=(), main_only=True,
          publish=evaluation.publish),
)

BY_NAME = {stage.name: stage for stage in STAGES}


def config_classes() -> dict[str, type]:
    return {stage.name: stage.config for stage in STAGES}
