"""The Trainer stages (sft, rm, dpo) under DeepSpeed ZeRO-2 and ZeRO-3 on two CPU processes
(DeepSpeed's CPU accelerator with gloo; tests/stages/two_processes.py says how, and the
tolerance) end at the weights of one process taking the same global batch, in plain
from_pretrained folders. The launches go through tests/stages/deepspeed_on_cpu.py, which
spares each fresh machine the build of an op training never uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.stages.two_processes import assert_same_weights, config, launch, one_process, plain_folders, ran, run_dir, trainer_data

pytestmark = pytest.mark.launches


@pytest.fixture(scope="module")
def reference(tiny_model_dir, sft_rows, tmp_path_factory) -> tuple[dict[str, Path], Path]:
    """The data, and the one-process run folder on it."""
    data = trainer_data(tmp_path_factory.mktemp("deepspeed_data"), sft_rows)
    return data, one_process(tmp_path_factory.mktemp("one"), tiny_model_dir, data)


@pytest.mark.parametrize("accelerate_config", ["zero2", "zero3"])
def test_sft_rm_and_dpo_under_deepspeed_match_one_process(tiny_model_dir, reference, tmp_path, accelerate_config):
    """ZeRO-3 partitions the weights as they load: the numbers before training, the reward
    model's layout probes and the final folder each gather them (engine/sharding.py)."""
    data, one = reference
    path = config(tmp_path, tiny_model_dir, data, processes=2)
    ran(result := launch(accelerate_config, "rm dpo", path))
    assert "fallback" not in result.stdout, result.stdout
    run = run_dir(path)
    manifest = json.loads((run / "sft" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["distributed"] == f"DEEPSPEED (ZeRO-{accelerate_config[-1]})"
    for stage, parent in (("sft", "base"), ("rm", "sft"), ("dpo", "sft")):
        assert_same_weights(run / stage, one / stage, one / parent)
    plain_folders(run)
