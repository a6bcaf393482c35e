"""Sampling under DeepSpeed ZeRO-3 (engine/sharding.py): inside `whole`, the engine's
parameter hooks are off, so generation runs on gathered weights that stay gathered for
every token (with the hooks on, each layer is freed after its forward and gathered again,
collectively, so processes whose answers end at different lengths would wait on each
other); afterwards the weights are partitioned again, the engine trains, and
`plain_copy` gathers them whole. One process (DeepSpeed's CPU accelerator and gloo), in a
subprocess: tests/engine/zero3_sampling.py."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from tests.conftest import ROOT, launch_env

pytest.importorskip("deepspeed")


def test_sampling_under_zero3_keeps_the_weights_gathered_and_hands_them_back(tiny_model_dir):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    env = launch_env(DS_ACCELERATOR="cpu")
    result = subprocess.run([sys.executable, "-m", "tests.engine.zero3_sampling", str(tiny_model_dir), port], cwd=ROOT, capture_output=True, text=True, timeout=180, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "zero3 sampling: ok" in result.stdout
