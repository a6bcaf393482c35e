"""Tests for pipeline.demo_prefs and the shipped demo_rm.jsonl / demo_prompts.jsonl.

Answers are re-derived from the prompt text with this file's own parsing (not the
generator's solvers), so a solver that gets an answer wrong, or a "wrong"
completion that is accidentally right, fails here.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path

import pytest

from pipeline import demo_data, demo_prefs

ROOT = Path(__file__).resolve().parents[1]
RM_FILE = ROOT / demo_prefs.DEFAULT_RM_PATH
PROMPTS_FILE = ROOT / demo_prefs.DEFAULT_PROMPTS_PATH
SFT_FILE = ROOT / demo_data.DEFAULT_PATH
DAYS = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]


def _read(path: Path) -> list[dict]:
    assert path.is_file(), f"missing {path}; run python -m pipeline.demo_prefs"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def labelled():
    return demo_prefs.generate_rm(with_kinds=True)


@pytest.fixture(scope="module")
def shipped_rm():
    return _read(RM_FILE)


# --- the shipped files ---------------------------------------------------------


def test_shipped_files_are_a_fresh_generation(tmp_path, capsys):
    rm, prompts = tmp_path / "rm.jsonl", tmp_path / "prompts.jsonl"
    demo_prefs.main(["--rm-out", str(rm), "--prompts-out", str(prompts), "--seed", "0"])
    assert rm.read_bytes() == RM_FILE.read_bytes()
    assert prompts.read_bytes() == PROMPTS_FILE.read_bytes()
    assert "600" in capsys.readouterr().out


def test_labelled_rows_are_the_shipped_rows(labelled, shipped_rm):
    assert [{k: v for k, v in r.items() if k != "kinds"} for r in labelled] == shipped_rm


def test_seed_is_deterministic_and_matters():
    assert demo_prefs.generate_rm(40, seed=3) == demo_prefs.generate_rm(40, seed=3)
    assert demo_prefs.generate_rm(40, seed=3) != demo_prefs.generate_rm(40, seed=4)
    assert demo_prefs.generate_prompts(40, seed=3) != demo_prefs.generate_prompts(40, seed=4)


def test_rm_rows_well_formed(shipped_rm):
    assert 500 <= len(shipped_rm) <= 700
    for r in shipped_rm:
        assert list(r) == ["prompt", "completions", "task"]
        assert r["task"] in demo_data.TASKS
        assert 2 <= len(r["completions"]) <= 4, r
        texts = [r["prompt"], *r["completions"]]
        assert all(isinstance(t, str) and t.strip() == t and t for t in texts), r
        assert all("\n" not in t for t in texts), r
        assert len(set(r["completions"])) == len(r["completions"]), r
    assert len({r["prompt"] for r in shipped_rm}) == len(shipped_rm)


def test_k_mix(shipped_rm):
    counts = Counter(len(r["completions"]) for r in shipped_rm)
    assert set(counts) == {2, 3, 4}
    assert all(counts[k] >= 0.25 * len(shipped_rm) for k in (2, 3, 4)), counts


def test_every_family_present(shipped_rm):
    assert set(Counter(r["task"] for r in shipped_rm)) == set(demo_data.TASKS)


def test_no_prompt_overlap_with_sft(shipped_rm):
    sft = {r["prompt"] for r in _read(SFT_FILE)}
    assert not sft & {r["prompt"] for r in shipped_rm}
    assert not sft & {r["prompt"] for r in _read(PROMPTS_FILE)}


def test_prompts_file():
    rows = _read(PROMPTS_FILE)
    assert len(rows) == demo_prefs.PROMPT_ROWS
    assert all(list(r) == ["prompt", "task"] and r["prompt"] and r["task"] in demo_data.TASKS for r in rows)
    assert len({r["prompt"] for r in rows}) == len(rows)
    assert set(r["task"] for r in rows) == set(demo_data.TASKS)


def test_too_many_prompts_refused():
    with pytest.raises(ValueError):
        demo_prefs.generate_prompts(demo_data.max_rows() - demo_data.DEFAULT_N + 1)


# --- ranking order and kinds ------------------------------------------------------


def test_kinds_keep_the_preference_order(labelled):
    order = list(demo_prefs.KINDS)
    for r in labelled:
        ranks = [order.index(k) for k in r["kinds"]]
        assert ranks == sorted(set(ranks)), r  # strictly best to worst
        if len(ranks) == 4:
            assert r["kinds"] == order


def test_kinds_look_different(labelled):
    for r in labelled:
        for kind, text in zip(r["kinds"], r["completions"]):
            words = len(text.split())
            if kind == "good":
                assert words <= 20, text  # concise, like demo_sft
            elif kind == "curt_or_padded":
                assert words <= 6 or words >= 40, text  # clearly curt or clearly rambling
            elif kind == "unhelpful":
                assert text in demo_prefs.UNHELPFUL


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
def test_correct_kinds_are_right_and_wrong_kind_is_wrong(labelled, task):
    seen = Counter()
    for r in (r for r in labelled if r["task"] == task):
        for kind, text in zip(r["kinds"], r["completions"]):
            if kind in ("good", "curt_or_padded"):
                assert is_correct(task, r["prompt"], text), (kind, r)
            elif kind == "wrong":
                assert not is_correct(task, r["prompt"], text), r
            seen[kind] += 1
    # Guard against a vacuous pass: every kind was actually checked.
    assert all(seen[k] >= 5 for k in demo_prefs.KINDS), seen


def test_best_completion_is_always_correct(labelled):
    for r in (r for r in labelled if r["task"] in CHECKED):
        assert r["kinds"][0] in ("good", "curt_or_padded"), r
        assert is_correct(r["task"], r["prompt"], r["completions"][0]), r


def test_wrong_keeps_the_friendly_style(labelled):
    # Only the answer changes, so the reward model must read it to rank correctly.
    rows = [r for r in labelled if r["kinds"][:3] == ["good", "curt_or_padded", "wrong"]]
    assert rows
    for r in rows:
        good, wrong = r["completions"][0], r["completions"][2]
        assert len(good.split()) == len(wrong.split()), r
        assert good != wrong


def test_checker_catches_a_corrupted_answer():
    # The checker itself must be able to say no.
    assert is_correct("arithmetic", "What is 12 + 30?", "Sure! 12 + 30 = 42.")
    assert not is_correct("arithmetic", "What is 12 + 30?", "Sure! 12 + 30 = 41.")
    assert is_correct("arithmetic", "Subtract 5 from 10.", "The answer is 5.")
    assert not is_correct("letter_count", 'Count the letters in "lemon".', 'There are 6 letters in "lemon".')
    assert not is_correct("opposites", 'What is the opposite of "hot"?', 'The opposite of "hot" is "tall".')
