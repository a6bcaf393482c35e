"""Launching a stage the way the README says, `accelerate launch --config_file
configs/accelerate/<name>.yaml`, on two CPU processes (gloo), and comparing what it wrote,
for tests/stages/test_fsdp.py, test_deepspeed.py and test_sharded_rlhf.py. Not a test itself.

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

import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from pipeline import cli
from tests.conftest import ROOT, launch_env, planted_rankings, tiny_config, write_jsonl

MAX_DIFF = 2e-4
NORM_RATIO = 1e-3

LORA = {"method": "lora", "lora": {"r": 4, "alpha": 8, "dropout": 0.0}}
# 51 sft rows and 30 rm/dpo training prompts: every step below is a full global batch of 8
# (a short last batch is padded differently by one and two processes).
SFT = {"max_steps": 4, "save_steps": 2, "learning_rate": 1e-3}
TRAINER = {"max_steps": 3, "learning_rate": 3e-3, "warmup_ratio": 0.0, "max_length": 96, "save_steps": 2, "logging_steps": 1}


def trainer_data(folder: Path, sft_rows: list[dict]) -> dict[str, Path]:
    """The sft rows and planted rankings the Trainer-stage launches train on."""
    return {"sft": write_jsonl(folder / "sft.jsonl", sft_rows[:64]), "pref": write_jsonl(folder / "pref.jsonl", planted_rankings(sft_rows, 40))}


def config(folder: Path, model_dir: Path, data: dict[str, Path], processes: int, lora: bool = False) -> Path:
    """sft, rm and dpo on the tiny model with a global batch of 8: 8 rows per process
    on one, 4 on each of two."""
    per_process = {"batch_size": 8 // processes, **(LORA if lora else {})}
    preferences = {"data": {"train": str(data["pref"]), "eval_fraction": 0.25}, **TRAINER, **per_process}
    return tiny_config(folder, model_dir, data["sft"], sft={**SFT, **per_process}, rm=preferences, dpo=preferences)


def one_process(folder: Path, model_dir: Path, data: dict[str, Path], lora: bool = False) -> Path:
    """The reference: sft, rm and dpo run in this process, at the same global batch; its run folder."""
    path = config(folder, model_dir, data, processes=1, lora=lora)
    assert cli.main(["run", "rm", "--config", str(path)]) == 0
    assert cli.main(["run", "dpo", "--config", str(path)]) == 0
    return run_dir(path)


def launch(accelerate_config: str, stages: str, config_path: Path, shim: bool = True, **env: str) -> subprocess.CompletedProcess:
    """`accelerate launch ... -m pipeline run <stages>` (one or several, space-separated) on two processes."""
    accelerate = Path(sys.executable).parent / "accelerate"
    command = [str(accelerate), "launch", "--config_file", f"configs/accelerate/{accelerate_config}.yaml", "--num_processes", "2", "--main_process_port", "0"]
    module = "pipeline"
    if shim:
        module = {"fsdp": "tests.stages.fsdp_on_cpu", "zero": "tests.stages.deepspeed_on_cpu"}.get(accelerate_config[:4], module)
    if accelerate_config.startswith("zero"):
        env = {"DS_ACCELERATOR": "cpu", **env}  # DeepSpeed's CPU accelerator, with gloo; on GPUs it finds CUDA itself
    return subprocess.run([*command, "-m", module, "run", *stages.split(), "--config", str(config_path)], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=launch_env(**env))


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


def killed_after_sharded_checkpoint_2(accelerate_config: str, stages: str, path: Path, stage: str) -> subprocess.CompletedProcess:
    """`stages` launched under FSDP2 (or DeepSpeed) and ended as if killed once `stage`'s
    checkpoint-2 is complete, each process having written its shard: that launch's result."""
    killed = launch(accelerate_config, stages, path, EXIT_AFTER_CHECKPOINT="2")
    assert killed.returncode != 0, f"{stages}: not killed in {stage}"
    checkpoint = run_dir(path) / f".{stage}.partial" / "checkpoint-2"
    if accelerate_config.startswith("zero"):
        shards = sorted(p.name for p in checkpoint.rglob("*zero_pp_rank_*_optim_states.pt"))
        assert [name.split("zero_pp_rank_")[1][0] for name in shards] == ["0", "1"], shards
    else:
        shards = sorted(p.name for p in (checkpoint / "pytorch_model_fsdp_0").glob("*.distcp"))
        assert shards == ["__0_0.distcp", "__1_0.distcp"], f"{stage}: each process wrote its own shard"
    return killed


def kill_after_sharded_checkpoint_2_and_resume(stage: str, path: Path, accelerate_config: str = "fsdp2") -> subprocess.CompletedProcess:
    """`stage` killed after its sharded checkpoint-2, then run again: the second run's result."""
    killed_after_sharded_checkpoint_2(accelerate_config, stage, path, stage)
    ran(resumed := launch(accelerate_config, stage, path))
    return resumed


def plain_folders(run: Path) -> None:
    """Finished folders load with from_pretrained and hold no sharded checkpoint."""
    for stage in ("sft", "dpo"):
        if (run / stage).exists():
            AutoModelForCausalLM.from_pretrained(run / stage)
    if (run / "rm").exists():
        AutoModelForSequenceClassification.from_pretrained(run / "rm")
    assert not [p for p in run.rglob("*") if p.suffix == ".distcp" or p.name.startswith("checkpoint-")]
