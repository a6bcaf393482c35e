"""The critic-free estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++-baseline), the KL
estimators and the loss aggregations against numbers worked out by hand (in the
comments)."""

from __future__ import annotations

import math

import pytest
import torch

from rl import advantages, kl, losses
from rl import rewards as rl_rewards
from rl.advantages import ESTIMATORS, AdvantageInputs
from rl.masked import masked_mean
from rl.tokens import INVALID_LOGPROB

ATOL = 1e-9
GROUP_ESTIMATORS = ("grpo", "dr_grpo", "rloo", "reinforce_baseline")


def close(actual, expected, atol: float = ATOL) -> None:
    actual = actual.detach().to(torch.float64) if isinstance(actual, torch.Tensor) else torch.tensor(actual, dtype=torch.float64)
    torch.testing.assert_close(actual, torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=0)


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


def on_tokens(per_row, lengths, width=4):
    """(batch, width) rows holding per_row[i] on the first lengths[i] tokens, 0 after."""
    return [[v if t < n else 0.0 for t in range(width)] for v, n in zip(per_row, lengths)]


def estimate(name, inputs):
    return ESTIMATORS[name].estimate(inputs, None)


# ----------------------------------------------------------------------------- two groups of K = 3

# Rows 0-2 answer prompt 0, rows 3-5 prompt 1. rewards = KL shaping on every real token
# plus the score on the last real one; 9.0 off the mask is junk that must not count.
LENGTHS = [2, 4, 1, 3, 1, 4]
SCORES = [3.0, 1.0, 2.0, 4.0, 0.0, 0.5]
REWARDS = [
    [-0.5, -0.5 + 3.0, 9.0, 9.0],  # R0 = 2.0
    [-0.25, -0.25, -0.25, -0.25 + 1.0],  # R1 = 0.0
    [-1.0 + 2.0, 9.0, 9.0, 9.0],  # R2 = 1.0
    [-0.5, 0.0, 4.0, 9.0],  # R3 = 3.5
    [-1.0 + 0.0, 9.0, 9.0, 9.0],  # R4 = -1.0
    [0.0, 0.0, 0.0, 0.5],  # R5 = 0.5
]
R = [2.0, 0.0, 1.0, 3.5, -1.0, 0.5]


def two_groups() -> AdvantageInputs:
    mask = torch.tensor(on_tokens([1] * 6, LENGTHS)).bool()
    return AdvantageInputs(t64(REWARDS), mask, scores=t64(SCORES), group_size=3)


def test_grpo_standardises_within_each_group_with_the_unbiased_std():
    adv, returns = estimate("grpo", two_groups())
    # group 0: R (2, 0, 1), mean 1, deviations (1, -1, 0), var = (1 + 1 + 0) / (3 - 1) = 1
    # group 1: R (3.5, -1, 0.5), mean 1, deviations (2.5, -2, -0.5), var = (6.25 + 4 + 0.25) / 2 = 5.25
    s0, s1 = 1.0 + 1e-4, math.sqrt(5.25) + 1e-4
    close(adv, on_tokens([1 / s0, -1 / s0, 0.0, 2.5 / s1, -2 / s1, -0.5 / s1], LENGTHS))
    close(returns, on_tokens(R, LENGTHS))


def test_dr_grpo_only_centres():
    adv, returns = estimate("dr_grpo", two_groups())
    close(adv, on_tokens([1.0, -1.0, 0.0, 2.5, -2.0, -0.5], LENGTHS))
    close(returns, on_tokens(R, LENGTHS))


def test_rloo_leaves_the_row_itself_out_of_its_baseline():
    adv, returns = estimate("rloo", two_groups())
    # group 0: 2 - (0 + 1)/2 = 1.5;  0 - (2 + 1)/2 = -1.5;  1 - (2 + 0)/2 = 0
    # group 1: 3.5 - (-1 + 0.5)/2 = 3.75;  -1 - (3.5 + 0.5)/2 = -3;  0.5 - (3.5 - 1)/2 = -0.75
    close(adv, on_tokens([1.5, -1.5, 0.0, 3.75, -3.0, -0.75], LENGTHS))
    close(returns, on_tokens(R, LENGTHS))


def test_reinforce_baseline_subtracts_the_group_mean_score_then_whitens_returns_to_go():
    adv, returns = estimate("reinforce_baseline", two_groups())
    # baselines: mean(3, 1, 2) = 2, mean(4, 0, 0.5) = 1.5, subtracted at the last real token:
    #   row 0 [-0.5, 0.5]               -> G [0, 0.5]
    #   row 1 [-0.25, -0.25, -0.25, -1.25] -> G [-2, -1.75, -1.5, -1.25]
    #   row 2 [-1]                      -> G [-1]
    #   row 3 [-0.5, 0, 2.5]            -> G [2, 2.5, 2.5]
    #   row 4 [-2.5]                    -> G [-2.5]
    #   row 5 [0, 0, 0, -1]             -> G [-1, -1, -1, -1]
    g = [[0.0, 0.5, 0, 0], [-2.0, -1.75, -1.5, -1.25], [-1.0, 0, 0, 0], [2.0, 2.5, 2.5, 0], [-2.5, 0, 0, 0], [-1.0, -1.0, -1.0, -1.0]]
    close(returns, g)
    # 15 real tokens: sum -6.5, sum of squares 38.875; var = (38.875 - 6.5^2 / 15) / 14
    mean, var = -6.5 / 15, (38.875 - 6.5**2 / 15) / 14
    mask = on_tokens([1] * 6, LENGTHS)
    expected = [[(x - mean) / math.sqrt(var + 1e-8) if m else 0.0 for x, m in zip(row, mrow)] for row, mrow in zip(g, mask)]
    close(adv, expected)


@pytest.mark.parametrize("name", GROUP_ESTIMATORS)
def test_group_estimators_carry_no_gradient(name):
    inputs = two_groups()
    inputs.rewards.requires_grad_()
    inputs.scores.requires_grad_()
    adv, returns = estimate(name, inputs)
    assert not adv.requires_grad and not returns.requires_grad


# ----------------------------------------------------------------------------- ties, K = 2, unrated rows


def test_a_tied_group_gets_zero_beside_one_that_is_not():
    # KL as a loss term: the rewards are the scores on the last token. Group 0 ties at 0.7
    # (not exact in binary: the std is ~1e-16, not 0); group 1 scores (2, -1, 2), lengths
    # (1, 2, 3), chosen so its returns-to-go sum to 0 over the batch: 1*1 + 2*(-2) + 3*1 = 0,
    # so whitening does not shift group 0 either.
    lengths, scores = [2, 3, 1, 1, 2, 3], [0.7, 0.7, 0.7, 2.0, -1.0, 2.0]
    mask = torch.tensor(on_tokens([1] * 6, lengths)).bool()
    rewards = t64([[s if t == n - 1 else 0.0 for t in range(4)] for s, n in zip(scores, lengths)])
    inputs = AdvantageInputs(rewards, mask, scores=t64(scores), group_size=3)
    # group 1: mean 1, deviations (1, -2, 1), var = (1 + 4 + 1) / 2 = 3
    expected = {
        "grpo": [0.0, 0.0, 0.0, 1 / (math.sqrt(3) + 1e-4), -2 / (math.sqrt(3) + 1e-4), 1 / (math.sqrt(3) + 1e-4)],
        "dr_grpo": [0.0, 0.0, 0.0, 1.0, -2.0, 1.0],
        "rloo": [0.0, 0.0, 0.0, 2 - 0.5, -1 - 2.0, 2 - 0.5],
        # 12 real tokens: mean 0, sum of squares 1 + 2*4 + 3*1 = 12, var 12/11
        "reinforce_baseline": [0.0, 0.0, 0.0, 1 / math.sqrt(12 / 11 + 1e-8), -2 / math.sqrt(12 / 11 + 1e-8), 1 / math.sqrt(12 / 11 + 1e-8)],
    }
    for name, rows in expected.items():
        adv, _ = estimate(name, inputs)
        assert torch.isfinite(adv).all(), name
        close(adv, on_tokens(rows, lengths), atol=1e-9)


def test_k_equal_two():
    # R = (1.5, -0.5): deviations +-1, unbiased std = sqrt(2 * 1 / 1) = sqrt(2)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]]).bool()
    inputs = AdvantageInputs(t64([[0.5, 0.0, 1.0], [-0.5, 0.0, 0.0]]), mask, group_size=2)
    grpo, _ = estimate("grpo", inputs)
    close(grpo, [[1 / (math.sqrt(2) + 1e-4)] * 3, [-1 / (math.sqrt(2) + 1e-4), 0.0, 0.0]])
    rloo, _ = estimate("rloo", inputs)
    close(rloo, [[2.0] * 3, [-2.0, 0.0, 0.0]])  # +-(R1 - R2)
    dr_grpo, _ = estimate("dr_grpo", inputs)
    close(dr_grpo, [[1.0] * 3, [-1.0, 0.0, 0.0]])


def unrated_case(junk: float) -> AdvantageInputs:
    # group 0: rows 0 and 2 rated with R 1 and 3, row 1 not (its reward is junk);
    # group 1: only row 3 rated, so no baseline. Every row has 2 tokens, the score on the last.
    scores = [1.0, 0.0, 3.0, 5.0, 0.0, 0.0]
    rewards = t64([[0.0, s] for s in scores])
    rewards[1, 1] = junk
    rated = torch.tensor([True, False, True, True, False, False])
    return AdvantageInputs(rewards, torch.ones(6, 2, dtype=torch.bool), scores=t64(scores), rated=rated, group_size=3)


@pytest.mark.parametrize("junk", [100.0, math.nan])
def test_unrated_rows_are_left_out_and_zeroed(junk):
    inputs = unrated_case(junk)
    # group 0 over rated rows only: mean 2, deviations (-1, +1), std sqrt(2)
    expected = {
        "grpo": [-1 / (math.sqrt(2) + 1e-4), 0.0, 1 / (math.sqrt(2) + 1e-4), 0.0, 0.0, 0.0],
        "dr_grpo": [-1.0, 0.0, 1.0, 0.0, 0.0, 0.0],
        "rloo": [1.0 - 3.0, 0.0, 3.0 - 1.0, 0.0, 0.0, 0.0],
        # whitened over rows 0 and 2 alone: tokens (-1, -1, 1, 1), mean 0, var 4/3
        "reinforce_baseline": [-1 / math.sqrt(4 / 3 + 1e-8), 0.0, 1 / math.sqrt(4 / 3 + 1e-8), 0.0, 0.0, 0.0],
    }
    for name, rows in expected.items():
        adv, _ = estimate(name, inputs)
        close(adv, [[v, v] for v in rows])


def test_reinforce_baseline_with_no_group_left_gives_zero():
    inputs = unrated_case(0.0)
    inputs.rated = torch.tensor([True, False, False, True, False, False])
    adv, returns = estimate("reinforce_baseline", inputs)
    close(adv, torch.zeros(6, 2))
    close(returns[3], [5.0, 5.0])  # no baseline: the raw returns-to-go


@pytest.mark.parametrize("name", GROUP_ESTIMATORS)
@pytest.mark.parametrize("batch, k", [(5, 2), (4, 1), (6, 4)])
def test_group_estimators_refuse_bad_group_sizes(name, batch, k):
    inputs = AdvantageInputs(torch.zeros(batch, 2), torch.ones(batch, 2, dtype=torch.bool), scores=torch.zeros(batch), group_size=k)
    with pytest.raises(ValueError, match="group_size"):
        estimate(name, inputs)


def test_reinforce_baseline_needs_scores():
    with pytest.raises(ValueError, match="scores"):
        estimate("reinforce_baseline", AdvantageInputs(torch.zeros(2, 2), torch.ones(2, 2, dtype=torch.bool), group_size=2))


# ----------------------------------------------------------------------------- KL estimators

# d = log pi - log pi_ref = (0.5, -1) on the real tokens; the third token is off the mask.
LOGPROBS, REF = [[-1.0, -2.0, 0.0]], [[-1.5, -1.0, -3.0]]
MASK = torch.tensor([[1, 1, 0]]).bool()


def test_k1_k2_k3_hand_computed():
    lp, ref = t64(LOGPROBS), t64(REF)
    close(kl.per_token_kl(lp, ref, MASK, "k1"), [[0.5, -1.0, 0.0]])
    close(kl.per_token_kl(lp, ref, MASK, "k2"), [[0.125, 0.5, 0.0]])  # 0.5 * d^2
    # r = -d: exp(-0.5) - 1 + 0.5 = 0.10653065971263342; exp(1) - 1 - 1 = 0.7182818284590451
    close(kl.per_token_kl(lp, ref, MASK, "k3"), [[0.10653065971263342, 0.7182818284590451, 0.0]])
    close(rl_rewards.per_token_kl(lp, ref, MASK), [[0.5, -1.0, 0.0]])


def test_k3_and_k2_are_never_negative():
    d = torch.linspace(-20, 20, 401, dtype=torch.float64)[None]
    mask = torch.ones_like(d, dtype=torch.bool)
    assert (kl.per_token_kl(d, torch.zeros_like(d), mask, "k3") >= 0).all()
    assert (kl.per_token_kl(d, torch.zeros_like(d), mask, "k2") >= 0).all()


@pytest.mark.parametrize("junk", [1e4, -1e4, INVALID_LOGPROB])
@pytest.mark.parametrize("kind", ["k1", "k2", "k3"])
def test_junk_off_the_mask_stays_finite_in_values_and_gradients(kind, junk):
    lp = t64(LOGPROBS)
    lp[0, 2] = junk
    lp.requires_grad_()
    out = kl.per_token_kl(lp, t64(REF), MASK, kind)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(lp.grad).all()
    # d/dlogp: k1 1; k2 d; k3 1 - exp(-d)
    grads = {"k1": [1.0, 1.0], "k2": [0.5, -1.0], "k3": [1 - math.exp(-0.5), 1 - math.e]}
    close(lp.grad, [grads[kind] + [0.0]])


def test_unknown_kl_estimator_is_refused():
    with pytest.raises(ValueError, match="k4"):
        kl.per_token_kl(t64(LOGPROBS), t64(REF), MASK, "k4")


# ----------------------------------------------------------------------------- aggregation and losses

VALUES = [[1.0, 2.0, 3.0, math.inf], [10.0, math.nan, math.inf, -math.inf]]
AGG_MASK = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]]).bool()


def test_aggregations_hand_computed():
    values = t64(VALUES)
    close(losses.aggregator("token_mean", 4)(values, AGG_MASK), (1 + 2 + 3 + 10) / 4)
    close(losses.aggregator("sequence_mean", 4)(values, AGG_MASK), ((1 + 2 + 3) / 3 + 10 / 1) / 2)
    close(losses.aggregator("constant", 4)(values, AGG_MASK), 16 / (2 * 4))
    close(losses.aggregator("constant", 8)(values, AGG_MASK), 16 / (2 * 8))  # rows * max_len, not the batch's width
    close(losses.aggregator("sequence_sum", 4)(values, AGG_MASK), ((1 + 2 + 3) + 10) / 2)


def test_aggregator_refuses_unknown_names_and_short_max_len():
    with pytest.raises(ValueError, match="median"):
        losses.aggregator("median", 4)
    with pytest.raises(ValueError, match="max_len"):
        losses.aggregator("constant", 3)(t64(VALUES), AGG_MASK)


def policy_case():
    old = t64([[-1.0, -1.0, -1.0, -1.0, -1.0]])
    logprobs = old.clone()
    logprobs[0, :4] += torch.log(t64([1.5, 0.5, 0.5, 1.0]))
    logprobs[0, 4] = 1000.0
    return logprobs, old, t64([[1.0, 1.0, -1.0, 2.0, 100.0]]), torch.tensor([[1, 1, 1, 1, 0]])


def test_policy_loss_without_aggregate_is_the_old_token_mean_exactly():
    logprobs, old, adv, mask = policy_case()
    loss, _ = losses.policy_loss(logprobs, old, adv, mask, 0.2)
    ratio = torch.exp(torch.where(mask.bool(), logprobs - old, torch.zeros_like(old)))
    old_loss = masked_mean(torch.max(-adv * ratio, -adv * torch.clamp(ratio, 0.8, 1.2)), mask)
    assert torch.equal(loss, old_loss)


def test_policy_loss_with_constant_aggregation():
    logprobs, old, adv, mask = policy_case()
    loss, stats = losses.policy_loss(logprobs, old, adv, mask, 0.2, aggregate=losses.aggregator("constant", 5))
    # per-token terms (-1.2, -0.5, 0.8, -2) as in test_ppo_math; sum -2.9 over 1 row * 5
    close(loss, -2.9 / 5)
    close(stats["clipfrac"], 0.5)  # stats stay token means


def test_kl_loss_aggregates_and_reports_the_token_mean():
    lp = t64([[-1.0, -2.0, 0.0], [-1.0, 7.0, 7.0]]).requires_grad_()
    ref = t64([[-1.5, -1.0, -3.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    loss, stats = losses.kl_loss(lp, ref, mask, "k2", losses.aggregator("sequence_mean", 3))
    # k2 per token: row 0 (0.125, 0.5), row 1 (0); sequence mean ((0.625 / 2) + 0) / 2
    close(loss, 0.3125 / 2)
    close(stats["kl"], 0.625 / 3)
    assert loss.requires_grad and not stats["kl"].requires_grad



def kl_case():
    lp = t64([[-1.0, -2.0, 7.0], [-1.0, 7.0, 7.0]]).requires_grad_()  # 7.0: junk off the mask
    ref = t64([[-1.5, -1.0, -3.0], [-1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]]).bool()
    return lp, ref, mask


def test_bias_corrected_kl_keeps_the_value_and_takes_the_reverse_kl_gradient():
    lp, ref, mask = kl_case()
    old = torch.where(mask, lp.detach(), torch.full_like(ref, INVALID_LOGPROB))  # on-policy, junk off the mask
    aggregate = losses.aggregator("sequence_mean", 3)
    corrected, _ = losses.kl_loss(lp, ref, mask, "k3", aggregate, old_logprobs=old)
    plain, _ = losses.kl_loss(lp, ref, mask, "k3", aggregate)
    # k3 per token, r = ref - lp: row 0 r = (-0.5, 1.0): (e^-0.5 - 0.5, e - 2), row 1 r = 0: 0
    close(corrected, ((math.exp(-0.5) - 0.5 + math.e - 2) / 2 + 0) / 2)
    close(corrected, plain)  # the ratio is 1 on-policy
    (grad,) = torch.autograd.grad(corrected, lp)
    # (lp - ref) per token times the sequence mean's weight 1/(2 tokens)/(2 rows): 0.5/4, -1/4; row 1: 0
    close(grad, [[0.125, -0.25, 0.0], [0.0, 0.0, 0.0]])
    (plain_grad,) = torch.autograd.grad(plain, lp)
    # k3's own gradient (1 - e^r) / 4: what the correction replaces
    close(plain_grad, [[(1 - math.exp(-0.5)) / 4, (1 - math.e) / 4, 0.0], [0.0, 0.0, 0.0]])


def test_bias_corrected_kl_off_policy_is_weighted_by_the_ratio():
    lp, ref, mask = kl_case()
    old = lp.detach() - 0.1  # the policy has moved since sampling: ratio e^0.1 on every token
    aggregate = losses.aggregator("token_mean", 3)
    corrected, stats = losses.kl_loss(lp, ref, mask, "k3", aggregate, old_logprobs=old)
    plain, plain_stats = losses.kl_loss(lp, ref, mask, "k3", aggregate)
    close(corrected, math.exp(0.1) * plain)
    close(stats["kl"], plain_stats["kl"])  # the reported KL is the estimate itself

# ----------------------------------------------------------------------------- the table

DEFAULTS = {
    "gae": (True, False, "reward", "k1", "token_mean", False),
    "grpo": (False, True, "loss", "k3", "sequence_mean", True),
    "dr_grpo": (False, True, "loss", "k3", "constant", True),
    "rloo": (False, True, "reward", "k1", "sequence_sum", False),
    "reinforce_baseline": (False, True, "loss", "k2", "token_mean", False),
}


@pytest.mark.parametrize("name", list(ESTIMATORS))
def test_every_estimator_names_known_defaults(name):
    e = ESTIMATORS[name]
    assert e.kl_penalty in ("reward", "loss")
    assert e.kl_estimator in kl.KL_ESTIMATORS
    assert e.aggregation in losses.AGGREGATIONS
    assert (e.needs_values, e.needs_groups, e.kl_penalty, e.kl_estimator, e.aggregation, e.kl_bias_correction) == DEFAULTS[name]


def test_gae_entry_is_unchanged():
    assert ESTIMATORS["gae"].estimate is advantages.whitened_gae
