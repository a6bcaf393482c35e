"""The distributed path: two CPU processes under torchrun (gloo), as on a cluster."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from tests.conftest import ROOT, launch_env, tiny_config, write_jsonl

pytestmark = pytest.mark.launches


def test_sft_on_two_processes_shares_the_data_and_writes_one_checkpoint(tiny_model_dir, sft_rows, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows[:64])
    config = tiny_config(tmp_path, tiny_model_dir, train, sft={"max_steps": 8, "save_steps": 4})
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "pipeline", "run", "sft", "--config", str(config)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=launch_env(),
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("[pipeline] summary:") == 1, "only the main process reports"

    run = tmp_path / "runs" / "tiny"
    manifest = json.loads((run / "sft" / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    metrics = manifest["metrics"]
    # Each optimiser step consumes batch_size rows on each of the two ranks.
    steps_per_epoch = math.ceil(metrics["train_rows"] / (2 * 4))
    assert metrics["epochs"] == round(8 / steps_per_epoch, 3)
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".hashes")) == ["base", "sft"]
    AutoModelForCausalLM.from_pretrained(run / "sft")
