"""The RLHF stage on tiny models: PPO raises a planted reward with bounded KL,
rollout and update agree on every log-probability, LoRA's reference is the SFT
model, bad inputs stop before training, and a killed run resumes exactly."""

from __future__ import annotations

import dataclasses
import json
import signal

import pytest
import torch
from accelerate import Accelerator
from safetensors.torch import load_file
from transformers import (
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForSequenceClassification,
)

from engine import chat, driver, forward, models, output, packing, probes, rollout, sampling, update, values
from engine.metrics import Timer
from engine.policy import AdapterOffReference
from pipeline import checkpoint as ckpt
from pipeline import cli
from pipeline.errors import ConfigError, TrainingDiverged
from rl import advantages, trajectory
from rl import rewards as rl_rewards
from stages import base, rlhf
from stages.shared import data
from stages.shared.settings import LoraSettings
from tests.conftest import load_config, make_tokenizer, tiny_config, write_jsonl
from tests.pipeline.test_resume import start, wait_for_checkpoint

PLANTED = "Cheers"


@pytest.fixture(scope="module")
def policy_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model after the base stage, standing in for an SFT checkpoint."""
    out = tmp_path_factory.mktemp("policy")
    base.run(base.BaseConfig(model=str(tiny_model_dir)), {}, out, seed=0)
    return out


@pytest.fixture(scope="module")
def planted_rm(policy_dir, tmp_path_factory):
    """A reward model that scores a response by its last token's embedding along the
    planted token's: its two layers add nothing to the residual stream (zero output
    projections), so the score is a fixed function of that token, highest for the
    planted one. The layers are there for a value adapter to sit on."""
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    planted = tokenizer(PLANTED, add_special_tokens=False)["input_ids"][0]
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, num_labels=1, pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None)
    torch.manual_seed(1)
    model = LlamaForSequenceClassification(config)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        direction = model.model.embed_tokens.weight[planted]
        model.score.weight.copy_(4 * direction / direction.norm())
    folder = tmp_path_factory.mktemp("planted_rm")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def prompts(sft_rows, tmp_path_factory):
    return write_jsonl(tmp_path_factory.mktemp("prompts") / "prompts.jsonl", [{"prompt": r["prompt"]} for r in sft_rows[:72]])


def config(prompts, **settings) -> rlhf.RlhfConfig:
    values = {
        "data": rlhf.RlhfData(prompts=str(prompts), eval_fraction=0.125),
        "steps": 4, "batch_size": 8, "minibatch_size": 4, "microbatch_size": 2, "ppo_epochs": 2,
        "learning_rate": 3e-3, "max_new_tokens": 6, "temperature": 1.0, "normalize_scores": False,
        "missing_eos_penalty": 0.0, "save_steps": 2, "sample_steps": 1, "eval_batch_size": 16, "num_samples": 2,
    }
    return rlhf.RlhfConfig(**{**values, **settings})


def history(folder):
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


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
                "policy/clipfrac", "policy/ratio_mean", "value/clipfrac", "response/length", "response/eos_fraction", "lr", "tokens_per_second",
                "time/generation", "time/scoring", "time/update"):
        assert key in rows[0], key
    assert rows[-1]["lr"] < rows[0]["lr"], "the learning rate anneals"

    AutoModelForCausalLM.from_pretrained(tmp_path)  # plain folders
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "value")
    assert (tmp_path / "samples.md").read_text().count("**PPO**") == 2


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


def test_lora_keeps_one_backbone_whose_reference_is_the_sft_model(policy_dir, planted_rm, prompts, tmp_path):
    cfg = config(prompts, method="lora", lora=LoraSettings(r=2, alpha=4), steps=2, learning_rate=1e-2)
    loaded = models.load_models(cfg, policy_dir, planted_rm)
    model = loaded.trained
    assert isinstance(loaded.reference, AdapterOffReference), "no second copy of the weights"
    sft = AutoModelForCausalLM.from_pretrained(policy_dir).eval()
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    packed = packing.pack(ids[:, :2], torch.ones(1, 2), ids[:, 2:], torch.ones(1, 3, dtype=torch.bool))
    with torch.no_grad():
        expected = torch.log_softmax(sft(ids).logits[0, 1:-1], -1).gather(-1, ids[0, 2:, None]).squeeze(-1)
        assert torch.equal(loaded.reference.logprobs(packed, 1.0), expected), "adapters disabled is exactly the SFT model"
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert all("lora_" in n or n.startswith("value.head.") for n in trainable) and frozen
    assert any(".policy." in n for n in trainable) and any(".value." in n for n in trainable), trainable

    metrics = rlhf.train(cfg, policy_dir, planted_rm, tmp_path, seed=0)
    assert metrics["trainable_parameters"] < sum(p.numel() for p in sft.parameters()) / 2
    trained = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert not torch.allclose(trained(ids).logits, sft(ids).logits, atol=1e-5), "the merged policy carries the update"
    AutoModelForSequenceClassification.from_pretrained(tmp_path / "value")


def _perturb_adapters(model, seed: int = 0) -> None:
    """LoRA's B starts at zero (adapters are no-ops); give every adapter a real effect."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def test_sampling_with_the_lora_policy_folded_in_samples_the_policy_and_leaves_the_sft_weights_untouched(policy_dir, planted_rm, prompts):
    cfg = config(prompts, method="lora", lora=LoraSettings(r=2, alpha=4))
    model = models.load_models(cfg, policy_dir, planted_rm).trained
    _perturb_adapters(model)
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
    _perturb_adapters(model)
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


def test_a_reward_model_with_another_tokenizer_is_refused(policy_dir, prompts, tmp_path):
    other = tmp_path / "other_rm"
    tokenizer = make_tokenizer(pad="<|endoftext|>")
    tokenizer.add_tokens(["<|extra|>"])
    config_ = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2, num_labels=1, pad_token_id=0)
    LlamaForSequenceClassification(config_).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(ConfigError, match="tokenizer differs from the policy's"):
        rlhf.train(config(prompts), policy_dir, other, tmp_path / "out", seed=0)


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
    ("value_layers: 0", "rlhf.value_layers: must be at least 1 (or null for every layer), got 0"),
    ("value_model: reward", "rlhf.value_model: reward needs method: lora"),
])
def test_inconsistent_settings_are_refused_with_their_line(tmp_path, settings, message):
    path = tmp_path / "run.yaml"
    path.write_text(f"run:\n  name: x\nrlhf:\n  batch_size: 8\n  minibatch_size: 8\n  {settings}\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    assert message in str(error.value) and str(error.value).startswith(f"{path}:")


LAYOUTS = {
    "full": {"method": "full"},
    # the default config's layout: the value adapter on the reward model's top layers
    "lora-reward": {"method": "lora", "value_model": "reward", "value_layers": 1, "lora": {"r": 4, "alpha": 8}},
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
    process = start(killed, "rlhf")
    wait_for_checkpoint(process, ckpt.partial_dir(run, "rlhf"), at_least=6)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=60)
    assert not (run / "rlhf").exists()
    saved = torch.load(ckpt.latest_checkpoint(ckpt.partial_dir(run, "rlhf")) / "pytorch_model.bin", weights_only=True)
    if layout == "lora-reward":  # the frozen SFT weights and reward model are inputs, not state
        assert saved and all("lora_" in name or name.startswith("value.head.") for name in saved), sorted(saved)[:5]

    process = start(killed, "rlhf")
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    assert "rlhf: resuming the interrupted run from step" in output
    manifest = json.loads((run / "rlhf" / "manifest.json").read_text())
    assert 0 < manifest["metrics"]["steps_last_attempt"] < 12
    assert [r["step"] for r in history(run / "rlhf")] == list(range(1, 13)), "one metrics line per step, none repeated"
    for weights in ("model.safetensors", "value/model.safetensors"):
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


@pytest.mark.parametrize("layout", LAYOUTS)
def test_ppo_on_two_processes_writes_one_policy(tiny_model_dir, planted_rm, sft_rows, prompts, tmp_path, layout):
    import os
    import subprocess
    import sys
    from pathlib import Path

    from tests.conftest import ROOT

    train = write_jsonl(tmp_path / "sft.jsonl", sft_rows[:24])
    section = {"reward_model": str(planted_rm), "data": {"prompts": str(prompts)}, "steps": 3, "batch_size": 4, "minibatch_size": 2,
               "microbatch_size": 1, "ppo_epochs": 1, "max_new_tokens": 5, "normalize_scores": False, "save_steps": 2, **LAYOUTS[layout]}
    config_path = tiny_config(tmp_path, tiny_model_dir, train, sft={"max_steps": 2}, rlhf=section)
    torchrun = Path(sys.executable).parent / "torchrun"
    result = subprocess.run(
        [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "pipeline", "run", "rlhf", "--config", str(config_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=400, env={**os.environ, "OMP_NUM_THREADS": "1"}, check=False,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    folder = tmp_path / "runs" / "tiny" / "rlhf"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["world_size"] == 2
    assert manifest["metrics"]["episodes"] == 3 * 4 * 2, "each step rolls out batch_size prompts on each process"
    assert [r["episode"] for r in history(folder)] == [8, 16, 24]
    AutoModelForCausalLM.from_pretrained(folder)
    AutoModelForSequenceClassification.from_pretrained(folder / "value")


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


def test_a_value_on_the_reward_model_runs_its_top_layers_from_the_scoring_pass_and_leaves_the_scores_alone(policy_dir, planted_rm, prompts, tmp_path):
    cfg = config(prompts, method="lora", value_model="reward", lora=LoraSettings(r=2, alpha=4), value_layers=1)
    tokenizer = AutoTokenizer.from_pretrained(policy_dir)
    loaded = models.load_models(cfg, policy_dir, planted_rm)
    model, reward_model = loaded.trained, loaded.reward_model
    assert isinstance(loaded.reference, AdapterOffReference) and model.value.reward_model is reward_model and model.value.top == 1
    _perturb_adapters(model)
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
    shaped, _ = rl_rewards.shaped_rewards(batch.scores, torch.zeros_like(batch.logprobs), 0.0, batch.response_mask)
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
