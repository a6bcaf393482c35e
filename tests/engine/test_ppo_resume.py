"""PPO across kills and processes: a killed run resumes to the same weights, a
checkpoint of another layout is refused, two processes split the prompts and agree."""

from __future__ import annotations

import dataclasses
import json
import signal
import subprocess
import sys
from pathlib import Path

import psutil
import pytest
import torch
from safetensors.torch import load_file

from engine import checkpointing, update
from engine.ptx import PtxStream
from pipeline import checkpoint as ckpt
from pipeline import cli
from pipeline.errors import ConfigError
from stages import rlhf
from stages.shared.settings import LoraSettings
from tests.conftest import ROOT, history, launch_env, tiny_config, write_jsonl
from tests.conftest import ppo_config as config
from tests.pipeline.test_resume import kill_after_checkpoint, start, wait_for_checkpoint

pytestmark = pytest.mark.launches

LAYOUTS = {
    "full": {"method": "full"},
    # the default config's layout: the value adapter on the reward model's top layers
    "lora-reward": {"method": "lora", "value_model": "reward", "value_layers": 1, "lora": {"r": 4, "alpha": 8}},
    # critic-free, with a reward function whose running mean and std are checkpointed too
    "grpo": {"method": "lora", "lora": {"r": 4, "alpha": 8}, "advantage": "grpo", "samples_per_prompt": 4, "normalize_scores": True,
             "rewards": [{"source": "rm", "normalize": False}, {"source": "tests.engine.planted_rewards:shouting"}]},
}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_killed_ppo_resumes_to_the_same_weights(tiny_model_dir, planted_rm, sft_rows, prompts, tmp_path, layout):
    train = write_jsonl(tmp_path / "sft.jsonl", sft_rows[:24])
    section = {"reward_model": str(planted_rm), "data": {"prompts": str(prompts)}, "steps": 12, "batch_size": 8, "minibatch_size": 4,
               "microbatch_size": 2, "ppo_epochs": 2, "learning_rate": 3e-3, "max_new_tokens": 6, "normalize_scores": False, "save_steps": 3,
               **LAYOUTS[layout]}
    straight = tiny_config(tmp_path, tiny_model_dir, train, name="straight", sft={"max_steps": 2}, rlhf=section)
    assert cli.main(["run", "rlhf", "--config", str(straight)]) == 0
    killed = tiny_config(tmp_path, tiny_model_dir, train, name="killed", sft={"max_steps": 2}, rlhf=section)
    assert cli.main(["run", "sft", "--config", str(killed)]) == 0
    run = tmp_path / "runs" / "killed"
    partial = kill_after_checkpoint(killed, "rlhf", at_least=6)
    saved = torch.load(ckpt.latest_checkpoint(partial) / "pytorch_model.bin", weights_only=True)
    if layout != "full":  # the frozen SFT weights and reward model are inputs, not state
        assert saved and all("lora_" in name or name.startswith("value.head.") for name in saved), sorted(saved)[:5]

    process = start(killed, "rlhf")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    assert "rlhf: resuming the interrupted run from step" in output
    manifest = json.loads((run / "rlhf" / "manifest.json").read_text())
    assert 0 < manifest["metrics"]["steps_last_attempt"] < 12
    assert [r["step"] for r in history(run / "rlhf")] == list(range(1, 13)), "one metrics line per step, none repeated"
    assert (run / "rlhf" / "value").exists() == (layout != "grpo"), "critic-free runs save no value"
    for weights in ("model.safetensors", "value/model.safetensors") if layout != "grpo" else ("model.safetensors",):
        expected = load_file(tmp_path / "runs" / "straight" / "rlhf" / weights)
        actual = load_file(run / "rlhf" / weights)
        assert expected.keys() == actual.keys()
        for name in expected:
            assert torch.allclose(expected[name], actual[name], rtol=0, atol=1e-6), f"{weights}: {name} differs after resuming"
    straight_rows = history(tmp_path / "runs" / "straight" / "rlhf")
    assert [r["objective/scores"] for r in history(run / "rlhf")] == pytest.approx([r["objective/scores"] for r in straight_rows], abs=1e-6)


def test_a_checkpoint_missing_trainable_tensors_is_refused_with_its_path(policy_dir, planted_rm, prompts, tmp_path):
    out = tmp_path / "out"
    top_layer = config(prompts, method="lora", value_model="reward", value_layers=1, lora=LoraSettings(r=2, alpha=4), steps=1, save_steps=1, max_new_tokens=3)
    rlhf.train(top_layer, policy_dir, planted_rm, out, seed=0)
    every_layer = dataclasses.replace(top_layer, value_layers=None, steps=2)  # more trainable tensors than checkpoint-1 holds
    with pytest.raises(ConfigError, match=r"checkpoint-1/pytorch_model\.bin: no .*\.layers\.0\..*trainable tensors missing\); the checkpoint was written by another layout"):
        rlhf.train(every_layer, policy_dir, planted_rm, out, seed=0)


def torchrun(config_path, record: Path) -> subprocess.Popen:
    """Two CPU processes running the rlhf stage through ppo_two_processes.py."""
    launcher = Path(sys.executable).parent / "torchrun"
    return subprocess.Popen(
        [str(launcher), "--standalone", "--nproc_per_node", "2", str(Path(__file__).parent / "ppo_two_processes.py"), "run", "rlhf", "--config", str(config_path)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
        env=launch_env(PPO_RECORD=str(record), PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT)),
    )


def records(record: Path, rank: int) -> tuple[dict[int, list[int]], list[list[float]]]:
    """(step -> prompt indices, weight checksums after each update) as one process logged them."""
    rows = [json.loads(line) for line in Path(f"{record}.{rank}.jsonl").read_text().splitlines()]
    return {r["step"]: r["prompts"] for r in rows if "prompts" in r}, [r["weights"] for r in rows if "weights" in r]


def test_two_processes_split_the_prompts_agree_on_weights_and_resume_from_a_kill(policy_dir, planted_rm, prompts, sft_rows, tmp_path):
    train = write_jsonl(tmp_path / "sft.jsonl", sft_rows[:8])
    section = {"init_from": str(policy_dir), "reward_model": str(planted_rm), "data": {"prompts": str(prompts)}, "steps": 6, "batch_size": 4,
               "minibatch_size": 2, "microbatch_size": 1, "ppo_epochs": 1, "learning_rate": 3e-3, "max_new_tokens": 5, "normalize_scores": False, "save_steps": 2}
    straight = tiny_config(tmp_path, policy_dir, train, name="straight", rlhf=section)
    process = torchrun(straight, tmp_path / "straight")
    output, _ = process.communicate(timeout=400)
    assert process.returncode == 0, output[-3000:]
    (prompts0, weights0), (prompts1, weights1) = records(tmp_path / "straight", 0), records(tmp_path / "straight", 1)
    assert sorted(prompts0) == sorted(prompts1) == list(range(6))
    seen = [i for step in range(6) for i in prompts0[step] + prompts1[step]]
    assert len(seen) == len(set(seen)) == 6 * 8, "the processes never roll out the same prompt (48 of the 63 in one epoch)"
    assert len(weights0) == 6 and weights0 == weights1, "after every step both processes hold the same weights"

    killed = tiny_config(tmp_path, policy_dir, train, name="killed", rlhf=section)
    process = torchrun(killed, tmp_path / "killed")
    partial = ckpt.partial_dir(tmp_path / "runs" / "killed", "rlhf")
    wait_for_checkpoint(process, partial, at_least=2)
    # torchrun starts each worker in a session of its own: kill the whole tree, workers first.
    tree = psutil.Process(process.pid)
    for proc in [*tree.children(recursive=True), tree]:
        proc.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    resumed_from = ckpt.checkpoint_step(ckpt.latest_checkpoint(partial))
    assert resumed_from < 6 and not (tmp_path / "runs" / "killed" / "rlhf").exists()
    process = torchrun(killed, tmp_path / "resumed")
    output, _ = process.communicate(timeout=400)
    assert process.returncode == 0, output[-3000:]
    assert "rlhf: resuming the interrupted run from step" in output
    for rank in (0, 1):
        resumed_prompts, _ = records(tmp_path / "resumed", rank)
        assert resumed_prompts == {s: records(tmp_path / "straight", rank)[0][s] for s in range(resumed_from, 6)}, "it reads on where it stopped"
    for name in ("model.safetensors", "value/model.safetensors"):
        expected, actual = load_file(tmp_path / "runs" / "straight" / "rlhf" / name), load_file(tmp_path / "runs" / "killed" / "rlhf" / name)
        for key in expected:
            assert torch.allclose(expected[key], actual[key], rtol=0, atol=1e-6), f"{name}: {key} differs after resuming on two processes"


def test_two_processes_keep_each_group_whole_and_agree_on_weights(policy_dir, planted_rm, prompts, sft_rows, tmp_path):
    train = write_jsonl(tmp_path / "sft.jsonl", sft_rows[:8])
    section = {"init_from": str(policy_dir), "reward_model": str(planted_rm), "data": {"prompts": str(prompts)}, "steps": 3, "batch_size": 6,
               "minibatch_size": 6, "microbatch_size": 3, "ppo_epochs": 1, "learning_rate": 3e-3, "max_new_tokens": 5, "normalize_scores": False,
               "save_steps": 3, "advantage": "grpo", "samples_per_prompt": 3}
    process = torchrun(tiny_config(tmp_path, policy_dir, train, name="groups", rlhf=section), tmp_path / "groups")
    output, _ = process.communicate(timeout=400)
    assert process.returncode == 0, output[-3000:]
    rows = {rank: [json.loads(line) for line in Path(f"{tmp_path / 'groups'}.{rank}.jsonl").read_text().splitlines()] for rank in (0, 1)}
    updates = {rank: [r for r in rows[rank] if "weights" in r] for rank in (0, 1)}
    assert len(updates[0]) == 3 and [u["weights"] for u in updates[0]] == [u["weights"] for u in updates[1]], "both hold the same weights"
    for step in range(3):
        groups = {rank: [updates[rank][step]["queries"][g * 3 : g * 3 + 3] for g in range(2)] for rank in (0, 1)}
        for rank in (0, 1):
            assert all(len(set(group)) == 1 for group in groups[rank]), "the three answers to a prompt sit on one process, together"
            advantages = updates[rank][step]["advantages"]
            assert all(abs(sum(advantages[g * 3 : g * 3 + 3])) < 1e-4 for g in range(2)), "each group is its own baseline (GRPO's sum to 0)"
        assert not {g[0] for g in groups[0]} & {g[0] for g in groups[1]}, "no prompt is rolled out on both processes"


def test_ppo_ptx_resumes_where_its_batches_stopped(policy_dir, planted_rm, prompts, sft_rows, tmp_path, monkeypatch):
    ptx = write_jsonl(tmp_path / "ptx.jsonl", sft_rows[:20])
    cfg = config(prompts, steps=4, save_steps=2, ptx_coef=0.5, data=rlhf.RlhfData(prompts=str(prompts), eval_fraction=0.125, ptx=str(ptx)))
    rlhf.train(cfg, policy_dir, planted_rm, tmp_path / "straight", seed=0)
    save = checkpointing.save_checkpoint

    def save_then_die(accelerator, out_dir, step):
        save(accelerator, out_dir, step)
        if step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(checkpointing, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        rlhf.train(cfg, policy_dir, planted_rm, tmp_path / "killed", seed=0)
    monkeypatch.setattr(checkpointing, "save_checkpoint", save)
    rlhf.train(cfg, policy_dir, planted_rm, tmp_path / "killed", seed=0)
    straight, resumed = history(tmp_path / "straight"), history(tmp_path / "killed")
    assert len({round(r["loss/ptx"], 6) for r in straight}) == 4, "each step trains on other ptx rows"
    assert [r["loss/ptx"] for r in resumed] == pytest.approx([r["loss/ptx"] for r in straight], abs=1e-6), "the resumed run draws the batches the killed one would have"
    expected, actual = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert all(torch.allclose(expected[k], actual[k], rtol=0, atol=1e-6) for k in expected)


def test_ptx_batches_differ_between_processes_and_cover_the_rows_each_epoch():
    examples = [([i, 100 + i], [-100, 100 + i]) for i in range(10)]
    streams = [PtxStream(examples, 2, 0, "cpu", seed=0, rank=rank, world=2) for rank in (0, 1)]
    rounds = [[next(s)[0][:, 0].tolist() for s in streams] for _ in range(5)]  # 10 microbatches of 2: two passes over the rows
    for rank0, rank1 in rounds:
        assert not set(rank0) & set(rank1), "two processes never train on the same rows at once"
    flat = [rows for pair in rounds for rows in pair]  # global order: round by round, rank 0 then rank 1
    for epoch in (flat[:5], flat[5:]):
        assert sorted(i for rows in epoch for i in rows) == list(range(10)), "each pass covers every row once"
    again = PtxStream(examples, 2, 0, "cpu", seed=0, rank=1, world=2)
    again.load_state_dict({"drawn": 3})
    assert next(again)[0][:, 0].tolist() == rounds[3][1], "a resumed stream goes on where it stopped"


def test_a_diverging_run_exits_3_and_keeps_its_last_good_checkpoint(tiny_model_dir, planted_rm, prompts, sft_rows, tmp_path, monkeypatch, capsys):
    train = write_jsonl(tmp_path / "sft.jsonl", sft_rows[:24])
    section = {"reward_model": str(planted_rm), "data": {"prompts": str(prompts)}, "steps": 6, "batch_size": 8, "minibatch_size": 8, "microbatch_size": 8,
               "ppo_epochs": 1, "max_new_tokens": 4, "normalize_scores": False, "save_steps": 2}
    path = tiny_config(tmp_path, tiny_model_dir, train, sft={"max_steps": 2}, rlhf=section)
    original, calls = update.policy_loss, []

    def blows_up_at_step_4(*args, **kwargs):
        loss, stats = original(*args, **kwargs)
        calls.append(1)
        return (loss * float("nan") if len(calls) >= 4 else loss), stats

    monkeypatch.setattr(update, "policy_loss", blows_up_at_step_4)
    assert cli.main(["run", "rlhf", "--config", str(path)]) == 3
    captured = capsys.readouterr()
    assert any(line.startswith("diverged: rlhf: the loss became nan") for line in captured.err.splitlines()), "on a line of its own, not after the progress bar"
    run = tmp_path / "runs" / "tiny"
    assert not (run / "rlhf").exists() and (run / "sft").exists(), "nothing half-made is promoted"
    assert ckpt.checkpoint_step(ckpt.latest_checkpoint(ckpt.partial_dir(run, "rlhf"))) == 2, "the last good checkpoint is kept"
    assert "rlhf: diverged; its last good checkpoint (step 2) is kept" in captured.out
