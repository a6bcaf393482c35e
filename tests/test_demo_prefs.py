"""Tests for pipeline.demo_prefs, pipeline.demo_judge and the shipped demo files
(demo_prompts.jsonl, demo_eval.jsonl, demo_rm.jsonl).

Answers are re-derived from the prompt text with this file's own parsing (not the
generator's solvers), so a solver or judge that gets an answer wrong fails here.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from pipeline import demo_data, demo_judge, demo_prefs

ROOT = Path(__file__).resolve().parents[1]
RM_FILE = ROOT / "configs" / "data" / "demo_rm.jsonl"
PROMPTS_FILE = ROOT / demo_prefs.DEFAULT_PROMPTS_PATH
EVAL_FILE = ROOT / demo_prefs.DEFAULT_EVAL_PATH
SFT_FILE = ROOT / demo_data.DEFAULT_PATH
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _read(path: Path) -> list[dict]:
    assert path.is_file(), f"missing {path}"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def sets():
    return demo_prefs.split_prompts()


# --- the prompt sets -------------------------------------------------------------


def test_shipped_prompt_files_are_a_fresh_generation(tmp_path, capsys):
    prompts, held = tmp_path / "prompts.jsonl", tmp_path / "eval.jsonl"
    demo_prefs.main(["--prompts-out", str(prompts), "--eval-out", str(held), "--seed", "0"])
    assert prompts.read_bytes() == PROMPTS_FILE.read_bytes()
    assert held.read_bytes() == EVAL_FILE.read_bytes()
    assert "256 prompts" in capsys.readouterr().out


def test_sets_are_disjoint_from_each_other_and_from_sft(sets):
    sft = {r["prompt"] for r in _read(SFT_FILE)}
    prompts = {name: {r["prompt"] for r in rows} for name, rows in sets.items()}
    assert {name: len(p) for name, p in prompts.items()} == demo_prefs.SPLITS, "no repeats inside a set"
    names = list(prompts)
    for i, a in enumerate(names):
        assert not prompts[a] & sft, a
        for b in names[i + 1 :]:
            assert not prompts[a] & prompts[b], (a, b)
    for name in ("rank", "rl", "eval"):
        assert {r["task"] for r in sets[name]} == set(demo_data.TASKS), f"every family in {name}"


def test_seed_is_deterministic_and_matters():
    sizes = {"rank": 10, "rl": 10, "eval": 5}
    assert demo_prefs.split_prompts(3, sizes) == demo_prefs.split_prompts(3, sizes)
    assert demo_prefs.split_prompts(3, sizes) != demo_prefs.split_prompts(4, sizes)


def test_too_many_prompts_refused():
    with pytest.raises(ValueError):
        demo_prefs.split_prompts(0, {"rank": demo_data.max_rows(), "rl": 0, "eval": 0})


# --- ranking -----------------------------------------------------------------------


def test_rank_orders_by_the_judge_and_keeps_one_sample_per_level():
    def judge(prompt, text):
        return float(len(text))

    samples = ["bb", "a", "ccc", "dd", "a", " ", "ccc "]
    completions, stats = demo_prefs.rank("p", samples, judge, noise=0.0, rng=random.Random(0))
    assert [len(c) for c in completions] == [3, 2, 1], "best first, one per level, empty dropped"
    assert completions[1] in ("bb", "dd")
    assert stats == {"pairs": 3, "flipped": 0}
    assert demo_prefs.rank("p", ["x", "y", "x"], judge, 0.0, random.Random(0))[0] == [], "one level: nothing to rank"


def test_rank_noise_flips_close_calls_and_counts_them():
    def judge(prompt, text):
        return float(len(text))

    flipped = pairs = 0
    rng = random.Random(1)
    for _ in range(200):
        completions, stats = demo_prefs.rank("p", ["a", "bb", "ccc"], judge, noise=1.0, rng=rng)
        order = [len(c) for c in completions]
        assert stats["flipped"] == sum(order[i] < order[j] for i in range(3) for j in range(i + 1, 3))
        flipped, pairs = flipped + stats["flipped"], pairs + stats["pairs"]
    # Gaps of 1, 1 and 2 under noise std 1 flip with probability Phi(-1/sqrt 2) = 0.24
    # twice and Phi(-2/sqrt 2) = 0.08 once: 0.19 on average.
    assert 0.14 < flipped / pairs < 0.24


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
    assert demo_judge.gold_score(prompt, response) == pytest.approx(score)


def test_judge_cannot_rate_other_prompts():
    assert demo_judge.gold_score("Write a poem about the sea.", "Waves.") is None
    assert demo_judge.gold_parts("Hello?", "Hi") is None


# --- correctness, re-derived from the prompt -------------------------------------


def _ints(text):
    return [int(x) for x in re.findall(r"\d+", text)]


def _word(word, text):
    return re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", text) is not None


def _quoted(text):
    return re.findall(r'"([^"]*)"', text)


def _opposite_table():
    return {**dict(demo_data.OPPOSITES), **{b: a for a, b in demo_data.OPPOSITES}}


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
    rows = [r for r in _read(SFT_FILE) if r["task"] == task]
    assert len(rows) >= 10
    for r in rows:  # SFT responses are right by construction
        assert demo_judge.gold_parts(r["prompt"], r["response"])["correct"], r
        assert is_correct(task, r["prompt"], r["response"])
    for r in (r for r in sets["eval"] if r["task"] == task):
        assert is_correct(task, r["prompt"], f"It is {demo_judge.answer(r['prompt'])}."), r


def test_checker_catches_a_corrupted_answer():
    # The checker itself must be able to say no.
    assert is_correct("arithmetic", "What is 12 + 30?", "Sure! 12 + 30 = 42.")
    assert not is_correct("arithmetic", "What is 12 + 30?", "Sure! 12 + 30 = 41.")
    assert is_correct("arithmetic", "Subtract 5 from 10.", "The answer is 5.")
    assert not is_correct("letter_count", 'Count the letters in "lemon".', 'There are 6 letters in "lemon".')
    assert not is_correct("opposites", 'What is the opposite of "hot"?', 'The opposite of "hot" is "tall".')


# --- the shipped rankings (sampled from the SFT model, ranked by the noisy judge) ----


def test_shipped_rankings_are_well_formed_and_from_the_rank_prompts(sets):
    rows = _read(RM_FILE)
    assert len(rows) >= 250
    rank_prompts = {r["prompt"] for r in sets["rank"]}
    for r in rows:
        assert list(r) == ["prompt", "completions", "task"]
        assert r["prompt"] in rank_prompts, r
        assert 2 <= len(r["completions"]) <= 4, r
        assert all(c and c == c.strip() for c in r["completions"]), r
        golds = [demo_judge.gold_score(r["prompt"], c) for c in r["completions"]]
        assert len(set(golds)) == len(golds), f"one completion per gold level: {r}"
    assert len({r["prompt"] for r in rows}) == len(rows)


def test_shipped_rankings_follow_the_judge_up_to_noise():
    pairs = flipped = 0
    for r in _read(RM_FILE):
        golds = [demo_judge.gold_score(r["prompt"], c) for c in r["completions"]]
        for i in range(len(golds)):
            for j in range(i + 1, len(golds)):
                pairs += 1
                flipped += golds[i] < golds[j]
    assert pairs > 300
    assert flipped / pairs < 0.2, f"{flipped} of {pairs} pairs against the judge"
