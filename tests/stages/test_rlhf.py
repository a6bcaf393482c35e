"""The rlhf stage's checks: inputs and settings it refuses before training, and a
run that stops with its own message when the numbers stop being finite."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer, LlamaConfig, LlamaForSequenceClassification

from pipeline.errors import ConfigError, TrainingDiverged
from stages import rlhf
from tests.conftest import load_config, make_tokenizer
from tests.conftest import ppo_config as config


def test_a_reward_model_with_another_tokenizer_is_refused(policy_dir, prompts, tmp_path):
    other = tmp_path / "other_rm"
    tokenizer = make_tokenizer(pad="<|endoftext|>")
    tokenizer.add_tokens(["<|extra|>"])
    config_ = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(config_).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(ConfigError) as caught:
        rlhf.train(config(prompts), policy_dir, other, tmp_path / "out", seed=0)
    assert str(caught.value).startswith(f"rlhf.rewards[0].source: the tokenizer of {other} differs from the policy's ({policy_dir}); ")
    with pytest.raises(ConfigError) as caught:  # the folder the user named is what the line names
        rlhf.train(dataclasses.replace(config(prompts), init_from=str(policy_dir), reward_model=str(other)), policy_dir, other, tmp_path / "out2", seed=0)
    assert str(caught.value).startswith(f"rlhf.reward_model: the tokenizer of {other} differs from the policy's (rlhf.init_from: {policy_dir}); ")


def test_a_non_finite_reward_stops_the_run_with_a_clear_message(policy_dir, planted_rm, prompts, tmp_path):
    broken = tmp_path / "nan_rm"
    model = AutoModelForSequenceClassification.from_pretrained(planted_rm)
    with torch.no_grad():
        model.score.weight.fill_(float("nan"))
    model.save_pretrained(broken)
    AutoTokenizer.from_pretrained(planted_rm).save_pretrained(broken)
    cfg = config(prompts)
    with pytest.raises(TrainingDiverged, match="non-finite"):
        rlhf.train(cfg, policy_dir, broken, tmp_path / "out", seed=0)


@pytest.mark.parametrize(("settings", "message"), [
    ("minibatch_size: 3", "rlhf.minibatch_size: must divide batch_size (8), got 3"),
    ("microbatch_size: 3", "rlhf.microbatch_size: must divide minibatch_size (8), got 3"),
    ("ptx_coef: 0.5", "rlhf.ptx_coef: needs data.ptx"),
    ("top_p: 0", "rlhf.top_p: must be in (0, 1], got 0.0"),
    ("kl_coef: -0.1", "rlhf.kl_coef: must be >= 0 (0 is no KL penalty), got -0.1"),
    ("method: lora\n  lora: {r: 0}", "rlhf.lora.r: must be at least 1, got 0"),
    ("method: lora\n  lora: {dropout: 1.5}", "rlhf.lora.dropout: must be in [0, 1), got 1.5"),
    ("value_layers: 0", "rlhf.value_layers: must be at least 1 (or null for every layer), got 0"),
    ("value_model: reward", "rlhf.value_model: reward needs method: lora"),
    ("kl_bias_correction: true", "rlhf.kl_bias_correction: weighs a KL loss term, and advantage gae here shapes the KL into the reward"),
    ("advantage: grpo\n  samples_per_prompt: 4\n  kl_penalty: reward\n  kl_bias_correction: true", "rlhf.kl_bias_correction: weighs a KL loss term"),
])
def test_inconsistent_settings_are_refused_with_their_line(tmp_path, settings, message):
    path = tmp_path / "run.yaml"
    minibatch = "" if settings.startswith("minibatch_size") else "  minibatch_size: 8\n"
    path.write_text(f"run:\n  name: x\nrlhf:\n  batch_size: 8\n{minibatch}  {settings}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value) and str(error.value).startswith(f"{path}:")


def test_kl_bias_correction_enters_the_fingerprint_only_where_a_kl_loss_term_is():
    from pipeline.config import fingerprint_view
    from stages.rlhf import RlhfConfig

    def view(**settings):
        return fingerprint_view(RlhfConfig(batch_size=8, minibatch_size=8, **settings), str)

    assert "kl_bias_correction" not in view(), "a PPO run (KL in the reward) keeps its fingerprint"
    assert view(advantage="grpo", samples_per_prompt=4)["kl_bias_correction"] is None
    assert view(advantage="grpo", samples_per_prompt=4, kl_bias_correction=False)["kl_bias_correction"] is False
