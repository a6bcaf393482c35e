"""The Trainer stages (sft, rm, dpo) stop with exit 3 when training diverges, keep their
last good checkpoint, and promote nothing. The divergence is real: a learning rate of
1e30 makes the weights overflow within a few steps."""

import pytest
import torch
from safetensors.torch import load_file

from pipeline import checkpoint as ckpt
from pipeline import cli
from tests.conftest import TINY_RM, planted_rankings, tiny_config, write_jsonl

SECTIONS = {
    "sft": {},
    "rm": {**TINY_RM, "max_steps": 6},
    "dpo": {"max_steps": 6, "batch_size": 4, "max_length": 96, "warmup_ratio": 0.0, "logging_steps": 5},
}


@pytest.mark.parametrize("stage", ["sft", "rm", "dpo"])
def test_a_diverging_trainer_stage_exits_3_and_keeps_a_finite_checkpoint(stage, tiny_model_dir, sft_rows, tmp_path, capsys):
    sft_train = write_jsonl(tmp_path / "sft.jsonl", sft_rows[:24])
    prefs = write_jsonl(tmp_path / "prefs.jsonl", planted_rankings(sft_rows, 24))
    blown = {"learning_rate": 1e30, "max_grad_norm": 1e30, "save_steps": 1, "warmup_ratio": 0.0}
    sections = {"sft": {"max_steps": 2}} if stage != "sft" else {"sft": blown}
    if stage != "sft":
        sections[stage] = {**SECTIONS[stage], "data": {"train": str(prefs)}, **blown}
    path = tiny_config(tmp_path, tiny_model_dir, sft_train, **sections)
    assert cli.main(["run", stage, "--config", str(path)]) == 3
    captured = capsys.readouterr()
    assert f"diverged: {stage}: the weights are no longer finite" in captured.err
    run = tmp_path / "runs" / "tiny"
    assert not (run / stage).exists(), "a diverged stage is not promoted"
    latest = ckpt.latest_checkpoint(ckpt.partial_dir(run, stage))
    assert latest is not None and f"{stage}: diverged; its last good checkpoint (step {ckpt.checkpoint_step(latest)})" in captured.out
    weights = load_file(next(latest.glob("*.safetensors")))
    assert all(torch.isfinite(t).all() for t in weights.values()), "the checkpoint kept is a good one"
