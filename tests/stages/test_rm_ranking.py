"""The reward model's grouped loss and metrics against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch

from stages import rm_ranking as ranking


def softplus(x: float) -> float:
    return math.log1p(math.exp(x))  # -log sigmoid(d) = softplus(-d)


# Two prompts in one batch: a K=3 ranking scored [2, 1, 0] and a pair scored the wrong way round.
REWARDS = torch.tensor([2.0, 1.0, 0.0, 0.0, 1.0])
BETTER = torch.tensor([0, 0, 1, 3])
WORSE = torch.tensor([1, 2, 2, 4])
GROUP = torch.tensor([0, 0, 0, 1])


def test_loss_averages_each_prompts_pairs_then_the_prompts():
    k3 = (softplus(-1) + softplus(-2) + softplus(-1)) / 3
    pair = softplus(1)
    expected = (k3 + pair) / 2
    loss = ranking.ranking_loss(REWARDS, BETTER, WORSE, GROUP)
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    flat = (2 * softplus(-1) + softplus(-2) + softplus(1)) / 4
    assert abs(loss.item() - flat) > 0.1, "pairs treated as independent examples would weigh the K=3 prompt 3x"


def test_margin_and_centering_terms():
    margins = torch.tensor([0.0, 0.0, 0.0, 0.5])
    loss = ranking.ranking_loss(REWARDS, BETTER, WORSE, GROUP, margins, center_coef=0.01)
    k3 = (softplus(-1) + softplus(-2) + softplus(-1)) / 3
    mean_square = (4 + 1 + 0 + 0 + 1) / 5
    assert loss.item() == pytest.approx((k3 + softplus(1.5)) / 2 + 0.01 * mean_square, abs=1e-6)


def test_loss_gradient_pushes_better_up_and_worse_down():
    rewards = REWARDS.clone().requires_grad_(True)
    ranking.ranking_loss(rewards, BETTER, WORSE, GROUP).backward()
    assert rewards.grad[3] < 0 < rewards.grad[4], "the mis-ranked pair is pulled apart"
    assert rewards.grad[0] < 0 < rewards.grad[2]


def test_bf16_rewards_under_autocast_give_the_fp32_loss_and_a_gradient():
    # A GPU's precision "auto" (or precision: bf16 anywhere) scores in bf16 under autocast,
    # where logsigmoid returns fp32: the per-prompt sums once mixed the two and raised.
    rewards = REWARDS.to(torch.bfloat16).requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = ranking.ranking_loss(rewards, BETTER, WORSE, GROUP)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(ranking.ranking_loss(REWARDS, BETTER, WORSE, GROUP).item(), abs=1e-6)
    loss.backward()
    assert rewards.grad.dtype == torch.bfloat16 and rewards.grad[3] < 0 < rewards.grad[4]


def test_pairwise_stats_count_ties_as_wrong():
    stats = ranking.pairwise_stats(torch.tensor([1.0, 1.0, 0.0]), torch.tensor([0, 0]), torch.tensor([1, 2]))
    assert stats == {"accuracy": 0.5, "margin": 0.5}


def test_ranking_metrics_by_k_and_reward_distribution():
    rewards = [[2.0, 1.0, 0.0], [0.0, 1.0], [3.0, -1.0]]
    pairs = [[(0, 1), (0, 2), (1, 2)], [(0, 1)], [(0, 1)]]
    m = ranking.ranking_metrics(rewards, pairs)
    assert m["accuracy"] == pytest.approx(4 / 5)
    assert m["margin"] == pytest.approx((1 + 2 + 1 - 1 + 4) / 5)
    assert m["accuracy_by_k"] == {"2": 0.5, "3": 1.0}
    flat = [2, 1, 0, 0, 1, 3, -1]
    mean = sum(flat) / 7
    assert m["reward_mean"] == pytest.approx(mean)
    assert m["reward_std"] == pytest.approx(math.sqrt(sum((x - mean) ** 2 for x in flat) / 7))
    assert (m["pairs"], m["prompts"]) == (5, 3)


def test_accuracy_by_criterion_counts_each_pair_under_its_label():
    rewards = [[2.0, 1.0, 0.0], [0.0, 1.0], [3.0, -1.0]]
    pairs = [[(0, 1), (0, 2), (1, 2)], [(0, 1)], [(0, 1)]]
    kinds = [["correct", "several", "warm_opening"], ["correct"], ["warm_opening"]]
    m = ranking.ranking_metrics(rewards, pairs, kinds)
    assert m["accuracy_by_criterion"] == {
        "correct": {"accuracy": 0.5, "pairs": 2},  # right in the first ranking, wrong in the second
        "several": {"accuracy": 1.0, "pairs": 1},
        "warm_opening": {"accuracy": 1.0, "pairs": 2},
    }
    assert "accuracy_by_criterion" not in ranking.ranking_metrics(rewards, pairs)


def test_a_pair_is_labelled_by_the_one_criterion_its_completions_differ_in():
    from stages.rm import pair_kind

    right = {"correct": True, "warm_opening": True, "warm_closing": False, "extra_words": 0}
    assert pair_kind(right, {**right, "correct": False}) == "correct"
    assert pair_kind(right, {**right, "extra_words": 3}) == "extra_words"
    assert pair_kind(right, {**right, "correct": False, "warm_opening": False}) == "several"
    assert pair_kind(right, dict(right)) == "none"
    assert pair_kind(right, None) == "unrated" and pair_kind(None, right) == "unrated"
