"""The dpo stage on a tiny model: a planted preference is learned on held-out prompts,
K-wise rankings become equal-weight pairs with rm's tokens, read with each ranking's
pairs together in a seeded order that changes each epoch, the reference is the SFT
model (frozen copy, or the adapter switched off), a killed run resumes to the same
weights, bad rows and settings stop the run in one line, and the accuracy is a pure
function of log-prob sums."""

from __future__ import annotations

import inspect
import itertools
import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback

from engine.chat import encode_prompt
from pipeline import config as configuration
from pipeline.config import ConfigError
from stages import dpo
from stages.shared import preferences
from stages.shared.settings import LoraSettings
from tests.conftest import planted_rankings, write_jsonl

LORA = LoraSettings(r=4, alpha=8, dropout=0.0)
TINY_DPO = {"max_steps": 30, "batch_size": 8, "learning_rate": 3e-3, "warmup_ratio": 0.0, "max_length": 96, "save_steps": 10, "logging_steps": 5, "precision": "fp32"}


def dpo_config(path, **settings) -> dpo.DpoConfig:
    data = preferences.PreferenceData(train=str(path), eval_fraction=0.25, drop_bad_rows=settings.pop("drop_bad_rows", False))
    return dpo.DpoConfig(data=data, **{**TINY_DPO, **settings})


def sum_logps(model, rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed log-probs of each pair's chosen and rejected tokens, from plain logits
    (independent of TRL's fused head)."""
    chosen, rejected = [], []
    with torch.no_grad():
        for row in rows:
            for key, out in (("chosen_ids", chosen), ("rejected_ids", rejected)):
                ids = torch.tensor([row["prompt_ids"] + row[key]])
                logps = model(input_ids=ids).logits[0, :-1].float().log_softmax(-1)
                targets = ids[0, 1:]
                out.append(logps.gather(-1, targets[:, None])[len(row["prompt_ids"]) - 1 :].sum())
    return torch.stack(chosen), torch.stack(rejected)


# ---------------------------------------------------------------- 1. learning


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_planted_preference_is_learned_on_held_out_prompts(policy_dir, sft_rows, tmp_path, method):
    rows = write_jsonl(tmp_path / "pref.jsonl", planted_rankings(sft_rows, 120))
    settings = {"method": "lora", "lora": LORA} if method == "lora" else {}
    out = tmp_path / "dpo"
    metrics = dpo.run(dpo_config(rows, **settings), {"sft": policy_dir}, out, seed=0)

    before, after = metrics["eval_before"], metrics["eval_after"]
    assert before == {"accuracy": 0.0, "ties": 1.0, "margin": 0.0, "pairs": metrics["eval_pairs"]}, "the policy starts as the reference"
    assert after["accuracy"] >= 0.95 and after["ties"] == 0 and after["margin"] > 0.1, after
    assert metrics["reference_drift"] == 0.0
    assert metrics["train_prompts"] + metrics["eval_prompts"] == 120 and metrics["eval_prompts"] == 30
    assert metrics["train_pairs"] > metrics["train_prompts"], "K-wise rankings yield several pairs"
    assert metrics["train_loss_last"] < metrics["train_loss_first"] and metrics["steps"] == 30
    assert json.loads((out / "eval.json").read_text()) == {"before": before, "after": after}
    assert dpo.headline(metrics).startswith("held-out implicit-reward accuracy 0.000 (ties 1.000) -> ")

    # A plain causal-LM folder with its tokenizer; LoRA merged, its adapter kept beside it.
    model = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).pad_token == "<|endoftext|>"
    assert (out / "adapter" / "adapter_config.json").is_file() == (method == "lora")
    assert not (out / "adapter_config.json").exists()
    start = AutoModelForCausalLM.from_pretrained(policy_dir).state_dict()
    assert any(not torch.equal(p, start[n]) for n, p in model.state_dict().items()), "training changed the weights"
    trainable = metrics["trainable_parameters"]
    total = sum(p.numel() for p in model.parameters())
    assert (trainable < total / 2) if method == "lora" else trainable == total

    # The saved policy prefers the marker on prompts no row had, relative to the SFT model,
    # by tokens built here: what was learned is the planted preference, not its mirror image.
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)

    def tokens(text):
        return tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]

    fresh = [{"prompt_ids": encode_prompt(tokenizer, [{"role": "user", "content": r["prompt"]}]), "chosen_ids": tokens(r["response"] + " Cheers!"),
              "rejected_ids": tokens(r["response"])} for r in sft_rows[200:220]]
    (chosen, rejected), (sft_chosen, sft_rejected) = sum_logps(model.eval(), fresh), sum_logps(AutoModelForCausalLM.from_pretrained(policy_dir), fresh)
    assert ((chosen - sft_chosen) - (rejected - sft_rejected) > 0).float().mean() >= 0.95


# ---------------------------------------------------------------- 2. pairs and tokens


def test_a_k_wise_ranking_yields_one_equal_weight_row_per_ordered_pair_with_rms_tokens(policy_dir):
    from stages import rm

    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    ranking = preferences.parse("f:1", {"prompt": "What is 2 + 3?", "completions": ["Sure! 5.", "5.", "Six.", "No."]})
    encoded = dpo.encode(tokenizer, ranking, 96)
    texts = {tuple(ids): text for text, ids in zip(ranking.completions, rm.encode(tokenizer, ranking, 96, 0.0)["input_ids"], strict=True)}
    prompt = encode_prompt(tokenizer, ranking.prompt)

    def text(row, key):
        assert row["prompt_ids"] == prompt
        return texts[tuple(row["prompt_ids"] + row[key])]  # the very sequences the reward model scores

    pairs = [(text(row, "chosen_ids"), text(row, "rejected_ids")) for row in encoded["rows"]]
    assert pairs == [("Sure! 5.", "5."), ("Sure! 5.", "Six."), ("Sure! 5.", "No."), ("5.", "Six."), ("5.", "No."), ("Six.", "No.")]
    assert all(row["chosen_ids"][-1] == tokenizer.eos_token_id for row in encoded["rows"])

    # Scores order the pairs and ties make none; a chosen/rejected row is one pair. Each
    # pair is one row of the training set, so every pair weighs the same.
    scored = preferences.parse("f:2", {"prompt": "Q", "completions": ["a", "b", "c", "d"], "scores": [1, 3, 1, 0.5]})
    pair = preferences.parse("f:3", {"prompt": "Q2", "chosen": "yes", "rejected": "no"})
    cfg = dpo.DpoConfig(max_length=96)
    rows = [row for e in dpo.encode_all(tokenizer, [ranking, scored, pair], cfg, {}) for row in e["rows"]]
    assert len(rows) == 6 + 5 + 1
    decoded = [(tokenizer.decode(r["chosen_ids"][:-1]), tokenizer.decode(r["rejected_ids"][:-1])) for r in rows[6:]]
    assert decoded == [("a", "d"), ("b", "a"), ("b", "c"), ("b", "d"), ("c", "d"), ("yes", "no")]

    # What TRL's collator makes of a row: prompt + completion, the loss mask on the completion and its EOS.
    trainer_rows = encoded["rows"][:2]
    from trl.trainer.dpo_trainer import DataCollatorForPreference

    batch = DataCollatorForPreference(pad_token_id=tokenizer.pad_token_id)(trainer_rows)
    masked = batch["input_ids"][0][batch["completion_mask"][0].bool()].tolist()
    assert masked == trainer_rows[0]["chosen_ids"] and masked[-1] == tokenizer.eos_token_id


def test_the_loss_types_are_the_ones_trl_dpo_implements():
    from trl import DPOTrainer

    implemented = re.findall(r'loss_type == "(\w+)"', inspect.getsource(DPOTrainer._compute_loss))
    assert sorted(dpo.LOSS_TYPES) == sorted(implemented)


# ---------------------------------------------------------------- 3. the order of the pairs


def rankings_of(order: list[int], owner: list[int]) -> list[tuple[int, int]]:
    """(ranking, how many of its pairs in a row) along an order of pair indices."""
    return [(r, len(list(run))) for r, run in itertools.groupby(owner[i] for i in order)]


def test_the_trainer_reads_each_rankings_pairs_together_in_a_seeded_order_new_each_epoch(policy_dir, sft_rows, tmp_path, monkeypatch):
    from trl import DPOTrainer

    from stages.shared import training

    cfg = dpo.DpoConfig(method="lora", lora=LORA, batch_size=4, max_length=96)
    tokenizer = training.load_tokenizer(policy_dir)
    rankings = [preferences.parse(f"f:{i}", row) for i, row in enumerate(planted_rankings(sft_rows, 24))]
    train = [e["rows"] for e in dpo.encode_all(tokenizer, rankings, cfg, {})]
    owner = [r for r, rows in enumerate(train) for _ in rows]
    assert max(len(rows) for rows in train) > 1 and len(owner) > len(train), "rankings with several pairs"

    def orders(seed: int, epochs: int = 3) -> tuple[list[list[int]], DPOTrainer]:
        """The pair indices the trainer's own train dataloader reads in each epoch."""
        trainer = dpo.build_trainer(cfg, policy_dir, tokenizer, train, tmp_path / str(seed), seed=seed)
        loader = trainer.get_train_dataloader()
        out = []
        for epoch in range(epochs):
            loader.set_epoch(epoch)  # as the Trainer does before each epoch
            out.append([i for batch in loader.batch_sampler for i in batch])
        return out, trainer

    first, trainer = orders(seed=0)
    for order in first:
        assert sorted(order) == list(range(len(owner))), "every pair once per epoch"
        runs = rankings_of(order, owner)
        assert sorted(r for r, _ in runs) == list(range(len(train))), f"a ranking's pairs are split up: {runs}"
        assert all(n == len(train[r]) for r, n in runs)
    assert first[0] != first[1] != first[2] != first[0], "a new order each epoch"
    assert rankings_of(first[0], owner) != sorted(rankings_of(first[0], owner)), "the rankings are shuffled"
    assert orders(seed=0, epochs=2)[0] == first[:2], "the same seed, the same order"
    assert orders(seed=1, epochs=1)[0][0] != first[0]

    # The Trainer hands each epoch's number to the order itself, also where the
    # dataloader cannot (on 2+ processes, behind accelerate's skip_first_batches).
    seen = []
    monkeypatch.setattr(DPOTrainer, "_run_epoch", lambda self, model, epoch, **kwargs: seen.append(epoch), raising=False)
    trainer._run_epoch(model=None, epoch=5, train_dataloader=None)
    assert seen == [5] and trainer.ranking_order.epoch == 5


def test_two_processes_read_one_order_between_them_also_when_resuming_mid_epoch():
    from accelerate.data_loader import prepare_data_loader, skip_first_batches
    from torch.utils.data import DataLoader

    sizes = [1, 3, 6, 2, 1, 3, 1, 6, 2, 2, 3, 6]  # 36 pairs, 9 batches of 4: process 1's fifth is accelerate's padding (even_batches)
    owner = [r for r, n in enumerate(sizes) for _ in range(n)]

    def shard(rank: int, epoch: int, skip: int = 0) -> list[list[int]]:
        order = dpo.RankingOrder(sizes, seed=7)  # each process builds its own
        loader = prepare_data_loader(DataLoader(list(range(36)), batch_size=4, sampler=order), num_processes=2, process_index=rank, put_on_device=False)
        if skip:
            loader = skip_first_batches(loader, skip)
        order.set_epoch(epoch)  # as PairsDPOTrainer._run_epoch does: behind skip_first_batches, the next line does not reach it
        loader.set_epoch(epoch)
        return [batch.tolist() for batch in loader]

    for epoch in (0, 1):
        expected = dpo.RankingOrder(sizes, seed=7).order(epoch)
        zero, one = shard(0, epoch), shard(1, epoch)
        read = [i for pair in zip(zero, one, strict=True) for batch in pair for i in batch]
        assert read[:36] == expected, "the processes take turns through one order"
        assert sorted(r for r, _ in rankings_of(read[:36], owner)) == list(range(len(sizes)))
        # Resuming in the middle of the epoch (3 steps done) reads what the uninterrupted run had left.
        assert shard(0, epoch, skip=3) == zero[3:] and shard(1, epoch, skip=3) == one[3:]


# ---------------------------------------------------------------- 4. the reference


@pytest.mark.parametrize("method", ["full", "lora"])
def test_the_reference_stays_the_sft_model_while_the_policy_moves(policy_dir, sft_rows, tmp_path, method):
    from stages.shared import training

    cfg = dpo.DpoConfig(method=method, lora=LORA, max_steps=6, batch_size=8, learning_rate=3e-3, warmup_ratio=0.0, max_length=96, save_steps=100, precision="fp32")
    tokenizer = training.load_tokenizer(policy_dir)
    rankings = [preferences.parse(f"f:{i}", row) for i, row in enumerate(planted_rankings(sft_rows, 24))]
    train = [e["rows"] for e in dpo.encode_all(tokenizer, rankings, cfg, {})]
    rows = [row for ranking in train for row in ranking]
    trainer = dpo.build_trainer(cfg, policy_dir, tokenizer, train, tmp_path, seed=0)
    trainer.train()
    if method == "lora":
        assert trainer.ref_model is None, "no second model: the reference is the adapter switched off"
        adapters = [p for n, p in trainer.model.named_parameters() if "lora_B" in n]
        assert adapters and all(p.abs().sum() > 0 for p in adapters), "every adapter was trained away from zero"
    else:
        assert trainer.ref_model is not None and trainer.ref_model is not trainer.model

    held = rows[:16]
    measured = dpo.held_out_logps(trainer, held, batch_size=5)
    sft_chosen, sft_rejected = sum_logps(AutoModelForCausalLM.from_pretrained(policy_dir), held)
    assert torch.allclose(torch.tensor(measured["ref_chosen"]), sft_chosen, atol=1e-4)
    assert torch.allclose(torch.tensor(measured["ref_rejected"]), sft_rejected, atol=1e-4)
    assert not torch.allclose(torch.tensor(measured["policy_chosen"]), sft_chosen, atol=1e-2), "the policy moved"


# ---------------------------------------------------------------- 5. resume


class Interrupt(TrainerCallback):
    """Ctrl-C right after the checkpoint of step `at` is written and marked complete."""

    def __init__(self, at: int):
        self.at = at

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.at:
            raise KeyboardInterrupt


@pytest.mark.parametrize("method", ["full", "lora"])
def test_a_killed_run_resumes_to_the_same_weights(policy_dir, sft_rows, tmp_path, monkeypatch, capsys, method):
    rows = write_jsonl(tmp_path / "pref.jsonl", planted_rankings(sft_rows, 32))
    cfg = dpo_config(rows, method=method, lora=LORA, max_steps=16, save_steps=4, batch_size=4, learning_rate=1e-3)
    straight = dpo.run(cfg, {"sft": policy_dir}, tmp_path / "straight", seed=0)
    assert straight["epochs"] > 1, "the run crosses an epoch, so resuming must restore the data order"

    build = dpo.build_trainer

    def interrupted(*args, **kwargs):
        trainer = build(*args, **kwargs)
        trainer.add_callback(Interrupt(at=8))
        return trainer

    monkeypatch.setattr(dpo, "build_trainer", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dpo.run(cfg, {"sft": policy_dir}, tmp_path / "killed", seed=0)
    monkeypatch.setattr(dpo, "build_trainer", build)
    assert not (tmp_path / "killed" / "model.safetensors").exists()
    capsys.readouterr()

    resumed = dpo.run(cfg, {"sft": policy_dir}, tmp_path / "killed", seed=0)
    assert "[dpo] resuming from" in capsys.readouterr().out
    assert resumed["steps"] == 16 and resumed["steps_last_attempt"] == 8
    assert resumed["eval_before"] == straight["eval_before"] and resumed["eval_after"] == pytest.approx(straight["eval_after"], abs=1e-6)
    expected, actual = load_file(tmp_path / "straight" / "model.safetensors"), load_file(tmp_path / "killed" / "model.safetensors")
    assert expected.keys() == actual.keys()
    for name in expected:
        assert torch.allclose(expected[name], actual[name], rtol=0, atol=1e-6), f"{name} differs after resuming"


def test_a_dpo_run_killed_for_real_resumes_through_the_cli_to_the_same_weights(tiny_model_dir, sft_rows, tmp_path):
    from pipeline import cli
    from tests.conftest import tiny_config
    from tests.pipeline.test_resume import kill_after_checkpoint, start, weights

    train = write_jsonl(tmp_path / "sft.jsonl", sft_rows[:32])
    rankings = write_jsonl(tmp_path / "pref.jsonl", planted_rankings(sft_rows, 60))
    section = {"data": {"train": str(rankings), "eval_fraction": 0.25}, **TINY_DPO, "max_steps": 150, "batch_size": 4, "learning_rate": 1e-3}
    straight = tiny_config(tmp_path, tiny_model_dir, train, name="straight", sft={"max_steps": 2}, dpo=section)
    assert cli.main(["run", "dpo", "--config", str(straight)]) == 0
    built = sorted(p.name for p in (tmp_path / "runs" / "straight").iterdir() if (p / "manifest.json").is_file())
    assert built == ["base", "dpo", "sft"], "dpo needs sft and the preference rows, not rm or rlhf"

    config = tiny_config(tmp_path, tiny_model_dir, train, name="killed", sft={"max_steps": 2}, dpo=section)
    assert cli.main(["run", "sft", "--config", str(config)]) == 0  # so the kill lands in dpo
    kill_after_checkpoint(config, "dpo", at_least=30)
    process = start(config, "dpo")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output
    assert "dpo: resuming the interrupted run from step" in output
    run = tmp_path / "runs" / "killed"
    metrics = json.loads((run / "dpo" / "manifest.json").read_text())["metrics"]
    assert 0 < metrics["steps_last_attempt"] < 150 and metrics["steps"] == 150
    expected, actual = weights(tmp_path / "runs" / "straight" / "dpo"), weights(run / "dpo")
    for name in expected:
        assert torch.allclose(expected[name], actual[name], rtol=0, atol=1e-6), f"{name} differs after resuming"


# ---------------------------------------------------------------- 6. bad input


def test_a_bad_row_is_one_line_naming_its_file_and_line(policy_dir, sft_rows, tmp_path):
    rows = planted_rankings(sft_rows, 20)
    rows[6] = {"prompt": "Q", "completions": ["same", "same"]}
    path = write_jsonl(tmp_path / "pref.jsonl", rows)
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:7: the same completion appears twice$"):
        dpo.check(dpo_config(path))

    rows[6] = {"prompt": "word " * 200, "chosen": "a", "rejected": "b"}
    write_jsonl(path, rows)
    out = tmp_path / "out"
    with pytest.raises(ConfigError, match=rf"^{re.escape(str(path))}:7: the prompt is \d+ tokens, which leaves no room for a completion in max_length=96$"):
        dpo.run(dpo_config(path), {"sft": policy_dir}, out, seed=0)
    assert not out.exists() or not any(out.iterdir()), "nothing trained"

    rows[3] = {"prompt": "Q", "completions": ["only one"]}
    write_jsonl(path, rows)
    metrics = dpo.run(dpo_config(path, drop_bad_rows=True, max_steps=1), {"sft": policy_dir}, out, seed=0)
    assert metrics["dropped_bad_rows"] == {"too_few_completions": 1, "prompt_too_long": 1}
    assert metrics["train_prompts"] + metrics["eval_prompts"] == 18


@pytest.mark.parametrize(("yaml_text", "message"), [
    ("dpo:\n  loss_type: dpo\n", "x.yaml:2: dpo.loss_type: unknown loss type 'dpo' (TRL 1.16 DPO accepts: " + ", ".join(dpo.LOSS_TYPES) + ")"),
    ("dpo:\n  beta: 0\n", "x.yaml:2: dpo.beta: must be positive, got 0.0"),
    ("dpo:\n  beta: -0.5\n", "x.yaml:2: dpo.beta: must be positive, got -0.5"),
    ("dpo:\n  loss_type: exo_pair\n", "x.yaml:2: dpo.loss_type: exo_pair needs label_smoothing above 0 (the EXO paper suggests 1e-3)"),
    ("dpo:\n  label_smoothing: 0.5\n", "x.yaml:2: dpo.label_smoothing: must be in [0, 0.5), got 0.5"),
    ("dpo:\n  max_prompt_length: 512\n", "x.yaml:2: dpo.max_prompt_length: must be between 1 and max_length - 1 (511), got 512"),
    ("dpo:\n  method: qlora\n", "x.yaml:2: dpo.method: expected one of 'full', 'lora', got 'qlora'"),
    ("dpo:\n  data:\n    eval_fraction: 1.5\n", "x.yaml:3: dpo.data.eval_fraction: must be between 0 and 1, got 1.5"),
    ("dpo:\n  lora:\n    r: 0\n", "x.yaml:3: dpo.lora.r: must be at least 1, got 0"),
    ("dpo:\n  learning_rate: 0\n", "x.yaml:2: dpo.learning_rate: must be positive, got 0.0"),
])
def test_a_bad_setting_is_one_line_naming_file_line_and_key(tmp_path, monkeypatch, yaml_text, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x.yaml").write_text(yaml_text)
    with pytest.raises(ConfigError) as refused:
        configuration.load("x.yaml", [], {"dpo": dpo.DpoConfig})
    assert str(refused.value) == message


def test_defaults_load_and_label_smoothing_is_unused_unless_read():
    cfg = dpo.DpoConfig()
    assert (cfg.loss_type, cfg.beta, cfg.method, cfg.data.train) == ("sigmoid", 0.1, "full", "configs/data/demo_rm.jsonl")
    assert cfg.unused() == {"lora", "label_smoothing"}
    assert dpo.DpoConfig(loss_type="robust", method="lora").unused() == set()


# ---------------------------------------------------------------- 7. the accuracy


def test_implicit_reward_accuracy_on_hand_tensors():
    policy_chosen = torch.tensor([-10.0, -5.0, -7.0, -3.0])
    policy_rejected = torch.tensor([-12.0, -4.0, -7.0, -3.0])
    ref_chosen = torch.tensor([-11.0, -5.0, -7.0, -2.0])
    ref_rejected = torch.tensor([-11.0, -5.0, -7.0, -1.0])
    # log-ratios chosen: +1, 0, 0, -1; rejected: -1, +1, 0, -2  ->  differences +2, -1, 0, +1
    metrics = dpo.implicit_reward_metrics(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta=0.5)
    assert metrics == {"accuracy": 0.5, "ties": 0.25, "margin": pytest.approx(0.5 * (2 - 1 + 0 + 1) / 4), "pairs": 4}

    # The policy is the reference: every pair ties, and a tie is not a win.
    same = dpo.implicit_reward_metrics([-3.0, -8.0], [-4.0, -1.0], [-3.0, -8.0], [-4.0, -1.0], beta=0.1)
    assert same == {"accuracy": 0.0, "ties": 1.0, "margin": 0.0, "pairs": 2}
    # Higher chosen log-prob alone is not a win: the reference liked it as much.
    assert dpo.implicit_reward_metrics([-1.0], [-9.0], [-1.0], [-9.0], beta=1.0)["accuracy"] == 0.0
    assert dpo.implicit_reward_metrics([-1.0], [-9.0], [-2.0], [-9.0], beta=1.0)["accuracy"] == 1.0
    with pytest.raises(ValueError, match="same number"):
        dpo.implicit_reward_metrics([-1.0], [-1.0, -2.0], [-1.0], [-1.0], beta=1.0)
