"""Calling reward functions (`engine.reward_functions.rate`): ratings as a float32
tensor with NaN for None, and one line naming the prompt for each way a function
can misbehave mid-run."""

from __future__ import annotations

import math
import pickle

import pytest
import torch

from engine.reward_functions import prompt_text, rate
from pipeline.errors import ConfigError, RewardFunctionError

PROMPTS = ["What is 3 + 4?", "What is 7 times 8?", "Spell cat backwards."]
COMPLETIONS = ["7.", "Sure! 56.", "tac"]


def ratings(values):
    return lambda prompts, completions: list(values)


def test_numbers_none_and_bools_become_a_float32_tensor():
    out = rate("t:f", ratings([0.5, None, True]), PROMPTS, COMPLETIONS)
    assert out.dtype == torch.float32 and out.shape == (3,)
    assert out[0].item() == 0.5 and math.isnan(out[1].item()) and out[2].item() == 1.0
    assert rate("t:f", ratings((False, 2, -1.25)), PROMPTS, COMPLETIONS).tolist() == [0.0, 2.0, -1.25]


def test_the_function_gets_copies_and_an_empty_batch_calls_nothing():
    def edits(prompts, completions):
        prompts.clear()
        return [1.0] * len(completions)

    prompts = list(PROMPTS)
    rate("t:edits", edits, prompts, COMPLETIONS)
    assert prompts == PROMPTS
    assert rate("t:never", None, [], []).shape == (0,)
    with pytest.raises(ValueError, match="3 prompts but 2 completions"):
        rate("t:f", ratings([1, 1, 1]), PROMPTS, COMPLETIONS[:2])


def boom(prompts, completions):
    return [56 / (0 if "7 times 8" in p else 1) for p in prompts]


def exits(prompts, completions):
    raise SystemExit(5)


def only_in_batches(prompts, completions):
    if len(prompts) > 1:
        raise ValueError("big")
    return [1.0]


@pytest.mark.parametrize(("fn", "message"), [
    (boom, "reward function t:f raised ZeroDivisionError('division by zero') on prompt 'What is 7 times 8?' (completion 'Sure! 56.')"),
    (exits, "reward function t:f raised SystemExit(5) on prompt 'What is 3 + 4?' (completion '7.')"),
    (only_in_batches, "reward function t:f raised ValueError('big') on the whole batch but on no pair alone (a batch starting with prompt 'What is 3 + 4?')"),
    (ratings([1.0, 2.0]), "reward function t:f returned 2 ratings for 3 completions (a batch starting with prompt 'What is 3 + 4?')"),
    (lambda p, c: 0.5, "reward function t:f returned 0.5 (a float), not a list of 3 ratings (a batch starting with prompt 'What is 3 + 4?')"),
    (lambda p, c: torch.ones(3), "reward function t:f returned tensor([1., 1., 1.]) (a Tensor), not a list of 3 ratings (a batch starting with prompt 'What is 3 + 4?')"),
    (ratings([1.0, "0.5", 1.0]), "reward function t:f returned '0.5' (a str), not a number or None on prompt 'What is 7 times 8?' (completion 'Sure! 56.')"),
    (ratings([1.0, 1.0, [1.0]]), "reward function t:f returned [1.0] (a list), not a number or None on prompt 'Spell cat backwards.' (completion 'tac')"),
    (ratings([float("nan"), 1.0, 1.0]), "reward function t:f returned nan, not a finite number (None says it cannot rate one) on prompt 'What is 3 + 4?' (completion '7.')"),
    (ratings([1.0, -math.inf, 1.0]), "reward function t:f returned -inf, not a finite number (None says it cannot rate one) on prompt 'What is 7 times 8?' (completion 'Sure! 56.')"),
    (ratings([1.0, 1.0, 1e300]), "reward function t:f returned 1e+300, not a finite number (None says it cannot rate one) on prompt 'Spell cat backwards.' (completion 'tac')"),
])
def test_each_misbehaviour_is_one_line_naming_the_prompt(fn, message):
    with pytest.raises(RewardFunctionError) as caught:
        rate("t:f", fn, PROMPTS, COMPLETIONS)
    assert str(caught.value) == message


def test_the_error_is_bad_input_that_survives_pickling_and_long_text_is_cut():
    prompt = "Tell me about " + "sea " * 40
    with pytest.raises(ConfigError) as caught:  # the CLI prints one line and exits 2
        rate("t:f", ratings([math.nan]), [prompt], ["x\ny"])
    e = caught.value
    assert isinstance(e, RewardFunctionError) and "\n" not in str(e)
    assert f"on prompt '{prompt[:77]}...' (completion 'x\\ny')" in str(e)
    again = pickle.loads(pickle.dumps(e))
    assert str(again) == str(e) and again.prompt == prompt


def test_a_function_sees_the_last_user_message_of_a_chat_prompt():
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "What is 2+2?"}]
    assert prompt_text(chat) == "What is 2+2?"
    assert prompt_text([{"role": "system", "content": "Only this"}]) == "Only this"
