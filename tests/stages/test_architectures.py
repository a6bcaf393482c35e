"""Every stage on a second architecture: GPT-2 (learned absolute positions, Conv1D
layers, no `layers` list) takes the fallbacks the Llama family never needs, and each
fallback is said once in the log and kept in the stage's manifest."""

from __future__ import annotations

import json

from demo import prompts as demo_prompts
from pipeline import checkpoint as ckpt
from pipeline import cli
from tests.conftest import ROOT, TINY_RM, tiny_config, write_jsonl

JUDGE = "demo.judge:gold_score"


def test_every_stage_runs_on_gpt2_and_says_which_fallbacks_it_took(tiny_gpt2_dir, sft_rows, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    # 40 held-out prompts: the eval stage packs them into more than one row of 1024 tokens, so a
    # short last row is filled, and the filler's positions must stay within GPT-2's 256.
    sets = demo_prompts.split_prompts(0, {"rank": 0, "rl": 24, "eval": 40})
    rl = write_jsonl(tmp_path / "rl.jsonl", sets["rl"])
    held = write_jsonl(tmp_path / "eval.jsonl", sets["eval"])
    rankings = write_jsonl(tmp_path / "rm.jsonl", [json.loads(line) for line in (ROOT / "configs" / "data" / "demo_rm.jsonl").read_text().splitlines()][:24])
    train = write_jsonl(tmp_path / "sft.jsonl", sft_rows[:24])
    path = tiny_config(
        tmp_path, tiny_gpt2_dir, train, sft={"max_steps": 2},
        rm={**TINY_RM, "data": {"train": str(rankings)}, "max_steps": 2, "batch_size": 4},
        rlhf={"data": {"prompts": str(rl), "eval_prompts": str(held)}, "method": "lora", "value_model": "reward", "value_layers": 1, "steps": 2,
              "batch_size": 4, "minibatch_size": 4, "microbatch_size": 4, "ppo_epochs": 1, "max_new_tokens": 6, "save_steps": 1,
              "rewards": [{"source": "rm"}, {"source": "demo.rewards:gold", "role": "audit", "name": "gold"}]},
        eval={"prompts": str(held), "judge": JUDGE, "max_new_tokens": 6, "num_samples": 2},
    )
    assert cli.main(["run", "--config", str(path)]) == 0
    log = capsys.readouterr().out
    run = tmp_path / "runs" / "tiny"
    for stage in ("base", "sft", "rm", "rlhf", "eval"):
        assert ckpt.is_complete(run / stage), stage
    for stage in ("base", "sft", "rlhf"):
        assert type(AutoModelForCausalLM.from_pretrained(run / stage)).__name__ == "GPT2LMHeadModel"
    for folder in ("rm", "rlhf/value"):
        AutoModelForSequenceClassification.from_pretrained(run / folder)
    metrics = json.loads((run / "eval" / "report.json").read_text())["metrics"]
    assert all(m["rm_score"] is not None and m["gold_score"] is not None for m in metrics["policies"].values())

    taken = json.loads((run / "rlhf" / "manifest.json").read_text())["fallbacks"]
    expected = ("the value runs every layer", "sampling with the LoRA policy unmerged")
    for start in expected:
        matching = [f for f in taken if f.startswith(start)]
        assert len(matching) == 1, (start, taken)
        assert log.count(f"fallback: {matching[0]}") == 1, f"said once in the log: {matching[0]}"
