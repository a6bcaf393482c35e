"""rlhf.activation_checkpointing: the layers really recompute in the backward, and the
gradients are the ones without it (full fine-tuning and LoRA)."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from engine.policy import Policy, no_dropout
from pipeline.config import ConfigError
from stages import rlhf
from stages.shared.settings import LoraSettings
from tests.conftest import ppo_config


def gradients(policy_dir, lora: bool, checkpoint: bool) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of a language-modelling loss, and how often layer 0's MLP ran."""
    model = AutoModelForCausalLM.from_pretrained(policy_dir, **no_dropout(policy_dir))
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear") if lora else None
    policy = Policy.wrap(model, config)
    policy.eval()
    if checkpoint:
        policy.checkpoint_activations()
    runs = []
    base = policy.model.get_base_model() if lora else policy.model
    # A pre-hook: the recompute stops early, once the last tensor the backward needs is back,
    # which is inside the MLP, before a forward hook would run.
    base.model.layers[0].mlp.register_forward_pre_hook(lambda *args: runs.append(1))
    torch.manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (3, 12))
    policy.model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    return {n: p.grad.clone() for n, p in policy.model.named_parameters() if p.grad is not None}, len(runs)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_checkpointing_recomputes_the_layers_and_leaves_the_gradients_as_they_were(policy_dir, lora):
    plain, plain_runs = gradients(policy_dir, lora, checkpoint=False)
    checkpointed, checkpointed_runs = gradients(policy_dir, lora, checkpoint=True)
    assert (plain_runs, checkpointed_runs) == (1, 2), "the layer runs again in the backward"
    assert plain.keys() == checkpointed.keys() and plain
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=0, atol=1e-6), name


def test_the_model_outside_the_layers_stays_in_eval_mode(policy_dir):
    model = AutoModelForCausalLM.from_pretrained(policy_dir, **no_dropout(policy_dir))
    policy = Policy.wrap(model)
    policy.eval()
    policy.checkpoint_activations()
    assert not model.training and all(layer.training for layer in model.model.layers)


RUNS = {
    "full": {"method": "full"},
    "lora-reward": {"method": "lora", "value_model": "reward", "value_layers": 1, "lora": LoraSettings(r=4, alpha=8)},
    "grpo": {"method": "lora", "advantage": "grpo", "samples_per_prompt": 4, "lora": LoraSettings(r=4, alpha=8)},
}


@pytest.mark.parametrize("run", RUNS)
def test_a_ppo_run_with_checkpointing_ends_at_the_same_weights(policy_dir, planted_rm, prompts, tmp_path, run):
    cfg = ppo_config(prompts, steps=2, **RUNS[run])
    rlhf.train(cfg, policy_dir, planted_rm, tmp_path / "plain", seed=0)
    rlhf.train(dataclasses.replace(cfg, activation_checkpointing=True), policy_dir, planted_rm, tmp_path / "checkpointed", seed=0)
    plain, checkpointed = load_file(tmp_path / "plain" / "model.safetensors"), load_file(tmp_path / "checkpointed" / "model.safetensors")
    assert plain.keys() == checkpointed.keys()
    for name in plain:
        assert torch.allclose(plain[name], checkpointed[name], rtol=0, atol=1e-5), name


def test_a_value_adapter_on_the_policys_layers_is_refused_before_training(prompts):
    """The value as a second adapter on the policy's layers (separate + lora): the backward's
    recompute would run whichever adapter is active then (a run gave other weights)."""
    cfg = ppo_config(prompts, method="lora", value_model="separate", activation_checkpointing=True)
    with pytest.raises(ConfigError) as e:
        rlhf.check(cfg)
    assert str(e.value) == (
        "rlhf.activation_checkpointing: with value_model separate and method lora the value is a second adapter on the policy's layers, "
        "and the backward's recompute would run whichever adapter is active then; use value_model: reward or shared, or turn it off"
    )
    rlhf.check(dataclasses.replace(cfg, activation_checkpointing=False))
