"""The Trainer stages launched on two CPU processes (gloo; tests/stages/two_processes.py
says how, and the tolerance): sft, rm and dpo under FSDP2 (with and without CPU offload)
and DDP each end at the weights of one process taking the same global batch, in plain from_pretrained folders; an sft, rm or dpo run killed after a sharded
checkpoint resumes to the weights of an uninterrupted one. DeepSpeed is in test_deepspeed.py,
rlhf in test_sharded_rlhf.py."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.stages.two_processes import MAX_DIFF, SFT, TRAINER, assert_same_weights, config, killed_after_sharded_checkpoint_2, launch, plain_folders, ran, run_dir, trainer_data
from tests.stages.two_processes import one_process as one_process_run

pytestmark = pytest.mark.launches

@pytest.fixture(scope="module")
def data(sft_rows, tmp_path_factory) -> dict[str, Path]:
    return trainer_data(tmp_path_factory.mktemp("fsdp_data"), sft_rows)


@pytest.fixture(scope="module")
def one_process(tiny_model_dir, data, tmp_path_factory):
    """The reference runs: {lora: run folder}."""
    return {lora: one_process_run(tmp_path_factory.mktemp("one"), tiny_model_dir, data, lora) for lora in (False, True)}


@pytest.fixture(scope="module")
def fsdp2_full(tiny_model_dir, data, tmp_path_factory):
    """sft, rm and dpo (full fine-tuning) under FSDP2: its config and run folder."""
    path = config(tmp_path_factory.mktemp("fsdp2"), tiny_model_dir, data, processes=2)
    ran(result := launch("fsdp2", "rm dpo", path))
    assert result.stdout.count("[fsdp_on_cpu] FSDP on CPU processes") == 2, "both processes ran FSDP, not DDP"
    assert "fallback" not in result.stdout, result.stdout
    for stage in ("sft", "rm", "dpo"):
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
    ran(launch("fsdp2", "rm dpo", path))
    run, reference = run_dir(path), one_process[True]
    for stage, parent in (("sft", "base"), ("rm", "sft"), ("dpo", "sft")):
        assert_same_weights(run / stage, reference / stage, reference / parent)
        adapter, want = load_file(run / stage / "adapter" / "adapter_model.safetensors"), load_file(reference / stage / "adapter" / "adapter_model.safetensors")
        assert adapter.keys() == want.keys() and max((adapter[k] - want[k]).abs().max().item() for k in want) <= MAX_DIFF
    plain_folders(run)


@pytest.mark.parametrize("accelerate_config", ["fsdp2_offload", "ddp"])
def test_sft_and_rm_under_fsdp2_with_offload_and_ddp_match_one_process(tiny_model_dir, data, one_process, tmp_path, accelerate_config):
    path = config(tmp_path, tiny_model_dir, data, processes=2)
    ran(launch(accelerate_config, "rm", path))
    run, reference = run_dir(path), one_process[False]
    assert_same_weights(run / "sft", reference / "sft", reference / "base")
    assert_same_weights(run / "rm", reference / "rm", reference / "sft")
    plain_folders(run)


def test_fsdp2_stages_killed_after_a_sharded_checkpoint_resume_to_the_uninterrupted_weights(tiny_model_dir, data, fsdp2_full, tmp_path):
    """sft, rm and dpo in one launch, ended as if killed once a stage's checkpoint-2 is
    complete and launched again, as a preempted job is: each launch resumes the stage the
    last one left, finishes it, and is killed in the next."""
    _, straight = fsdp2_full
    path = config(tmp_path, tiny_model_dir, data, processes=2)
    launches = [killed_after_sharded_checkpoint_2("fsdp2", "sft rm dpo", path, stage) for stage in ("sft", "rm", "dpo")]
    ran(last := launch("fsdp2", "sft rm dpo", path))
    for stage, resumed in zip(("sft", "rm", "dpo"), [*launches[1:], last]):
        assert f"[{stage}] resuming from" in resumed.stdout and f"[pipeline] {stage}: done" in resumed.stdout, f"{stage}: {resumed.stdout[-3000:]}"
        manifest = json.loads((run_dir(path) / stage / "manifest.json").read_text())
        max_steps = (SFT if stage == "sft" else TRAINER)["max_steps"]
        assert manifest["timings"]["attempts"] == 2 and manifest["metrics"]["steps_last_attempt"] == max_steps - 2, f"{stage} started over"
        got, want = load_file(run_dir(path) / stage / "model.safetensors"), load_file(straight / stage / "model.safetensors")
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), f"{stage} differs after resuming"
