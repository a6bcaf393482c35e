"""The value layouts and the LoRA policy: one backbone whose reference is the SFT
model, folded sampling, the value adapter on the top layers or on the reward model,
and value/ reproducing the run's values."""

from __future__ import annotations

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from engine import forward, models, output, packing, probes, sampling, values
from engine.policy import AdapterOffReference
from pipeline.errors import ConfigError
from rl import tokens as rl_tokens
from rl import trajectory
from stages import rlhf
from stages.shared.settings import LoraSettings
from tests.conftest import history, perturb_adapters
from tests.conftest import ppo_config as config


def test_lora_keeps_one_backbone_whose_reference_is_the_sft_model(policy_dir, planted_rm, prompts, tmp_path):
    cfg = config(prompts, method="lora", lora=LoraSettings(r=2, alpha=4), steps=2, learning_rate=1e-2)
    loaded = models.load_models(cfg, policy_dir, planted_rm)
    model = loaded.trained
    assert isinstance(loaded.reference, AdapterOffReference), "no second copy of the weights"
    sft = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    packed = packing.pack(ids[:, :2], torch.ones(1, 2), ids[:, 2:], torch.ones(1, 3, dtype=torch.bool))
    perturb_adapters(model)  # LoRA's B starts at zero: a reference that forgot to turn adapters off would pass unperturbed
    with torch.no_grad():
        expected = torch.log_softmax(sft(ids).logits[0, 1:-1], -1).gather(-1, ids[0, 2:, None]).squeeze(-1)
        assert torch.equal(loaded.reference.logprobs(packed, 1.0), expected), "adapters disabled is exactly the SFT model"
        adapted = forward.response_logits(model.policy.model, packed)
        assert not torch.allclose(rl_tokens.logprobs_from_logits(adapted, packed.tokens), expected, atol=1e-3), "the adapters matter here"
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("value.head.") for n in trainable) and frozen
    assert any(".policy." in n for n in trainable) and any(".value." in n for n in trainable), trainable

    metrics = rlhf.train(cfg, policy_dir, planted_rm, tmp_path, seed=0)
    assert metrics["trainable_parameters"] < sum(p.numel() for p in sft.parameters()) / 2
    kls = [row["objective/kl"] for row in history(tmp_path)]
    assert kls[0] == pytest.approx(0.0, abs=1e-5) and kls[1] > 1e-3, ("the policy starts as the reference, then moves from it", kls)
    trained = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert not torch.allclose(trained(ids).logits, sft(ids).logits, atol=1e-5), "the merged policy carries the update"
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "value")


def test_sampling_with_the_lora_policy_folded_in_samples_the_policy_and_leaves_the_sft_weights_untouched(policy_dir, planted_rm, prompts):
    cfg = config(prompts, method="lora", lora=LoraSettings(r=2, alpha=4))
    model = models.load_models(cfg, policy_dir, planted_rm).trained
    perturb_adapters(model)
    frozen = {n: (p, p.detach().clone()) for n, p in model.named_parameters() if not p.requires_grad}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    ids = torch.tensor([[5, 17, 42, 99, 3, 8]])
    notes = []
    with torch.no_grad():
        with_adapter = model.policy.model(ids).logits
        unmerged = sampling.sample_plain(model.policy.model, ids, torch.ones_like(ids), 0.0, 8, -1, 0)
        with model.policy.sampling_weights(True, notes.append) as sampler:
            folded = sampler(ids).logits
            merged = sampling.sample_plain(sampler, ids, torch.ones_like(ids), 0.0, 8, -1, 0)
    assert notes == [], "these layers fold: no fallback"
    sft = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    with torch.no_grad():
        assert not torch.allclose(with_adapter, sft(ids).logits, atol=1e-3), "the adapter must matter for this test to mean anything"
    assert torch.allclose(folded, with_adapter, atol=1e-5), "the folded weights are the policy"
    assert torch.equal(merged, unmerged)
    for name, p in model.named_parameters():
        if name in frozen:
            assert p is frozen[name][0] and torch.equal(p, frozen[name][1]), f"{name} is not the SFT weight it was"
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable
    with torch.no_grad(), model.policy.model.disable_adapter():
        assert torch.equal(model.policy.model(ids).logits, sft(ids).logits), "adapters off is still exactly the SFT model"


def test_value_layers_puts_the_value_adapter_on_the_top_layers_and_value_folder_keeps_it(policy_dir, planted_rm, prompts, tmp_path):
    cfg = config(prompts, method="lora", lora=LoraSettings(r=2, alpha=4), value_layers=1)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    model = models.load_models(cfg, policy_dir, planted_rm).trained
    perturb_adapters(model)
    n_layers = model.policy.model.config.num_hidden_layers
    value_params = [n for n, _ in model.named_parameters() if ".value." in n and "lora_" in n]
    assert value_params and all(f".layers.{n_layers - 1}." in n for n in value_params), value_params
    assert any(".layers.0." in n for n, _ in model.named_parameters() if ".policy." in n)

    queries, responses = torch.tensor([[5, 17, 42]]), torch.tensor([[99, 3, 8]])
    packed = packing.pack(queries, torch.ones_like(queries), responses, torch.ones_like(responses, dtype=torch.bool))
    _, values, _, _ = model(packed, 1.0)
    values.sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None and ".value." in n}
    assert with_grad == set(value_params), "the value's backward reaches its adapter and nothing below"

    output.save_final(Accelerator(cpu=True), model, tokenizer, tmp_path, {}, {})
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "value").eval()
    with torch.no_grad():
        expected = forward.token_values(saved, saved.score, packed)
    assert torch.allclose(packed.unpack(expected, 0.0), values.detach(), atol=1e-5), "value/ computes what the run's value adapter computed"

    with pytest.raises(ConfigError, match="value_layers: 9 is more than the model's 2 layers"):
        models.load_models(config(prompts, method="lora", value_layers=9), policy_dir, planted_rm)


@pytest.mark.parametrize("method, value_model", [("full", "separate"), ("lora", "separate"), ("full", "shared"), ("lora", "shared"), ("lora", "reward")])
def test_the_value_model_starts_as_the_reward_model_on_the_standardised_scale(policy_dir, planted_rm, prompts, method, value_model):
    loaded = models.load_models(config(prompts, method=method, value_model=value_model), policy_dir, planted_rm, reward_std=4.0)
    model, reward_model = loaded.trained, loaded.reward_model
    head = model.value.value_model.score if isinstance(model.value, values.ValueModelCopy) else model.value.head
    assert torch.equal(head.weight, reward_model.score.weight / 4.0)
    if (method, value_model) in (("full", "separate"), ("lora", "reward")):
        ids = torch.tensor([[5, 17, 42, 99, 3]])
        with torch.no_grad():
            packed = packing.pack(ids[:, :2], torch.ones(1, 2, dtype=torch.long), ids[:, 2:], torch.ones(1, 3, dtype=torch.bool))
            state_values = model(packed, 1.0)[1]
            scores = reward_model(input_ids=ids[:, :-1]).logits.squeeze(-1)
        # the value of the state before the last token is read where the RM would score that prefix
        assert state_values[0, -1].item() == pytest.approx(scores[0].item() / 4.0, abs=1e-5)


def test_a_value_on_the_reward_model_runs_its_top_layers_from_the_scoring_pass_and_leaves_the_scores_alone(policy_dir, planted_rm, prompts, tmp_path):
    cfg = config(prompts, method="lora", value_model="reward", lora=LoraSettings(r=2, alpha=4), value_layers=1)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    loaded = models.load_models(cfg, policy_dir, planted_rm)
    model, reward_model = loaded.trained, loaded.reward_model
    assert isinstance(loaded.reference, AdapterOffReference) and model.value.reward_model is reward_model and model.value.top == 1
    perturb_adapters(model)
    value_params = [n for n, _ in model.named_parameters() if n.startswith("value.reward_model.") and "lora_" in n]
    assert value_params and all(".layers.1." in n for n in value_params), value_params

    # two sequences that share the start of their prompts, as a chat template makes them
    queries, query_mask = packing.pad_sequences([[5, 17, 42, 7], [5, 17, 8]], tokenizer.pad_token_id, "left", "cpu")
    responses, response_mask = torch.tensor([[99, 3, 8], [11, 12, 0]]), torch.tensor([[True, True, True], [True, True, False]])
    batch = trajectory.Rollout(queries=queries, query_mask=query_mask, responses=responses, response_mask=response_mask, ended=torch.zeros(2, dtype=torch.bool), ref_logprobs=None, scores=None)
    layout = probes.layout_for(model.policy.model, reward_model)
    packed = packing.pack_rollout(batch, layout)
    assert packed.prefix == 2
    with torch.no_grad():
        scores, batch.value_inputs = forward.reward_scores(reward_model, packed, keep_layer=1)
    rm = AutoModelForSequenceClassification.from_pretrained(planted_rm).eval()
    with torch.no_grad():
        for r, ids in enumerate([[5, 17, 42, 7, 99, 3, 8], [5, 17, 8, 11, 12]]):
            assert scores[r].item() == pytest.approx(rm(torch.tensor([ids])).logits[0, 0].item(), abs=1e-5), "the value adapter is off while the RM scores"

    _, from_states, _, _ = model(packing.pack_rollout(batch, layout), 1.0)  # the top layer only, from the recorded states
    _, every_layer, _, _ = model(packed, 1.0)  # no recorded states: the whole reward model, value adapter on
    torch.testing.assert_close(from_states, every_layer, rtol=1e-5, atol=1e-6)
    with torch.no_grad(), forward.adapters_off(reward_model):
        unadapted = model(packed, 1.0)[1]
    assert not torch.allclose(unadapted, every_layer, atol=1e-4), "the value adapter must matter for this test to mean anything"
    from_states.sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    assert with_grad == set(value_params) | {"value.head.weight"} | ({"value.head.bias"} if model.value.head.bias is not None else set())

    output.save_final(Accelerator(cpu=True), model, tokenizer, tmp_path, {}, {})
    saved = AutoModelForSequenceClassification.from_pretrained(tmp_path / "value").eval()
    with torch.no_grad():
        expected = forward.token_values(saved, saved.score, packed)
    torch.testing.assert_close(packed.unpack(expected, 0.0), every_layer.detach(), rtol=1e-5, atol=1e-5)


def test_packed_states_go_to_the_grid_and_back():
    """The reward model's recorded states reach the value's forward through the unpacked
    grid, so a minibatch packed another way still finds each token's own state."""
    queries, query_mask = packing.pad_sequences([[5, 17, 42, 7], [5, 17, 8]], 0, "left", "cpu")
    responses, response_mask = torch.tensor([[99, 3, 8], [11, 12, 0]]), torch.tensor([[True, True, True], [True, True, False]])
    real = torch.cat([query_mask.bool(), response_mask], 1)
    tokens = torch.cat([queries, responses], 1)
    for layout in (packing.Layout(), packing.Layout(share_prefix=False), packing.Layout(0, share_prefix=False)):
        packed = packing.pack(queries, query_mask, responses, response_mask, layout)
        grid = packed.to_grid(packed.input_ids)
        assert torch.equal(grid[real], tokens[real]), layout
        positions = packed.place[real]  # every real token's packed position
        assert torch.equal(packed.from_grid(grid).flatten()[positions], packed.input_ids.flatten()[positions]), layout
        one = packing.pack(queries[1:], query_mask[1:], responses[1:], response_mask[1:], layout)  # the second sequence alone
        assert torch.equal(one.from_grid(grid[1:]), one.input_ids), layout
