"""Inputs a stage could only refuse once it started are refused before the first stage
trains: too few rows to hold some out, too few prompts for one step, a reward-model
folder that is not one, or that lacks the statistics normalising needs."""

from __future__ import annotations

import pytest

from pipeline import cli
from tests.conftest import planted_rankings, tiny_config, write_jsonl


def a_one_label_classifier(model_dir, folder):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    AutoModelForSequenceClassification.from_pretrained(model_dir, num_labels=1).save_pretrained(folder)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("case", ["sft rows", "rm prompts", "dpo prompts", "rlhf prompts", "causal LM as RM", "RM without stats"])
def test_refused_before_any_stage_trains(case, tmp_path, tiny_model_dir, sft_rows, capsys):
    sft_train = write_jsonl(tmp_path / "sft.jsonl", sft_rows[:24])
    one_prompt = write_jsonl(tmp_path / "one.jsonl", [{**row, "prompt": "Q"} for row in planted_rankings(sft_rows, 6)])
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": row["prompt"]} for row in sft_rows[:40]])
    few = write_jsonl(tmp_path / "few.jsonl", [{"prompt": row["prompt"]} for row in sft_rows[:3]])
    rlhf = {"data": {"prompts": str(prompts)}, "batch_size": 8, "minibatch_size": 8, "microbatch_size": 8}
    target, sections, expected = {
        "sft rows": ("sft", {"sft": {"data": {"train": str(write_jsonl(tmp_path / "1.jsonl", sft_rows[:1]))}}}, "sft.data.train: 1 row(s) are too few to carve off a held-out split"),
        "rm prompts": ("rm", {"rm": {"data": {"train": str(one_prompt)}}}, "rm.data.train: 1 distinct prompt(s) are too few to hold some out"),
        "dpo prompts": ("dpo", {"dpo": {"data": {"train": str(one_prompt)}}}, "dpo.data.train: 1 distinct prompt(s) are too few to hold some out"),
        "rlhf prompts": ("rlhf", {"rlhf": {**rlhf, "data": {"prompts": str(few)}}}, "rlhf.data.prompts: 2 training prompt(s), fewer than one step's 8"),
        "causal LM as RM": ("rlhf", {"rlhf": {**rlhf, "reward_model": str(tiny_model_dir)}},
                            f"rlhf.reward_model: {tiny_model_dir} is a LlamaForCausalLM, not a sequence-classification (reward) model"),
        "RM without stats": ("rlhf", {"rlhf": {**rlhf, "reward_model": str(a_one_label_classifier(tiny_model_dir, tmp_path / "rm"))}},
                             f"rlhf.rewards[0]: {tmp_path / 'rm'} has no reward_mean/reward_std in its manifest"),
    }[case]
    config = tiny_config(tmp_path, tiny_model_dir, sft_train, **{k: v for k, v in sections.items() if k != "sft"}, sft=sections.get("sft"))
    assert cli.main(["run", target, "--config", str(config)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]  # (not the fixtures' progress bars)
    assert len(errors) == 1 and errors[0].startswith(f"error: {expected}"), errors
    assert not any((tmp_path / "runs" / "tiny").iterdir()), "no stage was built or begun"


def test_outside_the_checkout_a_default_data_file_is_one_line_and_status_still_works(tmp_path, tiny_model_dir, sft_rows, monkeypatch, capsys):
    """The default rm data (configs/data/...) is read from the folder you run in: elsewhere,
    `run rm` names the key, and `status` shows every stage, leaving out the optional dpo."""
    config = tiny_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "sft.jsonl", sft_rows[:24]))
    monkeypatch.chdir(tmp_path)
    assert cli.main(["status", "--config", str(config)]) == 0
    out = capsys.readouterr().out
    assert "sft    missing" in out and "rm     cannot tell" in out and "why: rm.data.train: no such file or folder: configs/data/" in out
    assert "dpo" not in out
    assert cli.main(["run", "rm", "--config", str(config)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: rm.data.train: no such file or folder: configs/data/demo_rm.jsonl (relative paths are read from the folder you run in, {tmp_path})"]
    assert not any((tmp_path / "runs" / "tiny").iterdir())
