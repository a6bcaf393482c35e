"""The PPO math against numbers worked out by hand (in the comments), plus a property
test of the GAE loop against a naive forward sum."""

from __future__ import annotations

import math
import random

import pytest
import torch

from rl import advantages, losses, masked
from rl import rewards as rl_rewards
from rl import tokens as rl_tokens

ATOL = 1e-6


def close(actual, expected, atol: float = ATOL) -> None:
    # python floats straight to float64: via float32 they would lose digits
    if isinstance(actual, torch.Tensor):
        actual = actual.detach().to(torch.float64)
    else:
        actual = torch.tensor(actual, dtype=torch.float64)
    expected = torch.as_tensor(expected, dtype=torch.float64)
    torch.testing.assert_close(actual, expected, atol=atol, rtol=0, equal_nan=True)


def t64(rows) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.float64)


# ----------------------------------------------------------------------------- masking


def test_masked_mean_ignores_masked_entries_even_inf():
    values = t64([[1.0, 2.0, math.inf], [4.0, math.nan, 6.0]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 1]])
    # all: (1 + 2 + 4 + 6) / 4 = 3.25
    close(masked.masked_mean(values, mask), 3.25)
    # rows: (1 + 2) / 2 = 1.5, (4 + 6) / 2 = 5
    close(masked.masked_mean(values, mask, dim=1), [1.5, 5.0])
    # columns: (1 + 4) / 2 = 2.5, 2 / 1 = 2, 6 / 1 = 6
    close(masked.masked_mean(values, mask, dim=0), [2.5, 2.0, 6.0])


def test_masked_var_bessel_and_edge_cases():
    values = t64([1.0, 2.0, 3.0, 1000.0])
    mask = torch.tensor([True, True, True, False])
    # mean 2, squared deviations 1 + 0 + 1 = 2: unbiased 2 / 2 = 1, biased 2 / 3
    close(masked.masked_var(values, mask), 1.0)
    close(masked.masked_var(values, mask, unbiased=False), 2.0 / 3.0)
    # one position: no Bessel correction (it would divide by 0), variance 0
    close(masked.masked_var(values, torch.tensor([False, True, False, False])), 0.0)
    with pytest.raises(ValueError):
        masked.masked_var(values, torch.zeros(4, dtype=torch.bool))


def test_masked_whiten_pools_all_rows_and_zeroes_masked():
    values = t64([[2.0, 4.0], [6.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # masked values 2, 4, 6: mean 4, unbiased var (4 + 0 + 4) / 2 = 4, std 2
    # -> (2-4)/2 = -1, 0, (6-4)/2 = 1; the masked 100 becomes 0
    close(masked.masked_whiten(values, mask), [[-1.0, 0.0], [1.0, 0.0]])


def test_masked_whiten_without_shift_keeps_the_mean():
    values = t64([[2.0, 4.0], [6.0, 100.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    # the whitened -1, 0, 1 plus the mean 4
    out = masked.masked_whiten(values, mask, shift_mean=False)
    close(out, [[3.0, 4.0], [5.0, 0.0]])
    close(masked.masked_mean(out, mask), 4.0)
    close(masked.masked_var(out, mask), 1.0)


def test_truncate_after_eos_pad_differs_from_eos():
    eos, pad = 2, 0
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [2, 9, 9, 9]])
    before = responses.clone()
    out, mask, ended = rl_tokens.truncate_after_eos(responses, eos, pad)
    # row 0: first EOS at 1, the later 7 and EOS are cut; row 1: no EOS, all kept;
    # row 2: EOS first, only it stays
    assert out.tolist() == [[5, 2, 0, 0], [5, 6, 7, 8], [2, 0, 0, 0]]
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, False, False, False]]
    assert ended.tolist() == [True, False, True]
    assert rl_tokens.sequence_lengths(mask).tolist() == [2, 4, 1]
    assert torch.equal(responses, before)


def test_truncate_after_eos_pad_equals_eos():
    eos = pad = 2
    responses = torch.tensor([[5, 2, 7, 2], [5, 6, 7, 8], [5, 6, 2, 2]])
    out, mask, ended = rl_tokens.truncate_after_eos(responses, eos, pad)
    # the first EOS is real even though it looks like padding; what follows is not
    assert out.tolist() == [[5, 2, 2, 2], [5, 6, 7, 8], [5, 6, 2, 2]]
    assert mask.tolist() == [[True, True, False, False], [True] * 4, [True, True, True, False]]
    assert ended.tolist() == [True, False, True]
    assert rl_tokens.sequence_lengths(mask).tolist() == [2, 4, 3]


# ------------------------------------------------------------------------ log-probs


def test_logprobs_hand_computed_with_temperature():
    logits = torch.tensor([[[0.0, math.log(3.0)], [0.0, math.log(3.0)]]])
    tokens = torch.tensor([[1, 0]])
    # T=1: softmax(0, ln 3) = (1/4, 3/4)
    close(rl_tokens.logprobs_from_logits(logits, tokens), [[math.log(0.75), math.log(0.25)]])
    # T=2: softmax(0, ln(3)/2) = (1, sqrt 3) / (1 + sqrt 3)
    s = math.sqrt(3.0)
    expected = [[math.log(s / (1 + s)), math.log(1 / (1 + s))]]
    close(rl_tokens.logprobs_from_logits(logits, tokens, temperature=2.0), expected)


def test_logprobs_match_manual_log_softmax_and_are_float32():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 3, 5, generator=gen)
    tokens = torch.randint(0, 5, (2, 3), generator=gen)
    manual = torch.log_softmax(logits / 0.7, dim=-1)
    expected = torch.stack([torch.stack([manual[b, t, tokens[b, t]] for t in range(3)]) for b in range(2)])
    out = rl_tokens.logprobs_from_logits(logits, tokens, temperature=0.7)
    assert out.shape == (2, 3)
    close(out, expected)
    assert rl_tokens.logprobs_from_logits(logits.to(torch.bfloat16), tokens).dtype == torch.float32


def test_entropy_uniform_is_log_vocab_and_two_token_case():
    close(rl_tokens.entropy_from_logits(torch.zeros(2, 3, 7)), torch.full((2, 3), math.log(7.0)))
    close(rl_tokens.entropy_from_logits(torch.full((1, 1, 7), 5.0), temperature=0.3), [[math.log(7.0)]])
    # probs (1/4, 3/4): -(0.25 ln 0.25 + 0.75 ln 0.75) = 0.5623351446...
    logits = torch.tensor([[[0.0, math.log(3.0)]]])
    close(rl_tokens.entropy_from_logits(logits), [[0.5623351446188083]])


# ------------------------------------------------------------------------- rewards


def test_per_token_kl_k1_zero_off_mask():
    logprobs = t64([[-1.0, -2.0, rl_tokens.INVALID_LOGPROB]])
    ref = t64([[-1.5, -1.0, -3.0]])
    # -1 - (-1.5) = 0.5, -2 - (-1) = -1, masked -> 0
    close(rl_rewards.per_token_kl(logprobs, ref, torch.tensor([[1, 1, 0]])), [[0.5, -1.0, 0.0]])


def test_penalize_missing_eos():
    scores = t64([1.0, 2.0, 3.0])
    ended = torch.tensor([True, False, True])
    close(rl_rewards.penalize_missing_eos(scores, ended, 1.5), [1.0, 0.5, 3.0])
    same = rl_rewards.penalize_missing_eos(scores, ended, 0.0)
    close(same, [1.0, 2.0, 3.0])
    assert same is not scores
    close(scores, [1.0, 2.0, 3.0])


def test_shaped_rewards_put_score_on_last_real_token():
    # pad == eos: row 0 is "5 EOS EOS" -> real tokens 5, EOS; row 1 has no EOS
    _, mask, _ = rl_tokens.truncate_after_eos(torch.tensor([[5, 2, 2], [5, 6, 7]]), 2, 2)
    scores = t64([10.0, 20.0])
    kl = t64([[0.1, 0.2, 0.3], [0.4, 0.5, 0.6]])
    rewards, non_score = rl_rewards.shaped_rewards(scores, kl, 0.5, mask)
    # -0.5 * kl on real tokens: [-0.05, -0.1, 0], [-0.2, -0.25, -0.3]
    close(non_score, [[-0.05, -0.1, 0.0], [-0.2, -0.25, -0.3]])
    # score at index length-1: row 0 at 1 (the EOS, not the pad after it), row 1 at 2
    close(rewards, [[-0.05, 9.9, 0.0], [-0.2, -0.25, 19.7]])


def test_shaped_rewards_empty_row_raises():
    mask = torch.tensor([[1, 0], [0, 0]])
    with pytest.raises(ValueError):
        rl_rewards.shaped_rewards(t64([1.0, 2.0]), torch.zeros(2, 2, dtype=torch.float64), 0.1, mask)


# ---------------------------------------------------------------------------- GAE


def test_gae_hand_computed_with_masked_tail():
    rewards = t64([[0.0, 0.0, 1.0], [0.0, 2.0, 7.0]])
    values = t64([[0.5, 0.2, 0.1], [0.5, 0.2, 9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = advantages.gae(rewards, values, mask, gamma=1.0, lam=0.95)
    # row 0: d2 = 1 - 0.1 = 0.9                 A2 = 0.9
    #        d1 = 0 + 0.1 - 0.2 = -0.1          A1 = -0.1 + 0.95 * 0.9 = 0.755
    #        d0 = 0 + 0.2 - 0.5 = -0.3          A0 = -0.3 + 0.95 * 0.755 = 0.41725
    # row 1: t=2 is masked, its reward 7 and value 9 must not leak in
    #        d1 = 2 + 0 - 0.2 = 1.8             A1 = 1.8
    #        d0 = 0 + 0.2 - 0.5 = -0.3          A0 = -0.3 + 0.95 * 1.8 = 1.41
    close(adv, [[0.41725, 0.755, 0.9], [1.41, 1.8, 0.0]])
    # returns = A + V on real tokens: 0.91725, 0.955, 1.0 | 1.91, 2.0, 0
    close(ret, [[0.91725, 0.955, 1.0], [1.91, 2.0, 0.0]])


def test_gae_hand_computed_discounted():
    rewards = t64([[1.0, 0.0, 2.0]])
    values = t64([[0.0, 1.0, 1.0]])
    adv, ret = advantages.gae(rewards, values, torch.ones(1, 3), gamma=0.5, lam=0.5)
    # d2 = 2 - 1 = 1                 A2 = 1
    # d1 = 0 + 0.5 * 1 - 1 = -0.5    A1 = -0.5 + 0.25 * 1 = -0.25
    # d0 = 1 + 0.5 * 1 - 0 = 1.5     A0 = 1.5 + 0.25 * -0.25 = 1.4375
    close(adv, [[1.4375, -0.25, 1.0]])
    close(ret, [[1.4375, 0.75, 2.0]])


def naive_gae(rewards: list[float], values: list[float], length: int, gamma: float, lam: float) -> list[float]:
    """Forward sum A_t = sum_l (gamma lam)^l delta_{t+l}, in python floats, one row."""

    def value(k: int) -> float:
        return values[k] if k < length else 0.0

    deltas = [rewards[k] + gamma * value(k + 1) - values[k] for k in range(length)]
    advs = [sum((gamma * lam) ** (k - t) * deltas[k] for k in range(t, length)) for t in range(length)]
    return advs + [0.0] * (len(rewards) - length)


def test_gae_loop_matches_naive_forward_sum():
    rng = random.Random(1234)
    for _ in range(20):
        batch, response_len = rng.randint(1, 4), rng.randint(1, 7)
        gamma, lam = rng.uniform(0.5, 1.0), rng.uniform(0.0, 1.0)
        lengths = [rng.randint(0, response_len) for _ in range(batch)]
        rewards = [[rng.gauss(0, 1) for _ in range(response_len)] for _ in range(batch)]
        # junk past the end, large enough to show if it leaks
        values = [[rng.gauss(0, 1) if t < n else 1e3 for t in range(response_len)] for n in lengths]
        mask = torch.tensor([[t < n for t in range(response_len)] for n in lengths])
        adv, ret = advantages.gae(t64(rewards), t64(values), mask, gamma, lam)
        expected = [naive_gae(rewards[b], values[b], lengths[b], gamma, lam) for b in range(batch)]
        close(adv, expected, atol=1e-9)
        expected_ret = [
            [a + v if t < n else 0.0 for t, (a, v) in enumerate(zip(ar, vr))]
            for ar, vr, n in zip(expected, values, lengths)
        ]
        close(ret, expected_ret, atol=1e-9)


def test_gae_carries_no_gradient():
    values = torch.tensor([[0.5, 0.2]], requires_grad=True)
    adv, ret = advantages.gae(torch.zeros(1, 2), values, torch.ones(1, 2), 1.0, 1.0)
    assert not adv.requires_grad and not ret.requires_grad


# --------------------------------------------------------------------------- losses


def policy_case():
    # four real tokens and one masked one with junk (exp(1000) = inf)
    ratios = [1.5, 0.5, 0.5, 1.0]
    old = t64([[-1.0, -1.0, -1.0, -1.0, -1.0]])
    logprobs = old.clone()
    logprobs[0, :4] += torch.log(t64(ratios))
    logprobs[0, 4] = 1000.0
    advantages = t64([[1.0, 1.0, -1.0, 2.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    return logprobs.requires_grad_(), old, advantages, mask


def test_policy_loss_clipped_hand_computed():
    logprobs, old, advantages, mask = policy_case()
    loss, stats = losses.policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    # token  ratio  A   -A*r   -A*clip(r)  max    clipped branch?
    #   0     1.5   1   -1.5   -1.2        -1.2   yes
    #   1     0.5   1   -0.5   -0.8        -0.5   no
    #   2     0.5  -1    0.5    0.8         0.8   yes
    #   3     1.0   2   -2.0   -2.0        -2.0   no (equal)
    # loss = (-1.2 - 0.5 + 0.8 - 2) / 4 = -0.725
    close(loss, -0.725)
    close(stats["clipfrac"], 0.5)
    # k2: 0.5 * (ln 1.5)^2 + 2 * 0.5 * (ln 0.5)^2 + 0 = 0.5626539640, / 4
    close(stats["approx_kl"], 0.1406634910)
    close(stats["ratio_mean"], (1.5 + 0.5 + 0.5 + 1.0) / 4)
    close(stats["ratio_max"], 1.5)
    close(stats["ratio_min"], 0.5)
    assert all(not torch.as_tensor(v).requires_grad for v in stats.values())


def test_policy_loss_gradient_finite_and_zero_where_clipped_or_masked():
    logprobs, old, advantages, mask = policy_case()
    loss, _ = losses.policy_loss(logprobs, old, advantages, mask, clip_range=0.2)
    loss.backward()
    # d(-A r)/d logp = -A r / 4 on unclipped tokens: token 1 -0.5/4, token 3 -2/4
    close(logprobs.grad, [[0.0, -0.125, 0.0, -0.5, 0.0]])


def test_value_loss_clipped_hand_computed():
    old = t64([[0.0, 0.0, 1.0, 0.0, 0.0]])
    values = t64([[1.0, 0.1, 0.5, 1.0, 50.0]])
    returns = t64([[1.0, 1.0, 0.0, -1.0, -50.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    loss, stats = losses.value_loss(values, old, returns, mask, clip_range=0.2)
    # token  old  v    ret  v_clip  (v-ret)^2  (v_clip-ret)^2  max   clipped larger?
    #   0    0    1.0   1    0.2     0          0.64            0.64  yes
    #   1    0    0.1   1    0.1     0.81       0.81            0.81  no (equal)
    #   2    1    0.5   0    0.8     0.25       0.64            0.64  yes
    #   3    0    1.0  -1    0.2     4          1.44            4     no
    # loss = 0.5 * (0.64 + 0.81 + 0.64 + 4) / 4 = 0.5 * 1.5225 = 0.76125
    close(loss, 0.76125)
    close(stats["vf_clipfrac"], 0.5)
    close(stats["value_mean"], (1.0 + 0.1 + 0.5 + 1.0) / 4)
    # ret - v = 0, 0.9, -0.5, -2: mean -0.4, sum sq dev 0.16 + 1.69 + 0.01 + 2.56 = 4.42
    # ret = 1, 1, 0, -1: mean 0.25, sum sq dev 0.5625 * 2 + 0.0625 + 1.5625 = 2.75
    # EV = 1 - 4.42 / 2.75 (the Bessel factors cancel) = -0.6072727...
    close(stats["explained_variance"], 1 - 4.42 / 2.75)


def test_value_loss_explained_variance_edge_cases():
    returns = t64([[1.0, 2.0, 3.0]])
    _, stats = losses.value_loss(returns.clone(), returns.clone(), returns, torch.ones(1, 3), 0.2)
    close(stats["explained_variance"], 1.0)
    flat = t64([[2.0, 2.0, 2.0]])
    _, stats = losses.value_loss(returns.clone(), returns.clone(), flat, torch.ones(1, 3), 0.2)
    assert math.isnan(float(stats["explained_variance"]))


# ----------------------------------------------------------------- KL controllers


@pytest.mark.parametrize(
    ("kl", "expected"),
    [
        (12.0, 0.2004),  # error 12/6 - 1 = 1, clipped to 0.2: 0.2 * (1 + 0.2 * 100/10000)
        (6.6, 0.2002),  # error 0.1: 0.2 * (1 + 0.1 * 0.01)
        (0.0, 0.1996),  # error -1, clipped to -0.2: 0.2 * (1 - 0.2 * 0.01)
        (6.0, 0.2),  # on target: unchanged
    ],
)
def test_adaptive_kl_update(kl, expected):
    ctl = rl_rewards.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    ctl.update(kl, n_steps=100)
    close(ctl.value, expected, atol=1e-12)


def test_fixed_kl_never_moves_and_state_dicts_round_trip():
    fixed = rl_rewards.FixedKLController(0.05)
    fixed.update(100.0, 1000)
    assert fixed.value == 0.05
    adaptive = rl_rewards.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    adaptive.update(12.0, 100)
    adaptive.update(12.0, 100)
    restored = rl_rewards.AdaptiveKLController(0.2, target=6.0, horizon=10000)
    restored.load_state_dict(adaptive.state_dict())
    close(restored.value, 0.2 * 1.002 * 1.002, atol=1e-12)
    other = rl_rewards.FixedKLController(1.0)
    other.load_state_dict(fixed.state_dict())
    assert other.value == 0.05


def test_scores_are_standardised_with_the_reward_models_statistics_then_clipped():
    scores = torch.tensor([3.0, -1.0, 11.0])
    # (3 - 1) / 2 = 1, (-1 - 1) / 2 = -1, (11 - 1) / 2 = 5 -> clipped to 4
    assert torch.equal(rl_rewards.normalize_scores(scores, (1.0, 2.0), 4.0), torch.tensor([1.0, -1.0, 4.0]))
    assert torch.equal(rl_rewards.normalize_scores(scores, None, None), scores)
