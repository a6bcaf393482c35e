"""Kill SFT for real, twice, and resume: the result matches an uninterrupted run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from pipeline import checkpoint as ckpt
from pipeline import cli
from tests.conftest import ROOT, load_config, tiny_config, write_jsonl

SETTINGS = {"max_steps": 60, "save_steps": 4, "learning_rate": 2e-3, "logging_steps": 4, "num_samples": 1}


def start(config: Path, stage: str = "sft") -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", stage, "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # signals reach this run only, not pytest
        # A shell starts background jobs with SIGINT ignored, and Python keeps an ignored
        # SIGINT ignored: restore the default so the Ctrl-C step works under `cmd &` too.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # noqa: PLW1509 (it only resets one signal before exec)
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )


def wait_for_checkpoint(process: subprocess.Popen, partial: Path, at_least: int, timeout: float = 240) -> int:
    deadline = time.time() + timeout
    while time.time() < deadline:
        latest = ckpt.latest_checkpoint(partial) if partial.exists() else None
        if latest is not None and ckpt.checkpoint_step(latest) >= at_least:
            return ckpt.checkpoint_step(latest)
        if process.poll() is not None:
            raise AssertionError("training ended before it could be interrupted:\n" + process.stdout.read())
        time.sleep(0.02)
    process.kill()
    raise AssertionError("no checkpoint appeared in time")


def kill_after_checkpoint(config: Path, stage: str, at_least: int) -> Path:
    """Run `stage` of `config` in a child process and SIGKILL it once a checkpoint of at
    least step `at_least` is complete; returns the stage's work folder, which it left."""
    run = Path(load_config(config).run_dir)
    process = start(config, stage)
    wait_for_checkpoint(process, ckpt.partial_dir(run, stage), at_least=at_least)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert not (run / stage).exists(), f"a killed {stage} is never promoted"
    return ckpt.partial_dir(run, stage)


def weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def test_interrupted_twice_and_resumed_equals_uninterrupted(tiny_model_dir, sft_rows, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows[:120])
    reference = tiny_config(tmp_path, tiny_model_dir, train, name="straight", sft=SETTINGS)
    assert cli.main(["run", "sft", "--config", str(reference)]) == 0

    config = tiny_config(tmp_path, tiny_model_dir, train, name="killed", sft=SETTINGS)
    run = tmp_path / "runs" / "killed"
    partial = ckpt.partial_dir(run, "sft")

    # 1. Ctrl-C: the runner stops cleanly with exit 130 and says how to resume.
    process = start(config)
    wait_for_checkpoint(process, partial, at_least=8)
    process.send_signal(signal.SIGINT)
    output, _ = process.communicate(timeout=120)
    assert process.returncode == 130, output
    assert "sft: interrupted; run the same command again to resume from step" in output
    assert not (run / "sft").exists()

    # 2. SIGKILL, like a power cut: no chance to clean up.
    process = start(config)
    first_resume = wait_for_checkpoint(process, partial, at_least=24)
    assert process.poll() is None, "the run must still be training when it is killed"
    process.kill()
    output, _ = process.communicate(timeout=60)
    assert "sft: resuming the interrupted run from step" in output
    assert not (run / "sft").exists(), "a killed stage never looks complete"
    assert json.loads((partial / ckpt.MANIFEST).read_text())["status"] == "running"

    # 3. Run again: it continues from the newest complete checkpoint and finishes.
    process = start(config)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    resumed_from = int(output.split("resuming the interrupted run from step ")[1].split()[0])
    assert resumed_from >= first_resume

    manifest = json.loads((run / "sft" / "manifest.json").read_text())
    straight = json.loads((tmp_path / "runs" / "straight" / "sft" / "manifest.json").read_text())
    assert manifest["timings"]["attempts"] == 3
    assert manifest["metrics"]["steps"] == 60
    assert manifest["metrics"]["steps_last_attempt"] == 60 - resumed_from, "the last attempt only trained what was left"
    assert straight["metrics"]["steps_last_attempt"] == 60
    assert manifest["fingerprint"] == straight["fingerprint"]
    assert manifest["metrics"]["eval_loss_before"] == straight["metrics"]["eval_loss_before"]

    expected, actual = weights(tmp_path / "runs" / "straight" / "sft"), weights(run / "sft")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.allclose(expected[name], actual[name], rtol=0, atol=1e-6), f"{name} differs after resuming"
    assert abs(manifest["metrics"]["eval_loss_after"] - straight["metrics"]["eval_loss_after"]) < 1e-6
    base = weights(tmp_path / "runs" / "straight" / "base")
    assert any(not torch.equal(base[n], expected[n]) for n in base), "training changed the weights"
