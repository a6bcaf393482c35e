"""Every training stage in bf16 autocast, as `precision: auto` runs them on a GPU, here on
the CPU (the rest of the suite pins fp32, whose tolerances it measures): each stage runs,
says so in its manifest, keeps fp32 master weights, and moves them."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline import cli
from tests.conftest import TINY_RM, planted_rankings, tiny_config, write_jsonl

BF16 = {"precision": "bf16"}
STAGES = ("sft", "rm", "rlhf", "dpo")


@pytest.fixture(scope="module")
def bf16_run(tiny_model_dir, sft_rows, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bf16")
    train = write_jsonl(tmp / "sft.jsonl", sft_rows[:24])
    rankings = write_jsonl(tmp / "rankings.jsonl", planted_rankings(sft_rows, 160))
    prompts = write_jsonl(tmp / "prompts.jsonl", [{"prompt": row["prompt"]} for row in sft_rows[:24]])
    path = tiny_config(
        tmp, tiny_model_dir, train, sft={"max_steps": 4, **BF16},
        rm={**TINY_RM, "data": {"train": str(rankings)}, **BF16},
        rlhf={"data": {"prompts": str(prompts)}, "method": "lora", "value_model": "reward", "value_layers": 1, "steps": 2, "batch_size": 4,
              "minibatch_size": 2, "microbatch_size": 2, "ppo_epochs": 1, "max_new_tokens": 6, "save_steps": 1, **BF16},
        dpo={"data": {"train": str(rankings)}, "max_steps": 4, "batch_size": 4, "max_length": 96, "save_steps": 10, "logging_steps": 1, **BF16},
    )
    assert cli.main(["run", "rlhf", "--config", str(path)]) == 0
    assert cli.main(["run", "dpo", "--config", str(path)]) == 0
    return tmp / "runs" / "tiny"


@pytest.mark.parametrize("stage", STAGES)
def test_each_training_stage_runs_in_bf16_and_keeps_fp32_weights_that_moved(bf16_run, stage):
    manifest = json.loads((bf16_run / stage / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["metrics"]["precision"] == "bf16"
    weights = load_file(bf16_run / stage / "model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float32}, "autocast computes in bf16; the weights it trains stay fp32"
    # bf16 weights would all be bf16-representable; fp32 masters after a few updates are not.
    assert any(not torch.equal(t, t.to(torch.bfloat16).float()) for t in weights.values())
    start = load_file(bf16_run / ("sft" if stage in ("rlhf", "dpo") else "base") / "model.safetensors")
    assert any(not torch.equal(weights[k], start[k]) for k in start if k in weights), f"{stage} trained nothing"


def test_the_reward_model_learns_a_planted_preference_in_bf16(bf16_run):
    metrics = json.loads((bf16_run / "rm" / "manifest.json").read_text())["metrics"]
    before, after = metrics["eval_before"], metrics["eval_after"]
    assert after["accuracy"] >= 0.95, (before, after)
    assert after["margin"] > 1.0 > 50 * abs(before["margin"]), "a fresh head barely separates; the trained one does"


def test_stages_of_one_process_may_differ_in_precision(tiny_model_dir, sft_rows, tmp_path):
    """`run rlhf` builds rm (here bf16) and rlhf (fp32) in one process: the rm Trainer's
    accelerate state must not pin the precision of the rlhf stage's Accelerator."""
    rankings = write_jsonl(tmp_path / "rankings.jsonl", planted_rankings(sft_rows, 24))
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": row["prompt"]} for row in sft_rows[:24]])
    path = tiny_config(
        tmp_path, tiny_model_dir, write_jsonl(tmp_path / "sft.jsonl", sft_rows[:24]), sft={"max_steps": 2},
        rm={**TINY_RM, "max_steps": 2, "data": {"train": str(rankings)}, **BF16},
        rlhf={"data": {"prompts": str(prompts)}, "steps": 1, "batch_size": 4, "minibatch_size": 4, "microbatch_size": 4, "ppo_epochs": 1, "max_new_tokens": 4},
    )
    assert cli.main(["run", "rlhf", "--config", str(path)]) == 0
    manifests = {stage: json.loads((tmp_path / "runs" / "tiny" / stage / "manifest.json").read_text()) for stage in ("rm", "rlhf")}
    assert manifests["rm"]["metrics"]["precision"] == "bf16" and manifests["rlhf"]["config"]["precision"] == "fp32"
