"""The Trainer stages launched on two CPU processes (gloo; tests/stages/two_processes.py
says how, and the tolerance): sft, rm and dpo under FSDP2 (with and without CPU offload),
DDP and DeepSpeed ZeRO-2 each end at the weights of one process taking the same global
batch, in plain from_pretrained folders; an sft run killed after a sharded checkpoint
resumes to the weights of an uninterrupted one. rlhf is in test_fsdp_rlhf.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from pipeline import cli
from tests.conftest import planted_rankings, tiny_config, write_jsonl
from tests.stages.two_processes import MAX_DIFF, assert_same_weights, kill_after_sharded_checkpoint_2_and_resume, launch, plain_folders, ran, run_dir

pytestmark = pytest.mark.launches

LORA = {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
# 51 sft rows and 30 rm/dpo training prompts: every step below is a full global batch of 8
# (a short last batch is padded differently by one and two processes).
SFT = {"max_steps": 4, "save_steps": 2, "learning_rate": 1e-3}
TRAINER = {"max_steps": 3, "learning_rate": 3e-3, "warmup_ratio": 0.0, "max_length": 96, "save_steps": 2, "logging_steps": 1}


@pytest.fixture(scope="module")
def data(sft_rows, tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("fsdp_data")
    return {"sft": write_jsonl(folder / "sft.jsonl", sft_rows[:64]), "pref": write_jsonl(folder / "pref.jsonl", planted_rankings(sft_rows, 40))}


def config(folder: Path, model_dir: Path, data: dict[str, Path], processes: int, lora: bool = False) -> Path:
    """sft, rm and dpo on the tiny model with a global batch of 8: 8 rows per process
    on one, 4 on each of two."""
    per_process = {"batch_size": 8 // processes, **(LORA if lora else {})}
    preferences = {"data": {"train": str(data["pref"]), "eval_fraction": 0.25}, **TRAINER, **per_process}
    return tiny_config(folder, model_dir, data["sft"], sft={**SFT, **per_process}, rm=preferences, dpo=preferences)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, data, tmp_path_factory):
    """The reference runs, in this process: {lora: run folder}, each with sft, rm and dpo."""
    runs = {}
    for lora in (False, True):
        path = config(tmp_path_factory.mktemp("one"), tiny_model_dir, data, processes=1, lora=lora)
        assert cli.main(["run", "rm", "--config", str(path)]) == 0
        assert cli.main(["run", "dpo", "--config", str(path)]) == 0
        runs[lora] = run_dir(path)
    return runs


@pytest.fixture(scope="module")
def fsdp2_full(tiny_model_dir, data, tmp_path_factory):
    """sft, rm and dpo (full fine-tuning) under FSDP2: its config and run folder."""
    path = config(tmp_path_factory.mktemp("fsdp2"), tiny_model_dir, data, processes=2)
    for stage in ("rm", "dpo"):
        result = launch("fsdp2", stage, path)
        ran(result)
        assert result.stdout.count("[fsdp_on_cpu] FSDP on CPU processes") == 2, "both processes ran FSDP, not DDP"
        assert "fallback" not in result.stdout, result.stdout
        assert json.loads((run_dir(path) / stage / "manifest.json").read_text())["distributed"] == "FSDP"
    return path, run_dir(path)


def test_sft_rm_and_dpo_under_fsdp2_match_one_process(fsdp2_full, one_process):
    _, run = fsdp2_full
    reference = one_process[False]
    assert_same_weights(run / "sft", reference / "sft", reference / "base")
    assert_same_weights(run / "rm", reference / "rm", reference / "sft")
    assert_same_weights(run / "dpo", reference / "dpo", reference / "sft")
    plain_folders(run)


def test_lora_under_fsdp2_matches_one_process_merged_and_adapter(tiny_model_dir, data, one_process, tmp_path):
    path = config(tmp_path, tiny_model_dir, data, processes=2, lora=True)
    for stage in ("rm", "dpo"):
        ran(launch("fsdp2", stage, path))
    run, reference = run_dir(path), one_process[True]
    for stage, parent in (("sft", "base"), ("rm", "sft"), ("dpo", "sft")):
        assert_same_weights(run / stage, reference / stage, reference / parent)
        adapter, want = load_file(run / stage / "adapter" / "adapter_model.safetensors"), load_file(reference / stage / "adapter" / "adapter_model.safetensors")
        assert adapter.keys() == want.keys() and max((adapter[k] - want[k]).abs().max().item() for k in want) <= MAX_DIFF
    plain_folders(run)


@pytest.mark.parametrize("accelerate_config", ["zero2", "zero3"])
def test_sft_rm_and_dpo_under_deepspeed_match_one_process(tiny_model_dir, data, one_process, tmp_path, accelerate_config):
    """ZeRO-3 partitions the weights as they load: the numbers before training, the reward
    model's layout probes and the final folder each gather them (engine/sharding.py)."""
    path = config(tmp_path, tiny_model_dir, data, processes=2)
    for stage in ("rm", "dpo"):
        result = launch(accelerate_config, stage, path)
        ran(result)
        assert "fallback" not in result.stdout, result.stdout
    run, reference = run_dir(path), one_process[False]
    manifest = json.loads((run / "sft" / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["distributed"] == f"DEEPSPEED (ZeRO-{accelerate_config[-1]})"
    for stage, parent in (("sft", "base"), ("rm", "sft"), ("dpo", "sft")):
        assert_same_weights(run / stage, reference / stage, reference / parent)
    plain_folders(run)


@pytest.mark.parametrize("accelerate_config", ["fsdp2_offload", "ddp"])
def test_sft_and_rm_under_fsdp2_with_offload_and_ddp_match_one_process(tiny_model_dir, data, one_process, tmp_path, accelerate_config):
    path = config(tmp_path, tiny_model_dir, data, processes=2)
    ran(launch(accelerate_config, "rm", path))
    run, reference = run_dir(path), one_process[False]
    assert_same_weights(run / "sft", reference / "sft", reference / "base")
    assert_same_weights(run / "rm", reference / "rm", reference / "sft")
    plain_folders(run)


def test_fsdp2_sft_killed_after_a_sharded_checkpoint_resumes_to_the_uninterrupted_weights(tiny_model_dir, data, fsdp2_full, tmp_path):
    path = config(tmp_path, tiny_model_dir, data, processes=2)
    resumed = kill_after_sharded_checkpoint_2_and_resume("sft", path)
    assert "resuming from" in resumed.stdout
    _, straight = fsdp2_full
    got, want = load_file(run_dir(path) / "sft" / "model.safetensors"), load_file(straight / "sft" / "model.safetensors")
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_an_fsdp_launch_that_accelerate_runs_as_ddp_says_so_once(tiny_model_dir, data, tmp_path):
    path = config(tmp_path, tiny_model_dir, data, processes=2)
    result = launch("fsdp2", "sft", path, shim=False)
    ran(result)
    note = "the launch asked for FSDP but accelerate runs MULTI_CPU (on CPU processes it drops FSDP): each process holds the whole model"
    assert result.stdout.count(f"[sft] fallback: {note}") == 1, result.stdout[-3000:]
    manifest = json.loads((run_dir(path) / "sft" / "manifest.json").read_text())
    assert note in manifest["fallbacks"] and manifest["distributed"] == "MULTI_CPU"
