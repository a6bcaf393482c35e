"""The installed command, `rlhf-pipeline`: the CLI from any folder, outside the checkout."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tests.conftest import tiny_config, write_jsonl

SCRIPT = Path(sys.executable).parent / "rlhf-pipeline"


def test_the_installed_command_runs_outside_the_checkout(tiny_model_dir, sft_rows, tmp_path):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    config = tiny_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "train.jsonl", sft_rows[:8]))
    shown = subprocess.run([str(SCRIPT), "config", "--config", str(config), "--set", "sft.max_steps=3"], cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["sft"]["max_steps"] == 3

    missing = subprocess.run([str(SCRIPT), "status"], cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert missing.stderr.strip() == "error: configs/default.yaml: config file not found (it is in the checkout; elsewhere pass --config FILE)"
    usage = subprocess.run([str(SCRIPT), "--help"], cwd=elsewhere, capture_output=True, text=True, timeout=120)
    assert usage.stdout.startswith("usage: rlhf-pipeline ")
