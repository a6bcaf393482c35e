"""The stages launched the way the README says, with `accelerate launch --config_file
configs/accelerate/<name>.yaml`, on two CPU processes (gloo). The Trainer stages (sft, rm,
dpo) under FSDP2 (with and without CPU offload) and DDP each end at the weights of one
process taking the same global batch; rlhf under FSDP2 ends at the weights of rlhf under
DDP (each process samples its own answers, so one process is no reference), for the
default config's layout (LoRA, the value on the reward model; also with CPU offload) and
for full fine-tuning with a value model. All in the same plain from_pretrained folders; sft and rlhf runs
killed after a sharded checkpoint resume to the weights of uninterrupted ones.

On CPU, accelerate 1.15 silently drops FSDP (the run would be DDP), so the FSDP runs go
through tests/stages/fsdp_on_cpu.py, which lifts that one gate and nothing else.

Tolerance. Both runs see the same rows in the same steps, in fp32; only the order of the
sums differs (each process's half, then an all-reduce or reduce-scatter), so gradients
agree to ~1e-7 relative. Adam divides by sqrt(v) + eps (1e-8), which turns that into
larger update differences on the few elements whose gradient is within a few eps of
zero: measured at most 5.8e-5 on one element (rm, DDP; 4.4e-5 under FSDP2) of updates
up to 6e-3, and 1e-4 of the update as a whole. The bounds, MAX_DIFF = 2e-4 on any element
and NORM_RATIO = 1e-3 of the update's norm, are about three and ten times that; a wrong
data split, a missing gradient reduction or an unsynchronised rank moves the weights by a
whole step (~lr, 1e-3 to 3e-3) and fails them."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from pipeline import cli
from tests.conftest import ROOT, planted_rankings, tiny_config, write_jsonl

MAX_DIFF = 2e-4
NORM_RATIO = 1e-3
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


PPO = {"steps": 4, "batch_size": 4, "minibatch_size": 2, "microbatch_size": 1, "ppo_epochs": 2, "learning_rate": 3e-3, "max_new_tokens": 5,
       "normalize_scores": False, "save_steps": 2}
PPO_LAYOUTS = {
    "lora-reward": {"method": "lora", "value_model": "reward", "value_layers": 1, "lora": {"r": 4, "alpha": 8}},  # the default config's
    "full": {"method": "full"},  # the value a trainable copy of the reward model
}


def launch(accelerate_config: str, stage: str, config_path: Path, shim: bool = True, **env: str) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--config_file", f"configs/accelerate/{accelerate_config}.yaml", "--num_processes", "2", "--main_process_port", "0"]
    module = "tests.stages.fsdp_on_cpu" if accelerate_config.startswith("fsdp") and shim else "pipeline"
    if accelerate_config.startswith("zero"):
        env = {"DS_ACCELERATOR": "cpu", **env}  # DeepSpeed's CPU accelerator, with gloo; on GPUs it finds CUDA itself
    return subprocess.run([*command, "-m", module, "run", stage, "--config", str(config_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **env})


def ran(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert result.stdout.count("[pipeline] summary:") == 1, "only the main process reports"


def run_dir(config_path: Path) -> Path:
    return Path(yaml.safe_load(config_path.read_text())["run"]["output_dir"]) / "tiny"


def assert_same_weights(folder: Path, reference: Path, start: Path, name: str = "model.safetensors") -> None:
    """`folder` holds the weights `reference` holds (the one-process run), within the stated
    tolerance, relative to the update `reference` made from `start`."""
    got, want, before = load_file(folder / name), load_file(reference / name), load_file(start / "model.safetensors")
    assert got.keys() == want.keys(), f"{folder}: {sorted(got.keys() ^ want.keys())}"
    assert all(got[k].dtype == want[k].dtype and got[k].shape == want[k].shape for k in want)
    diff = max((got[k].double() - want[k].double()).abs().max().item() for k in want)
    moved = [k for k in want if k in before and before[k].shape == want[k].shape]
    norm = sum(((got[k].double() - want[k].double()) ** 2).sum() for k in moved) ** 0.5
    update = sum(((want[k].double() - before[k].double()) ** 2).sum() for k in moved) ** 0.5
    assert diff <= MAX_DIFF and norm <= NORM_RATIO * update, f"{folder}/{name}: max |diff| {diff:.3g}, |diff| / |update| {float(norm / update):.3g}"


def moved(config_path: Path, folder: Path) -> Path:
    """A copy of the config at `config_path` in `folder`, writing its runs there."""
    folder.mkdir(parents=True, exist_ok=True)
    settings = yaml.safe_load(config_path.read_text())
    settings["run"]["output_dir"] = str(folder / "runs")
    (path := folder / config_path.name).write_text(yaml.safe_dump(settings))
    return path


def kill_after_sharded_checkpoint_2_and_resume(stage: str, path: Path) -> subprocess.CompletedProcess:
    """`stage` under FSDP2 ended as if killed once checkpoint-2 is complete (each process
    having written its shard), then run again: the second run's result."""
    killed = launch("fsdp2", stage, path, EXIT_AFTER_CHECKPOINT="2")
    assert killed.returncode != 0
    shards = sorted(p.name for p in (run_dir(path) / f".{stage}.partial" / "checkpoint-2" / "pytorch_model_fsdp_0").glob("*.distcp"))
    assert shards == ["__0_0.distcp", "__1_0.distcp"], "each process wrote its own shard"
    ran(resumed := launch("fsdp2", stage, path))
    return resumed


def plain_folders(run: Path) -> None:
    """Finished folders load with from_pretrained and hold no sharded checkpoint."""
    for stage in ("sft", "dpo"):
        if (run / stage).exists():
            AutoModelForCausalLM.from_pretrained(run / stage)
    if (run / "rm").exists():
        AutoModelForSequenceClassification.from_pretrained(run / "rm")
    assert not [p for p in run.rglob("*") if p.suffix == ".distcp" or p.name.startswith("checkpoint-")]


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


def test_sft_rm_and_dpo_under_deepspeed_zero2_match_one_process(tiny_model_dir, data, one_process, tmp_path):
    path = config(tmp_path, tiny_model_dir, data, processes=2)
    for stage in ("rm", "dpo"):
        result = launch("zero2", stage, path)
        ran(result)
        assert "fallback" not in result.stdout, result.stdout
    run, reference = run_dir(path), one_process[False]
    assert json.loads((run / "sft" / "manifest.json").read_text())["world_size"] == 2
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


def test_an_fsdp_launch_that_accelerate_runs_as_ddp_says_so_once(tiny_model_dir, data, ppo_runs, tmp_path):
    path = config(tmp_path, tiny_model_dir, data, processes=2)
    ppo_path = moved(ppo_runs["ddp", "full"][0], tmp_path / "ppo")
    note = "the launch asked for FSDP but accelerate runs MULTI_CPU (on CPU processes it drops FSDP): each process holds the whole model"
    for stage, stage_path in (("sft", path), ("rlhf", ppo_path)):
        result = launch("fsdp2", stage, stage_path, shim=False)
        ran(result)
        assert result.stdout.count(f"[{stage}] fallback: {note}") == 1, result.stdout[-3000:]
        assert note in json.loads((run_dir(stage_path) / stage / "manifest.json").read_text())["fallbacks"]


@pytest.fixture(scope="module")
def ppo_runs(policy_dir, planted_rm, prompts, data, tmp_path_factory) -> dict[tuple[str, str], tuple[Path, subprocess.CompletedProcess]]:
    """rlhf from the same policy under DDP and FSDP2, each layout: {(config, layout): (config path, result)}, launched when first asked."""
    runs: dict = {}

    class Runs(dict):
        def __missing__(self, key):
            accelerate_config, layout = key
            section = {"init_from": str(policy_dir), "reward_model": str(planted_rm), "data": {"prompts": str(prompts)}, **PPO, **PPO_LAYOUTS[layout]}
            path = tiny_config(tmp_path_factory.mktemp(f"ppo_{accelerate_config}"), policy_dir, data["sft"], rlhf=section)
            self[key] = (path, launch(accelerate_config, "rlhf", path))
            return self[key]

    return Runs(runs)


@pytest.mark.parametrize(("accelerate_config", "layout"), [("fsdp2", "lora-reward"), ("fsdp2", "full"), ("fsdp2_offload", "lora-reward")])
def test_ppo_under_fsdp2_matches_ddp_in_plain_folders(ppo_runs, policy_dir, planted_rm, accelerate_config, layout):
    (_, ddp), (path, fsdp2) = ppo_runs["ddp", layout], ppo_runs[accelerate_config, layout]
    ran(ddp)
    ran(fsdp2)
    assert fsdp2.stdout.count("[fsdp_on_cpu] FSDP on CPU processes") == 2, "both processes ran FSDP, not DDP"
    unmerged = "sampling with the LoRA policy unmerged: the weights are sharded (same distribution, slower)"
    assert (unmerged in fsdp2.stdout) == (layout != "full") and unmerged not in ddp.stdout
    folder, reference = run_dir(path) / "rlhf", run_dir(ppo_runs["ddp", layout][0]) / "rlhf"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["world_size"] == 2 and manifest["metrics"]["episodes"] == 4 * 4 * 2
    assert_same_weights(folder, reference, policy_dir)
    assert_same_weights(folder / "value", reference / "value", planted_rm)
    AutoModelForCausalLM.from_pretrained(folder)
    AutoModelForSequenceClassification.from_pretrained(folder / "value")
    assert not [p for p in folder.rglob("*") if p.suffix == ".distcp" or p.name.startswith("checkpoint-")]


def test_fsdp2_ppo_killed_after_a_sharded_checkpoint_resumes_to_the_uninterrupted_weights(ppo_runs, tmp_path):
    straight, result = ppo_runs["fsdp2", "lora-reward"]
    ran(result)
    path = moved(straight, tmp_path)
    resumed = kill_after_sharded_checkpoint_2_and_resume("rlhf", path)
    assert "resuming the interrupted run from step 2" in resumed.stdout + resumed.stderr
    for name in ("model.safetensors", "value/model.safetensors"):
        got, want = load_file(run_dir(path) / "rlhf" / name), load_file(run_dir(straight) / "rlhf" / name)
        assert got.keys() == want.keys() and all(torch.allclose(got[k], want[k], rtol=0, atol=1e-6) for k in want), f"{name} differs after resuming"
