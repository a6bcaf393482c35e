"""PPO on tiny models: a planted reward rises with bounded KL, rollout and update agree
on every log-probability, one-pass mode changes no number, and the value learns."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from engine import chat, driver, models, packing, probes, rollout, update, values
from engine.metrics import Timer
from rl import advantages
from rl import rewards as rl_rewards
from stages import rlhf
from stages.shared import data
from stages.shared.settings import LoraSettings
from tests.conftest import history
from tests.conftest import ppo_config as config


def test_ppo_raises_a_planted_reward_with_bounded_kl(policy_dir, planted_rm, prompts, tmp_path):
    cfg = config(prompts, steps=30, batch_size=16, minibatch_size=8, microbatch_size=8, ppo_epochs=4, learning_rate=1e-2, max_new_tokens=3, kl_coef=0.2)
    metrics = rlhf.train(cfg, policy_dir, planted_rm, tmp_path, seed=0)
    rows = history(tmp_path)
    assert len(rows) == 30 and metrics["steps"] == 30
    first = sum(r["objective/scores"] for r in rows[:5]) / 5
    last = sum(r["objective/scores"] for r in rows[-5:]) / 5
    assert last > first + 2.0, (first, last)
    kls = [r["objective/kl"] for r in rows]
    # It moved, and the KL penalty held it near the reference: over the last 5 steps the
    # KL averages about 10 nats here, where the same run with kl_coef 0 averages about 15.
    assert kls[-1] > 1.0 and sum(kls[-5:]) / 5 < 12, kls
    assert metrics["eval_after"]["score"] > metrics["eval_before"]["score"]
    for key in ("objective/entropy", "objective/non_score_reward", "objective/rlhf_reward", "loss/policy", "loss/value", "policy/approx_kl",
                "policy/clipfrac", "policy/ratio_mean", "policy/grad_norm", "value/clipfrac", "response/length", "response/eos_fraction", "lr", "tokens_per_second",
                "time/generation", "time/scoring", "time/update"):
        assert key in rows[0], key
    assert rows[-1]["lr"] < rows[0]["lr"], "the learning rate anneals"

    AutoModelForCausalLM.from_pretrained(tmp_path)  # plain folders
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "value")
    assert (tmp_path / "samples.md").read_text().count("**PPO**") == 2


def test_the_gradient_norm_is_logged_before_clipping(policy_dir, planted_rm, prompts, tmp_path):
    # One step, so the gradient is the same whatever the clip: a norm logged after clipping
    # would read 1e-6 in the clipped run.
    logged = []
    for clip in (1e-6, 1e6):
        cfg = config(prompts, steps=1, ppo_epochs=1, minibatch_size=8, microbatch_size=8, max_grad_norm=clip)
        rlhf.train(cfg, policy_dir, planted_rm, tmp_path / str(clip), seed=0)
        logged.append(history(tmp_path / str(clip))[0]["policy/grad_norm"])
    assert logged[0] == pytest.approx(logged[1], rel=1e-5) and logged[0] > 1e-3, logged


@pytest.mark.parametrize("method, value_model", [("full", "separate"), ("lora", "shared"), ("lora", "reward")])
def test_rollout_and_update_give_every_token_the_same_log_probability(policy_dir, planted_rm, prompts, tmp_path, method, value_model):
    # One epoch over one minibatch: the update's first forward sees the rollout's own
    # weights, so each ratio is exactly 1 unless padding, positions or temperature differ.
    cfg = config(prompts, method=method, value_model=value_model, steps=1, ppo_epochs=1, minibatch_size=8, microbatch_size=4, temperature=0.7, max_new_tokens=10)
    rlhf.train(cfg, policy_dir, planted_rm, tmp_path, seed=3)
    row = history(tmp_path)[0]
    assert row["policy/ratio_min"] == pytest.approx(1.0, abs=1e-5) and row["policy/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert row["policy/clipfrac"] == 0.0 and row["objective/kl"] == pytest.approx(0.0, abs=1e-5), "the policy starts as the reference"


@pytest.mark.parametrize("method, value_model, value_layers", [("full", "separate", None), ("lora", "separate", None), ("lora", "shared", None), ("lora", "reward", 1)])
def test_one_pass_mode_takes_the_old_log_probs_from_the_update_without_changing_a_number(policy_dir, planted_rm, prompts, tmp_path, monkeypatch, method, value_model, value_layers):
    # One epoch over one microbatch: the update's forward is the rollout's scoring pass,
    # so skipping the separate no-grad pass must leave every metric and weight as it was.
    cfg = config(prompts, method=method, value_model=value_model, value_layers=value_layers, steps=1, ppo_epochs=1, minibatch_size=8, microbatch_size=8, learning_rate=1e-2)
    assert update.one_pass(cfg)
    passes = []
    forward = models.PolicyAndValue.forward
    monkeypatch.setattr(models.PolicyAndValue, "forward", lambda self, *args: passes.append(torch.is_grad_enabled()) or forward(self, *args))
    rlhf.train(cfg, policy_dir, planted_rm, tmp_path / "fused", seed=5)
    assert passes == [True], "one forward, the update's"
    passes.clear()
    monkeypatch.setattr(driver, "one_pass", lambda cfg: False)
    rlhf.train(cfg, policy_dir, planted_rm, tmp_path / "separate", seed=5)
    assert passes == [False, True], "a no-grad scoring pass, then the update's"

    fused, separate = history(tmp_path / "fused")[0], history(tmp_path / "separate")[0]
    for key in ("objective/scores", "objective/kl", "objective/rlhf_reward", "loss/policy", "loss/value", "policy/approx_kl", "policy/entropy" if "policy/entropy" in fused else "objective/entropy", "value/explained_variance"):
        assert fused[key] == pytest.approx(separate[key], rel=1e-4, abs=1e-6), key
    assert fused["policy/ratio_min"] == fused["policy/ratio_max"] == 1.0, "old log-probs are the update's own"
    weights = {run: load_file(tmp_path / run / "model.safetensors") for run in ("fused", "separate")}
    before = load_file(policy_dir / "model.safetensors")
    moved = 0.0
    for name, tensor in weights["fused"].items():
        torch.testing.assert_close(tensor, weights["separate"][name], rtol=1e-4, atol=1e-6)
        moved = max(moved, (tensor - before[name]).abs().max().item()) if name in before else moved
    assert moved > 1e-3, "the step changed the policy"


def test_a_shared_value_head_also_raises_the_planted_reward(policy_dir, planted_rm, prompts, tmp_path):
    cfg = config(prompts, value_model="shared", steps=30, batch_size=16, minibatch_size=8, microbatch_size=8, ppo_epochs=4, learning_rate=1e-2,
                 max_new_tokens=3, kl_coef=0.2)
    model = models.load_models(cfg, policy_dir, planted_rm).trained
    assert isinstance(model.value, values.SharedHead) and not model.value.own_models(), "no second model for the value"
    metrics = rlhf.train(cfg, policy_dir, planted_rm, tmp_path, seed=0)
    rows = history(tmp_path)
    first = sum(r["objective/scores"] for r in rows[:5]) / 5
    last = sum(r["objective/scores"] for r in rows[-5:]) / 5
    assert last > first + 2.0, (first, last)
    penalised = sum(r["objective/kl"] for r in rows[-5:]) / 5
    rlhf.train(dataclasses.replace(cfg, kl_coef=0.0), policy_dir, planted_rm, tmp_path / "no_penalty", seed=0)
    free = sum(r["objective/kl"] for r in history(tmp_path / "no_penalty")[-5:]) / 5
    assert penalised < 0.9 * free, ("the KL penalty held it nearer the reference", penalised, free)  # about 12 against 15.5 nats
    assert metrics["eval_after"]["score"] > metrics["eval_before"]["score"]
    value = AutoModelForSequenceClassification.from_pretrained(tmp_path / "value")
    policy = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(value.model.embed_tokens.weight, policy.model.embed_tokens.weight), "value/ is the policy's backbone under the head"


def test_a_value_on_the_top_layers_of_the_reward_model_learns_the_returns(policy_dir, planted_rm, prompts, tmp_path):
    """PPO updates on one fixed rollout, through the real update and optimiser: the value
    loss of the "reward" layout (adapter on the reward model's top layer, fed its recorded
    states) must fall well below where it started. Then a 2-step run writes folders that load."""
    from transformers import GenerationConfig

    cfg = config(prompts, method="lora", value_model="reward", value_layers=1, lora=LoraSettings(r=4, alpha=8), steps=2, ppo_epochs=1,
                 minibatch_size=8, microbatch_size=8, learning_rate=1e-2, vf_coef=1.0, clip_range_value=1e6)  # unclipped: the old values stay fixed here
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    loaded = models.load_models(cfg, policy_dir, planted_rm)
    model = loaded.trained
    accelerator = Accelerator(cpu=True)
    value_params = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("policy.")]  # the policy stays put
    wrapped, optimizer = accelerator.prepare(model, torch.optim.AdamW(value_params, lr=cfg.learning_rate))
    encoded = [chat.encode_prompt(tokenizer, p) for p in data.read_prompts(str(prompts), "prompts")[:8]]
    queries, query_mask = packing.pad_sequences(encoded, tokenizer.pad_token_id, "left", "cpu")
    generation = GenerationConfig(do_sample=True, temperature=1.0, max_new_tokens=6, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    layout = probes.layout_for(*loaded.forward_models())
    torch.manual_seed(0)
    batch = rollout.make_rollout(loaded, queries, query_mask, rollout.RolloutSettings(generation, 1.0, layout), Timer())
    assert batch.value_inputs is not None and batch.value_inputs.shape[:2] == (8, queries.shape[1] + batch.responses.shape[1])
    shaped, _ = rl_rewards.shaped_rewards(batch.ratings[:, 0], torch.zeros_like(batch.logprobs), 0.0, batch.response_mask)
    advantage, returns = advantages.gae(shaped, batch.values, batch.response_mask, 1.0, 0.95)
    learner = update.Learner(accelerator, wrapped, optimizer, cfg, layout)
    losses = [update.ppo_update(learner, batch, advantage, returns)["loss/value"] for _ in range(40)]
    assert losses[-1] < 0.2 * losses[0], losses[::5]

    rlhf.train(cfg, policy_dir, planted_rm, tmp_path, seed=0)
    value = AutoModelForSequenceClassification.from_pretrained(tmp_path / "value")
    rm = AutoModelForSequenceClassification.from_pretrained(planted_rm)
    assert torch.equal(value.model.embed_tokens.weight, rm.model.embed_tokens.weight), "value/ is the reward model's backbone"
    assert not torch.equal(value.model.layers[1].mlp.down_proj.weight, rm.model.layers[1].mlp.down_proj.weight), "with the value adapter merged in"
    assert torch.equal(value.model.layers[0].mlp.down_proj.weight, rm.model.layers[0].mlp.down_proj.weight), "and nothing below the top layer"
    AutoModelForCausalLM.from_pretrained(tmp_path)
