"""The SFT stage on a tiny model: response-only loss, learning, full and LoRA outputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipeline import cli
from stages import base, sft
from stages.shared import data
from tests.conftest import tiny_config, write_jsonl


@pytest.fixture(scope="session")
def prepared_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny model after the base stage (own pad token)."""
    out = tmp_path_factory.mktemp("prepared")
    base.run(base.BaseConfig(model=str(tiny_model_dir)), {}, out, seed=0)
    return out


def examples(rows):
    return [data.sft_example(f"row {i}", row) for i, row in enumerate(rows)]


def test_evaluating_before_training_in_bf16_leaves_the_forward_as_training_finds_it(prepared_dir, tmp_path):
    # Evaluation wraps forward in autocast; a fresh FSDP2 run that kept the wrapper trained
    # otherwise than the same run resumed (which skips this evaluation).
    from stages.shared import training

    rows = examples([{"prompt": "What is 2 + 3?", "response": "Sure! 2 + 3 = 5."}] * 2)
    trainer = sft.build_trainer(sft.SftConfig(max_steps=1, precision="bf16"), prepared_dir, rows, rows, tmp_path, seed=0)
    forward = trainer.model.forward
    training.evaluate_before_training(trainer)
    assert "_original_forward" not in vars(trainer.model) and trainer.model.forward == forward


def test_loss_covers_the_response_and_its_end_of_turn_only(prepared_dir, tmp_path):
    rows = examples([
        {"prompt": "What is 2 + 3?", "response": "Sure! 2 + 3 = 5."},
        {"prompt": "Spell \"cat\" backwards, please.", "response": "\"cat\" backwards is \"tac\"."},
    ])
    trainer = sft.build_trainer(sft.SftConfig(max_steps=1), prepared_dir, rows, rows, tmp_path, seed=0)
    tokenizer = trainer.processing_class
    for row, example in zip(rows, trainer.train_dataset, strict=True):
        prompt_text = tokenizer.apply_chat_template(row["prompt"], tokenize=False, add_generation_prompt=True)
        prompt_len = len(tokenizer(prompt_text, add_special_tokens=False)["input_ids"])
        labels, ids = example["labels"], example["input_ids"]
        assert 0 < prompt_len < len(ids)
        assert labels[:prompt_len] == [-100] * prompt_len, "no loss on the prompt"
        assert labels[prompt_len:] == ids[prompt_len:], "loss on every response token"
        learned = tokenizer.decode(ids[prompt_len:])
        assert learned == row["completion"][0]["content"] + "<|im_end|>\n", "the model learns to end its turn"

    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    padding = batch["attention_mask"] == 0
    assert padding.any(), "rows of different length get padded"
    assert (batch["input_ids"][padding] == tokenizer.pad_token_id).all()
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    assert (batch["labels"][padding] == -100).all(), "no loss on padding"
    assert (batch["labels"] == tokenizer.eos_token_id).sum() == 2, "each row's EOS is a target"


def test_sft_lowers_held_out_loss_and_changes_every_weight(tiny_model_dir, sft_rows, tmp_path):
    train = write_jsonl(tmp_path / "train.jsonl", sft_rows[:96])
    config = tiny_config(tmp_path, tiny_model_dir, train, sft={"max_steps": 40, "learning_rate": 3e-3, "save_steps": 20})
    assert cli.main(["run", "sft", "--config", str(config)]) == 0
    run = tmp_path / "runs" / "tiny"
    manifest = json.loads((run / "sft" / "manifest.json").read_text())
    metrics = manifest["metrics"]
    assert metrics["steps"] == 40 and metrics["method"] == "full"
    assert metrics["eval_loss_after"] < metrics["eval_loss_before"] - 0.5, metrics
    assert metrics["train_rows"] + metrics["eval_rows"] == 96

    before = AutoModelForCausalLM.from_pretrained(run / "base").state_dict()
    after = AutoModelForCausalLM.from_pretrained(run / "sft").state_dict()
    unchanged = [name for name in before if torch.equal(before[name], after[name])]
    assert unchanged == [], f"full fine-tuning left {unchanged} untouched"

    samples = [json.loads(line) for line in (run / "sft" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and set(samples[0]) == {"prompt", "reference", "before", "after"}
    assert (run / "sft" / "samples.md").read_text().startswith("# Sample generations")
    log = [json.loads(line) for line in (run / "sft" / "trainer_log.jsonl").read_text().splitlines()]
    assert any("loss" in entry for entry in log)
    assert not list((run / "sft").glob("checkpoint-*")), "in-stage checkpoints are dropped once complete"
    assert AutoTokenizer.from_pretrained(run / "sft").pad_token == "<|endoftext|>"


def test_lora_writes_a_merged_model_and_keeps_the_adapter(tiny_model_dir, sft_rows, tmp_path):
    from peft import PeftModel

    train = write_jsonl(tmp_path / "train.jsonl", sft_rows[:48])
    config = tiny_config(tmp_path, tiny_model_dir, train, sft={"method": "lora", "max_steps": 8, "learning_rate": 1e-2, "lora": {"r": 4, "alpha": 8, "dropout": 0.0}})
    assert cli.main(["run", "sft", "--config", str(config)]) == 0
    run = tmp_path / "runs" / "tiny"
    folder = run / "sft"
    assert (folder / "adapter" / "adapter_config.json").is_file()
    assert not (folder / "adapter_config.json").exists(), "the stage output is a plain model folder"

    merged = AutoModelForCausalLM.from_pretrained(folder)
    rebuilt = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(run / "base"), folder / "adapter").merge_and_unload()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        assert torch.allclose(merged(ids).logits, rebuilt(ids).logits, atol=1e-5)
        original = AutoModelForCausalLM.from_pretrained(run / "base")(ids).logits
        assert not torch.allclose(merged(ids).logits, original, atol=1e-4), "the adapter changed the model"
    metrics = json.loads((folder / "manifest.json").read_text())["metrics"]
    total = sum(p.numel() for p in merged.parameters())
    assert 0 < metrics["trainable_parameters"] < total / 2


def test_rows_whose_prompt_fills_max_length_are_dropped_and_counted(prepared_dir, tmp_path):
    rows = examples([
        {"prompt": "word " * 200, "response": "too long to learn from"},
        {"prompt": "Hi?", "response": "Hello!"},
    ])
    trainer = sft.build_trainer(sft.SftConfig(max_steps=1, max_length=32), prepared_dir, rows, rows, tmp_path, seed=0)
    assert len(trainer.train_dataset) == 1
    assert all(len(example["input_ids"]) <= 32 for example in trainer.train_dataset)


def test_a_model_that_pads_with_eos_is_refused(tiny_model_dir, tmp_path):
    from pipeline.config import ConfigError

    rows = examples([{"prompt": "a", "response": "b"}])
    with pytest.raises(ConfigError, match="pads with EOS"):
        sft.build_trainer(sft.SftConfig(max_steps=1), tiny_model_dir, rows, rows, tmp_path, seed=0)


def test_lora_targets_the_model_lacks_are_one_line_before_training(tiny_model_dir, sft_rows, tmp_path, capsys):
    config = tiny_config(tmp_path, tiny_model_dir, write_jsonl(tmp_path / "sft.jsonl", sft_rows[:24]),
                         sft={"method": "lora", "lora": {"target_modules": "q_proj, nonexistent_proj"}})
    assert cli.main(["run", "sft", "--config", str(config)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: sft.lora.target_modules: nonexistent_proj not in the model (its linear layers: "), errors
    assert "q_proj" in errors[0] and not (tmp_path / "runs" / "tiny" / ".sft.partial").exists()
