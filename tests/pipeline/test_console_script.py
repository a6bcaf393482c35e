"""The installed command, `rlhf-pipeline`: the CLI from any folder, outside the checkout."""

from __future__ import annotations

import json
import os
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


EXITING = """
import atexit, logging, sys
from pipeline import cli
atexit.register(lambda: print("teardown ran"))
logging.basicConfig(filename=sys.argv[1], level=logging.INFO)
logging.info("logged")
print("unflushed", end="")
cli.exit_process(3)
"""


def test_a_launched_process_exits_with_its_code_its_output_flushed_and_no_teardown(tmp_path):
    """One of several launched processes skips the interpreter's teardown (where gloo's
    leftovers can abort it after a finished run); a lone process exits normally."""
    for world, teardown in (("2", False), ("1", True)):
        log = tmp_path / f"log{world}"
        done = subprocess.run([sys.executable, "-c", EXITING, str(log)], capture_output=True, text=True, timeout=120, env={**os.environ, "WORLD_SIZE": world})
        assert done.returncode == 3, done.stderr
        assert done.stdout.startswith("unflushed"), "stdout flushed before os._exit"
        assert ("teardown ran" in done.stdout) is teardown
        assert "logged" in log.read_text(), "logging flushed"
