"""The reward-model stage on a tiny model: a planted preference is learned, the
output is a plain one-label sequence-classification folder, scores sit at EOS,
bad rows stop the run before anything trains, LoRA and resume after a kill."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from engine.forward import packed_scores
from engine.packing import Layout
from pipeline import cli
from stages import rm
from stages.shared import preferences
from tests.conftest import TINY_RM, planted_rankings, tiny_config, write_jsonl
from tests.pipeline.test_resume import kill_after_checkpoint, start, weights


def rm_config(tmp_path, tiny_model_dir, sft_rows, rows, name="tiny", **settings):
    train = write_jsonl(tmp_path / "sft.jsonl", sft_rows[:32])
    rankings = write_jsonl(tmp_path / f"{name}-rm.jsonl", rows)
    section = {"data": {"train": str(rankings), "eval_fraction": 0.25}, **TINY_RM, **settings}
    return tiny_config(tmp_path, tiny_model_dir, train, name=name, sft={"max_steps": 2}, rm=section)


def test_a_planted_preference_is_learned_to_near_perfect_held_out_accuracy(tiny_model_dir, sft_rows, tmp_path):
    config = rm_config(tmp_path, tiny_model_dir, sft_rows, planted_rankings(sft_rows, 160))
    assert cli.main(["run", "rm", "--config", str(config)]) == 0
    folder = tmp_path / "runs" / "tiny" / "rm"
    metrics = json.loads((folder / "manifest.json").read_text())["metrics"]
    before, after = metrics["eval_before"], metrics["eval_after"]
    assert after["accuracy"] >= 0.95, (before, after)
    assert after["margin"] > 1.0 > 50 * abs(before["margin"]), "a fresh head barely separates; the trained one does"
    assert set(after["accuracy_by_k"]) == {"2", "3", "4"}
    assert metrics["train_prompts"] + metrics["eval_prompts"] == 160
    assert metrics["reward_mean"] == after["reward_mean"] and metrics["reward_std"] == after["reward_std"] > 0
    assert json.loads((folder / "eval.json").read_text())["after"] == after
    assert not list(folder.glob("checkpoint-*"))

    # A plain folder: one label, its tokenizer, and rewards that follow the marker.
    model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    ranking = preferences.parse("x", {"prompt": "What is 4 + 4?", "completions": ["Sure! 4 + 4 = 8. Cheers!", "Sure! 4 + 4 = 8."]})
    with torch.no_grad():
        rewards = padded_rewards(model, tokenizer, rm.encode(tokenizer, ranking, 96, 0.0)["input_ids"])
    assert rewards[0] > rewards[1]
    assert metrics["layout"] == {"row_tokens": 1024, "share_prefix": True}
    assert json.loads((folder / "manifest.json").read_text())["fallbacks"] == [], "the tiny Llama packs with a shared prompt"


def padded_rewards(model, tokenizer, sequences):
    """The plain way to score: right-padded sequences, the model's pooled output at the last non-pad token."""
    from engine.packing import pad_sequences

    ids, mask = pad_sequences(sequences, tokenizer.pad_token_id, "right")
    return model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)


def test_completions_end_with_eos_and_the_reward_is_read_there(tiny_model_dir, tmp_path):
    from stages import base

    prepared = tmp_path / "prepared"
    base.run(base.BaseConfig(model=str(tiny_model_dir)), {}, prepared, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(prepared)
    ranking = preferences.parse("x", {"prompt": "Hi", "completions": ["Hello there, how are you today?", "Go."]})
    example = rm.encode(tokenizer, ranking, 64, 0.0)
    prompt = tokenizer(tokenizer.apply_chat_template(ranking.prompt, tokenize=False, add_generation_prompt=True), add_special_tokens=False)["input_ids"]
    for ids, text in zip(example["input_ids"], ranking.completions, strict=True):
        assert ids[: len(prompt)] == prompt and ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(ids[len(prompt) : -1]) == text
    assert example["prompt_length"] == len(prompt)

    model = rm.load_reward_model(prepared, tokenizer, seed=0).eval()
    with torch.no_grad():
        pooled = padded_rewards(model, tokenizer, example["input_ids"])
        per_token = [model.score(model.model(input_ids=torch.tensor([ids])).last_hidden_state)[0, :, 0] for ids in example["input_ids"]]
        packed = packed_scores(model, rm.RankingCollator(tokenizer, Layout())([example]))
    ends = torch.stack([scores[-1] for scores in per_token])
    assert torch.allclose(pooled, ends, atol=1e-6), "the reward is the score at EOS"
    assert torch.allclose(packed, ends, atol=1e-5), "packed, the reward is read at each completion's own EOS"

    cut = rm.encode(tokenizer, ranking, len(prompt) + 4, 0.0)
    assert len(cut["input_ids"][0]) == len(prompt) + 4 and cut["input_ids"][0][-1] != tokenizer.eos_token_id, "a cut completion did not end"
    assert cut["cut"] == 1
    with pytest.raises(preferences.BadRow, match="^x: the prompt is .* no room for a completion in max_length=8"):
        rm.encode(tokenizer, ranking, 8, 0.0)
    kept = rm.encode(tokenizer, ranking, 8, 0.0, max_prompt_length=5)  # a long prompt keeps its end instead
    assert kept["cut_prompt"] == 1 and all(ids[:5] == prompt[-5:] for ids in kept["input_ids"])
    assert rm.encode(tokenizer, ranking, 64, 0.0, max_prompt_length=len(prompt))["input_ids"] == example["input_ids"], "a prompt that fits is not cut"


def test_a_bad_row_stops_the_run_before_any_stage_trains(tiny_model_dir, sft_rows, tmp_path, capsys):
    rows = planted_rankings(sft_rows, 20)
    rows[6] = {"prompt": "Q", "completions": ["same", "same"]}
    config = rm_config(tmp_path, tiny_model_dir, sft_rows, rows)
    assert cli.main(["run", "rm", "--config", str(config)]) == 2
    err = capsys.readouterr().err
    assert "tiny-rm.jsonl:7: the same completion appears twice" in err
    assert not (tmp_path / "runs" / "tiny").exists() or not any((tmp_path / "runs" / "tiny").iterdir()), "nothing was built"


def test_dropping_bad_rows_counts_them(tiny_model_dir, sft_rows, tmp_path):
    rows = planted_rankings(sft_rows, 40)
    rows[3] = {"prompt": "Q", "completions": ["only one"]}
    rows[4] = {"prompt": "word " * 200, "chosen": "a", "rejected": "b"}
    config = rm_config(tmp_path, tiny_model_dir, sft_rows, rows, max_steps=2, data={"train": str(tmp_path / "tiny-rm.jsonl"), "drop_bad_rows": True, "eval_fraction": 0.25})
    write_jsonl(tmp_path / "tiny-rm.jsonl", rows)
    assert cli.main(["run", "rm", "--config", str(config)]) == 0
    metrics = json.loads((tmp_path / "runs" / "tiny" / "rm" / "manifest.json").read_text())["metrics"]
    assert metrics["dropped_bad_rows"] == {"too_few_completions": 1, "prompt_too_long": 1}
    assert metrics["train_prompts"] + metrics["eval_prompts"] == 38


def test_lora_reward_model_is_a_merged_folder_with_its_adapter(tiny_model_dir, sft_rows, tmp_path):
    config = rm_config(tmp_path, tiny_model_dir, sft_rows, planted_rankings(sft_rows, 64), method="lora", max_steps=6, lora={"r": 4, "alpha": 8, "dropout": 0.0})
    assert cli.main(["run", "rm", "--config", str(config)]) == 0
    folder = tmp_path / "runs" / "tiny" / "rm"
    assert (folder / "adapter" / "adapter_config.json").is_file() and not (folder / "adapter_config.json").exists()
    merged = AutoModelForSequenceClassification.from_pretrained(folder)
    sft_model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "runs" / "tiny" / "sft", num_labels=1)
    changed = [n for n, p in merged.state_dict().items() if n in sft_model.state_dict() and not torch.equal(p, sft_model.state_dict()[n])]
    assert any(n.startswith("score") for n in changed) and any("layers" in n for n in changed)
    metrics = json.loads((folder / "manifest.json").read_text())["metrics"]
    assert 0 < metrics["trainable_parameters"] < sum(p.numel() for p in merged.parameters()) / 2


def test_killed_reward_model_training_resumes_to_the_same_weights(tiny_model_dir, sft_rows, tmp_path):
    rows = planted_rankings(sft_rows, 120)
    settings = {"max_steps": 150, "save_steps": 10, "batch_size": 4, "learning_rate": 1e-3, "eval_steps": 20}
    straight = rm_config(tmp_path, tiny_model_dir, sft_rows, rows, name="straight", **settings)
    assert cli.main(["run", "rm", "--config", str(straight)]) == 0

    config = rm_config(tmp_path, tiny_model_dir, sft_rows, rows, name="killed", **settings)
    assert cli.main(["run", "sft", "--config", str(config)]) == 0  # so the kill lands in rm
    run = tmp_path / "runs" / "killed"
    kill_after_checkpoint(config, "rm", at_least=30)

    process = start(config, "rm")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert "rm: resuming the interrupted run from step" in output
    manifest = json.loads((run / "rm" / "manifest.json").read_text())
    assert 0 < manifest["metrics"]["steps_last_attempt"] < 150
    expected, actual = weights(tmp_path / "runs" / "straight" / "rm"), weights(run / "rm")
    for name in expected:
        assert torch.allclose(expected[name], actual[name], rtol=0, atol=1e-6), f"{name} differs after resuming"
    # The learning curve: held-out accuracy every 20 steps, the points before the kill kept through the resume.
    straight_curve = json.loads((tmp_path / "runs" / "straight" / "rm" / "manifest.json").read_text())["metrics"]["curve"]
    assert [p["step"] for p in straight_curve] == [0, 20, 40, 60, 80, 100, 120, 140, 150]
    assert [p["rankings_seen"] for p in straight_curve] == [4 * p["step"] for p in straight_curve]
    straight_metrics = json.loads((tmp_path / "runs" / "straight" / "rm" / "manifest.json").read_text())["metrics"]
    assert straight_curve[0]["heldout_accuracy"] == straight_metrics["eval_before"]["accuracy"]
    assert straight_curve[-1]["heldout_accuracy"] == straight_metrics["eval_after"]["accuracy"]
    resumed_curve = manifest["metrics"]["curve"]
    assert [p["step"] for p in resumed_curve] == [p["step"] for p in straight_curve]
    for a, b in zip(resumed_curve, straight_curve, strict=True):
        assert a["heldout_accuracy"] == pytest.approx(b["heldout_accuracy"], abs=0.02), (resumed_curve, straight_curve)


PACKING_RANKINGS = [
    {"prompt": "What is 4 + 4?", "completions": ["Sure! 4 + 4 = 8. Cheers!", "8", "It is 9, I think."]},
    {"prompt": "What is 4 + 4?", "completions": ["Eight.", "Sure! Eight."]},  # the same prompt again, in the next ranking
    {"prompt": "Name a colour that is not red, and say why you like it in a few words.", "completions": ["Blue, calm.", "Green!", "Red.", "None."]},
]


@pytest.mark.parametrize(
    ("arch", "attention", "layout"),
    [
        ("llama", "sdpa", Layout()),
        ("llama", "eager", Layout()),
        ("llama", "sdpa", Layout(share_prefix=False)),
        ("llama", "sdpa", Layout(row_tokens=0, share_prefix=False)),
        ("llama", "sdpa", Layout(row_tokens=40)),  # rows too short for a whole batch: a ranking's prompt is laid out again
        ("gpt2", "sdpa", Layout()),
    ],
    ids=["shared", "eager", "no-prefix", "row-each", "short-rows", "gpt2"],
)
def test_packed_rankings_give_the_padded_rewards_loss_and_gradients(tiny_model_dir, tiny_gpt2_dir, tmp_path, arch, attention, layout):
    from stages import base
    from stages import rm_ranking as ranking

    prepared = tmp_path / "prepared"
    base.run(base.BaseConfig(model=str(tiny_model_dir if arch == "llama" else tiny_gpt2_dir)), {}, prepared, seed=0)
    tokenizer = AutoTokenizer.from_pretrained(prepared)
    examples = [rm.encode(tokenizer, preferences.parse(f"row {i}", row), 96, 0.0) for i, row in enumerate(PACKING_RANKINGS)]
    model = AutoModelForSequenceClassification.from_pretrained(prepared, num_labels=1, attn_implementation=attention)
    model.config.pad_token_id = tokenizer.pad_token_id
    batch = rm.RankingCollator(tokenizer, layout)([dict(e) for e in examples])
    pairs = [batch[k] for k in ("better", "worse", "group", "margins")]

    def loss_and_grads(rewards):
        loss = ranking.ranking_loss(rewards, *pairs)
        model.zero_grad()
        loss.backward()
        return rewards.detach(), loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    padded = loss_and_grads(padded_rewards(model, tokenizer, [ids for e in examples for ids in e["input_ids"]]))
    packed = loss_and_grads(packed_scores(model, batch))
    real = sum(len(ids) for e in examples for ids in e["input_ids"])
    if layout == Layout():
        assert batch["input_ids"].numel() < real, "each ranking's prompt is laid out once per row"
    assert torch.allclose(packed[0], padded[0], atol=1e-5), (packed[0], padded[0])
    assert torch.allclose(packed[1], padded[1], atol=1e-6)
    for name, grad in padded[2].items():
        assert torch.allclose(packed[2][name], grad, atol=1e-5, rtol=1e-4), f"{name}: packed gradient differs"
