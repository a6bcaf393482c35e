"""The demo's verifiable rewards (`demo.rewards`) on real demo prompts: right and
wrong answers written by hand, None for other prompts, and both functions passing
the rlhf stage's probe."""

from __future__ import annotations

import json

import pytest

from demo import judge, rewards
from engine.reward_functions import rate
from stages.rlhf_rewards import RewardSpec, check_rewards
from tests.demo import ROOT

EVAL = [json.loads(line)["prompt"] for line in (ROOT / "configs/data/demo_eval.jsonl").read_text().splitlines()]

# (prompt from demo_eval.jsonl, a right response, a wrong one), answers worked out by hand
CASES = [
    ("What is 11 - 11?", "11 - 11 = 0.", "11 - 11 = 1."),
    ("What is the difference when 10 is subtracted from 36?", "Sure! It is 26.", "It is 126."),
    ('Write the plural form of "man".', 'The plural of "man" is "men".', 'The plural of "man" is "mans".'),
    ('What is "quilt" written backwards?', '"quilt" backwards is "tliuq". Hope that helps!', '"quilt" backwards is "tliqu".'),
    ("How many metres make up 9 kilometres?", "9 kilometres is 9000 metres.", "9 kilometres is 900 metres."),
    ('What word means the opposite of "far"?', 'The opposite of "far" is "near".', 'The opposite of "far" is "close".'),
]


def test_the_cases_are_demo_prompts():
    assert {prompt for prompt, _, _ in CASES} <= set(EVAL)


def test_correct_is_one_for_the_answer_and_zero_without_it():
    prompts = [p for p, _, _ in CASES]
    assert rewards.correct(prompts, [right for _, right, _ in CASES]) == [1.0] * len(CASES)
    assert rewards.correct(prompts, [wrong for _, _, wrong in CASES]) == [0.0] * len(CASES)
    assert rewards.correct(prompts, [""] * len(CASES)) == [0.0] * len(CASES)


def test_every_eval_prompt_is_rated():
    said = [f"The answer is {judge.answer(p)}." for p in EVAL]
    assert rewards.correct(EVAL, said) == [1.0] * len(EVAL)


def test_other_prompts_get_none_from_both():
    prompts = ["Write a poem about the sea.", "What is 11 - 11?"]
    assert rewards.correct(prompts, ["Waves.", "0"]) == [None, 1.0]
    assert rewards.gold(prompts, ["Waves.", "0"]) == [None, 1.0]


def test_gold_is_the_judges_score_pair_by_pair():
    prompts = [p for p, _, _ in CASES for _ in range(2)]
    responses = [r for _, right, wrong in CASES for r in (right, wrong)]
    assert rewards.gold(prompts, responses) == [judge.gold_score(p, r) for p, r in zip(prompts, responses)]
    assert rewards.gold(["What is 11 - 11?"], ["Sure! 11 - 11 = 0. Hope that helps!"]) == [pytest.approx(2.0)]


def test_mismatched_lists_are_an_error_not_a_short_answer():
    with pytest.raises(ValueError):
        rewards.correct(["What is 11 - 11?", "What is 11 - 11?"], ["0"])


def test_both_pass_the_stage_probe_and_rate_as_tensors():
    check_rewards((RewardSpec("demo.rewards:correct"), RewardSpec("demo.rewards:gold", role="audit")), "rlhf.rewards", EVAL)
    out = rate("demo.rewards:correct", rewards.correct, ["What is 11 - 11?", "Hello?"], ["0", "Hi"])
    assert out[0].item() == 1.0 and out[1].isnan()
