"""The critic-free estimators on tiny models: each raises a planted reward with bounded
KL and builds, trains and saves no value; a reward written as code trains with and
without a reward model beside it; audit sources never reach the gradient."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from stages import rlhf
from stages.rlhf_rewards import RewardSpec
from tests.conftest import history
from tests.conftest import ppo_config as config

CRITIC_FREE = ("grpo", "rloo", "reinforce_baseline", "dr_grpo")
FAST = {"steps": 40, "batch_size": 16, "minibatch_size": 8, "microbatch_size": 8, "ppo_epochs": 2, "samples_per_prompt": 4,
        "learning_rate": 1e-2, "max_new_tokens": 3, "kl_coef": 0.05}
PLANTED_FN = "tests.engine.planted_rewards:shouting"


def trend(rows: list[dict], key: str, n: int = 8) -> tuple[float, float]:
    """Mean of `key` over the first n and the last n steps: four prompts a step are noisy."""
    return sum(r[key] for r in rows[:n]) / n, sum(r[key] for r in rows[-n:]) / n


@pytest.mark.parametrize("advantage", CRITIC_FREE)
def test_each_estimator_raises_a_planted_reward_with_bounded_kl_and_no_value(policy_dir, planted_rm, prompts, tmp_path, advantage):
    metrics = rlhf.train(config(prompts, advantage=advantage, **FAST), policy_dir, planted_rm, tmp_path / "free", seed=0)
    rows = history(tmp_path / "free")
    first, last = trend(rows, "objective/scores")
    assert last > first + 2.0, (advantage, first, last)
    free_kl = trend(rows, "objective/kl")[1]
    assert free_kl > 1.0, "it moved away from the reference"
    assert not (tmp_path / "free" / "value").exists(), "no value model is saved"
    assert not any(key.startswith(("loss/value", "value/")) for key in rows[0]), "nor trained"
    AutoModelForCausalLM.from_pretrained(tmp_path / "free")
    assert metrics["advantage"] == advantage and metrics["samples_per_prompt"] == 4
    kl_in_loss = advantage != "rloo"  # the anchors' defaults: RLOO shapes k1 into the reward, the others add a KL loss term
    assert metrics["objective"]["kl_in_loss"] is kl_in_loss
    assert metrics["objective"]["kl_bias_correction"] is (advantage in ("grpo", "dr_grpo")), "TRL 1.16's default for its GRPO losses"
    assert ("loss/kl" in rows[0]) is kl_in_loss
    if kl_in_loss:
        assert all(r["objective/non_score_reward"] == 0 for r in rows), "no KL is shaped into the reward when it is a loss term"

    # The same run held by a strong KL coefficient stays near the reference, wherever the KL goes.
    rlhf.train(config(prompts, advantage=advantage, **{**FAST, "kl_coef": 1.0}), policy_dir, planted_rm, tmp_path / "held", seed=0)
    held_kl = trend(history(tmp_path / "held"), "objective/kl")[1]
    assert held_kl < 1.5 and held_kl < free_kl / 3, (advantage, held_kl, free_kl)


@pytest.mark.parametrize("with_rm", [False, True])
def test_a_reward_written_as_code_trains_with_and_without_a_reward_model(policy_dir, planted_rm, prompts, tmp_path, with_rm):
    # The planted RM has no held-out statistics; the function is standardised by its running ones.
    sources = (RewardSpec("rm", normalize=False), RewardSpec(PLANTED_FN)) if with_rm else (RewardSpec(PLANTED_FN),)
    cfg = config(prompts, advantage="grpo", rewards=sources, normalize_scores=True, **FAST)
    metrics = rlhf.train(cfg, policy_dir, planted_rm, tmp_path, seed=0)
    rows = history(tmp_path)
    first, last = trend(rows, "reward/shouting")
    assert last > first + 0.3, (first, last)
    planted = {"name": "shouting", "role": "train", "weight": 1.0, "normalisation": "running"}
    assert metrics["reward_sources"][-1] == planted
    if with_rm:
        assert metrics["reward_sources"][0]["name"] == "rm" and "reward/rm" in rows[0]
    else:
        assert len(metrics["reward_sources"]) == 1 and "reward/rm" not in rows[0]


def test_unrated_answers_are_counted_and_get_no_gradient(policy_dir, planted_rm, prompts, tmp_path):
    sources = (RewardSpec("tests.engine.planted_rewards:shouting_or_none"),)
    cfg = config(prompts, advantage="grpo", rewards=sources, **{**FAST, "steps": 3})
    rlhf.train(cfg, policy_dir, planted_rm, tmp_path, seed=0)
    for row in history(tmp_path):
        assert row["reward/shouting_or_none/unrated"] == 0.5 and row["objective/unrated"] == 0.5, row


def test_an_audit_source_never_reaches_the_gradient(policy_dir, planted_rm, prompts, tmp_path):
    steps = {**FAST, "steps": 4}
    rlhf.train(config(prompts, advantage="grpo", **steps), policy_dir, planted_rm, tmp_path / "rm", seed=0)
    audited = (RewardSpec("rm"), RewardSpec(PLANTED_FN, role="audit"))
    rlhf.train(config(prompts, advantage="grpo", rewards=audited, **steps), policy_dir, planted_rm, tmp_path / "audited", seed=0)
    assert all("reward/shouting" in row for row in history(tmp_path / "audited"))
    expected, actual = load_file(tmp_path / "rm" / "model.safetensors"), load_file(tmp_path / "audited" / "model.safetensors")
    assert all(torch.equal(expected[name], actual[name]) for name in expected), "the same weights, audited or not"


@pytest.mark.parametrize("method", ["full", "lora"])
def test_groups_packed_differently_give_every_token_the_same_log_probability(policy_dir, planted_rm, prompts, tmp_path, method):
    # The rollout scores two groups of four in one packed batch; the update sees one group
    # per microbatch. Shared prompts must not change a single log-probability.
    cfg = config(prompts, method=method, advantage="grpo", samples_per_prompt=4, steps=1, batch_size=8, ppo_epochs=1, minibatch_size=8, microbatch_size=4,
                 temperature=0.7, max_new_tokens=10)
    rlhf.train(cfg, policy_dir, planted_rm, tmp_path, seed=3)
    row = history(tmp_path)[0]
    assert row["policy/ratio_min"] == pytest.approx(1.0, abs=1e-5) and row["policy/ratio_max"] == pytest.approx(1.0, abs=1e-5)
    assert row["objective/kl"] == pytest.approx(0.0, abs=1e-5), "the policy starts as the reference"


def test_a_reward_function_failing_mid_run_names_the_prompt(policy_dir, planted_rm, prompts, tmp_path):
    from pipeline.errors import ConfigError, RewardFunctionError
    from stages.rlhf import check
    from tests.engine import planted_rewards

    planted_rewards.CALLS["n"] = 0
    cfg = config(prompts, advantage="grpo", rewards=(RewardSpec("tests.engine.planted_rewards:breaks_later"),), **{**FAST, "steps": 2})
    check(cfg)  # the probe passes: the bug is not there yet
    with pytest.raises(RewardFunctionError) as caught:
        rlhf.train(cfg, policy_dir, planted_rm, tmp_path, seed=0)
    message = str(caught.value)
    assert message.startswith("reward function tests.engine.planted_rewards:breaks_later raised ZeroDivisionError('division by zero') on ")
    assert "prompt '" in message and "\n" not in message, message
    assert isinstance(caught.value, ConfigError), "the CLI prints it as one line and exits 2"
    assert not (tmp_path / "model.safetensors").exists(), "no policy was saved"


@pytest.mark.parametrize("corrected", [True, False])
def test_the_update_takes_the_kl_gradient_the_objective_names(corrected):
    """microbatch_loss hands the old log-probs to the KL term exactly when the objective
    says so: the KL's gradient is then (log pi - log pi_ref) per token, else k3's own."""
    import math
    from types import SimpleNamespace

    from engine.update import Objective, microbatch_loss
    from rl.trajectory import Rollout

    logprobs = torch.tensor([[-1.0, -2.0]], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([[-1.5, -1.0]], dtype=torch.float64)
    mask = torch.ones(1, 2, dtype=torch.bool)
    mb = Rollout(queries=torch.zeros(1, 1, dtype=torch.long), query_mask=torch.ones(1, 1), responses=torch.zeros(1, 2, dtype=torch.long), response_mask=mask, ended=torch.ones(1, dtype=torch.bool), ref_logprobs=ref)
    mb.set_old(logprobs.detach(), None)
    objective = Objective(kl_in_loss=True, kl_estimator="k3", aggregation="sequence_mean", kl_bias_correction=corrected)
    learner = SimpleNamespace(settings=SimpleNamespace(max_new_tokens=2, clip_range=0.2), objective=objective)
    loss, stats = microbatch_loss(learner, mb, (logprobs, None, torch.zeros(1, 2), None), (torch.zeros(1, 2), None), kl_coef=0.5)
    (grad,) = torch.autograd.grad(loss, logprobs)
    # zero advantages: only the KL term moves; per token 0.5 * d/dlp / 2 tokens
    expected = [0.5 * (lp - r) / 2 for lp, r in ((-1.0, -1.5), (-2.0, -1.0))] if corrected else [0.5 * (1 - math.exp(r - lp)) / 2 for lp, r in ((-1.0, -1.5), (-2.0, -1.0))]
    torch.testing.assert_close(grad, torch.tensor([expected], dtype=torch.float64))
