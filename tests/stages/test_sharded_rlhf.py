"""rlhf launched on two CPU processes (gloo; tests/stages/two_processes.py says how, and
the tolerance). Under FSDP2 and under DeepSpeed ZeRO-2 and ZeRO-3 it ends at the weights of
rlhf under DDP (each process samples its own answers, so one process is no reference), for
the default config's layout (LoRA, the value on the reward model; also with CPU offload)
and for full fine-tuning with a value model, in plain from_pretrained folders; its learning
rate follows the schedule on any number of processes; a run killed after a sharded
checkpoint resumes to the weights of an uninterrupted one."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from tests.conftest import tiny_config, write_jsonl
from tests.stages.two_processes import assert_same_weights, kill_after_sharded_checkpoint_2_and_resume, launch, moved, ran, run_dir

pytestmark = pytest.mark.launches

PPO = {"steps": 4, "batch_size": 4, "minibatch_size": 2, "microbatch_size": 1, "ppo_epochs": 2, "learning_rate": 3e-3, "max_new_tokens": 5,
       "normalize_scores": False, "save_steps": 2}
PPO_LAYOUTS = {
    "lora-reward": {"method": "lora", "value_model": "reward", "value_layers": 1, "lora": {"r": 4, "alpha": 8}},  # the default config's
    "full": {"method": "full"},  # the value a trainable copy of the reward model
}


@pytest.fixture(scope="module")
def ppo_runs(policy_dir, planted_rm, prompts, sft_rows, tmp_path_factory) -> dict[tuple[str, str], tuple[Path, subprocess.CompletedProcess]]:
    """rlhf from the same policy under DDP and FSDP2, each layout: {(config, layout): (config path, result)}, launched when first asked."""
    runs: dict = {}
    sft = write_jsonl(tmp_path_factory.mktemp("ppo_data") / "sft.jsonl", sft_rows[:64])

    class Runs(dict):
        def __missing__(self, key):
            accelerate_config, layout = key
            section = {"init_from": str(policy_dir), "reward_model": str(planted_rm), "data": {"prompts": str(prompts)}, **PPO, **PPO_LAYOUTS[layout]}
            path = tiny_config(tmp_path_factory.mktemp(f"ppo_{accelerate_config}"), policy_dir, sft, rlhf=section)
            self[key] = (path, launch(accelerate_config, "rlhf", path))
            return self[key]

    return Runs(runs)


SHARDED = {"fsdp2": "FSDP", "fsdp2_offload": "FSDP", "zero2": "DEEPSPEED (ZeRO-2)", "zero3": "DEEPSPEED (ZeRO-3)"}


@pytest.mark.parametrize(("accelerate_config", "layout"), [("fsdp2", "lora-reward"), ("fsdp2", "full"), ("fsdp2_offload", "lora-reward"),
                                                           ("zero2", "lora-reward"), ("zero3", "lora-reward"), ("zero3", "full")])
def test_ppo_sharded_matches_ddp_in_plain_folders(ppo_runs, policy_dir, planted_rm, accelerate_config, layout):
    """ZeRO-3 partitions the trained module inside its engine: sampling gathers it with the
    engine's hooks off (engine/sharding.py), and the final folders gather it whole."""
    (_, ddp), (path, sharded) = ppo_runs["ddp", layout], ppo_runs[accelerate_config, layout]
    ran(ddp)
    ran(sharded)
    if accelerate_config.startswith("fsdp"):
        assert sharded.stdout.count("[fsdp_on_cpu] FSDP on CPU processes") == 2, "both processes ran FSDP, not DDP"
    unmerged = "sampling with the LoRA policy unmerged: the weights are sharded (same distribution, slower)"
    assert (unmerged in sharded.stdout) == (layout != "full" and accelerate_config != "zero2") and unmerged not in ddp.stdout  # ZeRO-2 keeps weights whole
    folder, reference = run_dir(path) / "rlhf", run_dir(ppo_runs["ddp", layout][0]) / "rlhf"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["metrics"]["episodes"] == 4 * 4 * 2 and manifest["distributed"] == SHARDED[accelerate_config]
    assert_same_weights(folder, reference, policy_dir)
    assert_same_weights(folder / "value", reference / "value", planted_rm)
    AutoModelForCausalLM.from_pretrained(folder)
    AutoModelForSequenceClassification.from_pretrained(folder / "value")
    assert not [p for p in folder.rglob("*") if p.suffix == ".distcp" or p.name.startswith("checkpoint-")]


@pytest.mark.parametrize(("accelerate_config", "layout"), [("ddp", "full"), ("zero2", "lora-reward")])
def test_the_learning_rate_follows_its_schedule_on_two_processes(ppo_runs, accelerate_config, layout):
    """accelerate steps a scheduler it prepared once per process each call, and DeepSpeed once
    per optimiser step (here 4 a PPO step): the linear decay would end at minus the peak rate."""
    path, result = ppo_runs[accelerate_config, layout]
    ran(result)
    rows = [json.loads(line) for line in (run_dir(path) / "rlhf" / "metrics.jsonl").read_text().splitlines()]
    want = [PPO["learning_rate"] * (1 - step / PPO["steps"]) for step in range(1, PPO["steps"] + 1)]
    assert [row["lr"] for row in rows] == pytest.approx(want, abs=1e-12)
    assert [row["episode"] for row in rows] == [8, 16, 24, 32], "one line a step, counting both processes' batch_size prompts"


@pytest.mark.parametrize("accelerate_config", ["fsdp2", "zero3"])
def test_ppo_killed_after_a_sharded_checkpoint_resumes_to_the_uninterrupted_weights(ppo_runs, tmp_path, accelerate_config):
    straight, result = ppo_runs[accelerate_config, "lora-reward"]
    ran(result)
    path = moved(straight, tmp_path)
    resumed = kill_after_sharded_checkpoint_2_and_resume("rlhf", path, accelerate_config)
    assert "resuming the interrupted run from step 2" in resumed.stdout + resumed.stderr
    for name in ("model.safetensors", "value/model.safetensors"):
        got, want = load_file(run_dir(path) / "rlhf" / name), load_file(run_dir(straight) / "rlhf" / name)
        assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want), f"{name} differs after resuming"


def test_an_fsdp_launch_that_accelerate_runs_as_ddp_says_so_once_in_each_stage(ppo_runs, tmp_path):
    """sft, a Trainer stage (stages/shared/training.py), and rlhf (engine/driver.py) each
    notice it in their own code: one launch of both."""
    path = moved(ppo_runs["ddp", "full"][0], tmp_path)
    ran(result := launch("fsdp2", "sft rlhf", path, shim=False))
    note = "the launch asked for FSDP but accelerate runs MULTI_CPU (on CPU processes it drops FSDP): each process holds the whole model"
    for stage in ("sft", "rlhf"):
        assert result.stdout.count(f"[{stage}] fallback: {note}") == 1, result.stdout[-3000:]
        manifest = json.loads((run_dir(path) / stage / "manifest.json").read_text())
        assert note in manifest["fallbacks"] and manifest["distributed"] == "MULTI_CPU"
