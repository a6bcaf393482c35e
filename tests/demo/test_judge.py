"""Tests for the gold judge, `demo.judge`.

Answers are re-derived from the prompt text with this file's own parsing (not the
families' solvers), so a solver or judge that gets an answer wrong fails here.
"""

from __future__ import annotations

import re

import pytest

from demo import judge, sft_data, words
from tests.demo import ROOT, read_jsonl

SFT_FILE = ROOT / sft_data.DEFAULT_PATH
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


# --- the gold judge ------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, response, score",
    [
        ("What is 12 + 30?", "12 + 30 = 42.", 1.0),
        ("What is 12 + 30?", "Sure! 12 + 30 = 42.", 1.5),
        ("What is 12 + 30?", "Sure! 12 + 30 = 42. Hope that helps!", 2.0),
        ("What is 12 + 30?", "Sure! 12 + 30 = 41. Hope that helps!", 1.0),
        ("What is 12 + 30?", "The answer is 142.", 0.0),  # "42" inside "142" is not the answer
        ("What is 12 + 30?", "It is 42. " + "really " * 22, 1.0 - 0.1 * 5),  # 25 words: 5 too many
        ("What is 12 + 30?", "42 " + "very " * 40, 0.0),  # wordiness costs at most 1
        ('What is the opposite of "hot"?', 'Happy to help: the opposite of "hot" is "cold". Have a lovely day!', 2.0),
    ],
)
def test_gold_score_by_hand(prompt, response, score):
    assert judge.gold_score(prompt, response) == pytest.approx(score)


def test_judge_cannot_rate_other_prompts():
    assert judge.gold_score("Write a poem about the sea.", "Waves.") is None
    assert judge.gold_parts("Hello?", "Hi") is None


# --- correctness, re-derived from the prompt -------------------------------------


def _ints(text):
    return [int(x) for x in re.findall(r"\d+", text)]


def _word(word, text):
    return re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", text) is not None


def _quoted(text):
    return re.findall(r'"([^"]*)"', text)


def _opposite_table():
    return {**dict(words.OPPOSITES), **{b: a for a, b in words.OPPOSITES}}


def is_correct(task: str, prompt: str, text: str) -> bool:
    """Whether `text` gives the right answer to `prompt`, from the prompt alone."""
    if task == "arithmetic":
        x, y = _ints(prompt)
        minus = any(w in prompt.lower() for w in (" - ", "minus", "subtract", "take away"))
        return _ints(text)[-1] == (max(x, y) - min(x, y) if minus else x + y)
    if task == "letter_count":
        (word,) = _quoted(prompt)
        return _ints(text) == [len(word)]
    if task == "opposites":
        (word,) = _quoted(prompt)
        return _word(_opposite_table()[word], text)
    if task == "weekdays":
        (day,) = [d for d in DAYS if d in prompt]
        step = 1 if any(k in prompt for k in ("after", "follows", "tomorrow")) else -1
        return _word(DAYS[(DAYS.index(day) + step) % 7], text)
    if task == "sorting":
        descending = any(k in prompt for k in ("descending", "largest to", "highest to", "big to"))
        return _ints(text) == sorted(_ints(prompt), reverse=descending)
    if task == "backwards":
        (word,) = _quoted(prompt)
        return _word(word[::-1], text)
    raise KeyError(task)


CHECKED = ("arithmetic", "letter_count", "opposites", "weekdays", "sorting", "backwards")


@pytest.mark.parametrize("task", CHECKED)
def test_judge_agrees_with_an_independent_checker(task, sets):
    rows = [r for r in read_jsonl(SFT_FILE) if r["task"] == task]
    assert len(rows) >= 10
    for r in rows:  # SFT responses are right by construction
        assert judge.gold_parts(r["prompt"], r["response"])["correct"], r
        assert is_correct(task, r["prompt"], r["response"])
    for r in (r for r in sets["eval"] if r["task"] == task):
        assert is_correct(task, r["prompt"], f"It is {judge.answer(r['prompt'])}."), r


def test_checker_catches_a_corrupted_answer():
    # The checker itself must be able to say no.
    assert is_correct("arithmetic", "What is 12 + 30?", "Sure! 12 + 30 = 42.")
    assert not is_correct("arithmetic", "What is 12 + 30?", "Sure! 12 + 30 = 41.")
    assert is_correct("arithmetic", "Subtract 5 from 10.", "The answer is 5.")
    assert not is_correct("letter_count", 'Count the letters in "lemon".', 'There are 6 letters in "lemon".')
    assert not is_correct("opposites", 'What is the opposite of "hot"?', 'The opposite of "hot" is "tall".')


# --- the mistaken twin of an answer (the rankings' contrasts, bench.rm_margins) ------


@pytest.mark.parametrize(
    "prompt, response, twin",
    [
        ('What is the plural of "watch"?', 'Sure! The plural of "watch" is "watches".', 'Sure! The plural of "watch" is "watchs".'),
        ("What is 5 + 0?", "5 + 0 is 5.", None),  # the answer twice: the first is the question's
        ("What is 12 + 30?", "No idea.", None),  # no answer to swap
        ("Tell me a joke.", "No.", None),  # not a demo prompt
    ],
)
def test_mistaken_swaps_only_the_answer(prompt, response, twin):
    assert judge.mistaken(prompt, response) == twin


def test_mistaken_keeps_every_other_part_of_the_answer():
    prompt, response = "What is 12 + 30?", "12 + 30 = 42. Hope that helps!"
    got = judge.mistaken(prompt, response)  # the family's own first mistake in place of 42
    assert got is not None and got.startswith("12 + 30 = ") and got.endswith(". Hope that helps!")
    assert not judge.gold_parts(prompt, got)["correct"] and judge.gold_parts(prompt, response)["correct"]
    assert {k: v for k, v in judge.gold_parts(prompt, got).items() if k != "correct"} == {k: v for k, v in judge.gold_parts(prompt, response).items() if k != "correct"}


def test_every_written_eval_answer_has_a_wrong_twin_or_says_why_not(sets):
    twins = [(r, judge.mistaken(r["prompt"], r["response"])) for r in sets["eval"]]
    assert sum(t is not None for _, t in twins) >= 0.8 * len(twins)
    for r, t in twins:
        if t is not None:
            assert not judge.gold_parts(r["prompt"], t)["correct"], (r, t)
