"""Tests for the demo SFT generator (`demo.sft_data`) and the shipped configs/data/demo_sft.jsonl.

The correctness checks re-derive each answer from the prompt text alone (not from
the generator's tables), so a bug in a family's arithmetic or template is caught.
"""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from demo import judge, sft_data
from demo.tasks import FAMILIES
from tests.demo import ROOT

SHIPPED = ROOT / sft_data.DEFAULT_PATH


@pytest.fixture(scope="module")
def rows():
    return sft_data.generate(sft_data.DEFAULT_N, sft_data.DEFAULT_SEED)


def _by_task(rows, task):
    selected = [r for r in rows if r["task"] == task]
    assert selected, f"no rows for {task}"
    return selected


def _quoted(text):
    return re.findall(r'"([^"]*)"', text)


def _ints(text):
    return [int(x) for x in re.findall(r"\d+", text)]


def test_defaults():
    assert sft_data.DEFAULT_N == 480
    assert sft_data.DEFAULT_SEED == 0
    assert sft_data.DEFAULT_PATH == "configs/data/demo_sft.jsonl"
    assert len(FAMILIES) >= 8


def test_same_seed_same_rows():
    assert sft_data.generate(100, seed=3) == sft_data.generate(100, seed=3)


def test_different_seed_different_rows():
    assert sft_data.generate(100, seed=0) != sft_data.generate(100, seed=1)


def test_rows_well_formed_and_unique(rows):
    assert len(rows) == sft_data.DEFAULT_N
    for r in rows:
        assert list(r) == ["prompt", "response", "task"]
        assert isinstance(r["prompt"], str) and r["prompt"].strip()
        assert isinstance(r["response"], str) and r["response"].strip()
        assert "\n" not in r["prompt"] + r["response"]
        assert r["task"] in FAMILIES
        assert len(r["response"].split()) <= 20  # concise
    assert len({r["prompt"] for r in rows}) == len(rows)


def test_zero_and_bad_n():
    assert sft_data.generate(0) == []
    with pytest.raises(ValueError):
        sft_data.generate(-1)
    with pytest.raises(ValueError):
        sft_data.generate(sft_data.max_rows() + 1)


def test_exhausting_families_still_works():
    # Asking for more than the small families hold forces them out of the rotation.
    n = 3000
    rows = sft_data.generate(n, seed=5)
    assert len(rows) == n and len({r["prompt"] for r in rows}) == n
    counts = Counter(r["task"] for r in rows)
    assert counts["weekdays"] == FAMILIES["weekdays"].capacity
    assert counts["colour_mixing"] == FAMILIES["colour_mixing"].capacity


# --- correctness: recompute each answer from the prompt -----------------------

SUBTRACT_WORDS = (" - ", "minus", "subtract", "take away")


def test_arithmetic_correct():
    rows = _by_task(sft_data.generate(600, seed=11), "arithmetic")
    for r in rows:
        x, y = _ints(r["prompt"])
        if any(w in r["prompt"].lower() for w in SUBTRACT_WORDS):
            expected = max(x, y) - min(x, y)  # the generator never goes negative
        else:
            expected = x + y
        assert _ints(r["response"])[-1] == expected, r


def test_letter_count_correct():
    for r in _by_task(sft_data.generate(600, seed=12), "letter_count"):
        (word,) = _quoted(r["prompt"])
        assert _ints(r["response"]) == [len(word)], r
        assert word in r["response"]


def test_backwards_correct():
    for r in _by_task(sft_data.generate(600, seed=13), "backwards"):
        (word,) = _quoted(r["prompt"])
        assert _quoted(r["response"])[-1] == word[::-1], r


def test_sorting_correct():
    for r in _by_task(sft_data.generate(600, seed=14), "sorting"):
        prompt = r["prompt"].lower()
        numbers = _ints(prompt)
        assert 3 <= len(numbers) <= 5
        descending = any(k in prompt for k in ("descending", "largest to smallest", "highest to lowest", "big to small"))
        ascending = any(k in prompt for k in ("ascending", "smallest to largest", "lowest to highest", "small to big"))
        assert ascending != descending, r
        assert _ints(r["response"]) == sorted(numbers, reverse=descending), r


def test_weekdays_correct():
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    for r in _by_task(sft_data.generate(600, seed=15), "weekdays"):
        (day,) = [d for d in days if d in r["prompt"]]
        forward = any(k in r["prompt"] for k in ("after", "follows", "tomorrow"))
        backward = any(k in r["prompt"] for k in ("before", "yesterday"))
        assert forward != backward, r
        expected = days[(days.index(day) + (1 if forward else -1)) % 7]
        wrong = days[(days.index(day) + (-1 if forward else 1)) % 7]
        assert re.search(rf"\b{expected}\b", r["response"]), r
        assert wrong not in r["response"], r


def test_unit_conversion_correct():
    factors = {
        ("hours", "minutes"): 60, ("minutes", "seconds"): 60, ("days", "hours"): 24,
        ("weeks", "days"): 7, ("years", "months"): 12, ("metres", "centimetres"): 100,
        ("centimetres", "millimetres"): 10, ("kilometres", "metres"): 1000,
        ("kilograms", "grams"): 1000, ("litres", "millilitres"): 1000,
    }
    for r in _by_task(sft_data.generate(600, seed=16), "unit_conversion"):
        patterns = (  # (regex, group order as (n, big, small))
            (r"How many (\w+) are in (\d+) (\w+)\?", (2, 3, 1)),
            (r"How many (\w+) make up (\d+) (\w+)\?", (2, 3, 1)),
            (r"Convert (\d+) (\w+) to (\w+)\.", (1, 2, 3)),
            (r"(\d+) (\w+) is how many (\w+)\?", (1, 2, 3)),
        )
        for pattern, order in patterns:
            m = re.fullmatch(pattern, r["prompt"])
            if m:
                n, big, small = (m.group(i) for i in order)
                break
        else:
            pytest.fail(f"unrecognised prompt {r['prompt']!r}")
        assert max(_ints(r["response"])) == int(n) * factors[(big, small)], r


def test_capitals_correct():
    for r in _by_task(sft_data.generate(600, seed=17), "capitals"):
        (phrase,) = _quoted(r["prompt"])
        assert _quoted(r["response"])[-1] == phrase.upper(), r


# --- the shipped file ---------------------------------------------------------


def test_shipped_file_matches_generator(rows, tmp_path):
    assert SHIPPED.is_file(), f"missing {SHIPPED}; run python -m demo.sft_data"
    shipped = [json.loads(line) for line in SHIPPED.read_text(encoding="utf-8").splitlines()]
    assert shipped == rows
    # Byte for byte, too: rebuilding the file must not produce a diff.
    rebuilt = tmp_path / "demo_sft.jsonl"
    sft_data.write_jsonl(rows, rebuilt)
    assert rebuilt.read_bytes() == SHIPPED.read_bytes()


def test_shipped_file_balanced():
    shipped = [json.loads(line) for line in SHIPPED.read_text(encoding="utf-8").splitlines()]
    counts = Counter(r["task"] for r in shipped)
    assert set(counts) == set(FAMILIES)
    assert min(counts.values()) >= 20, counts


def test_write_jsonl_format(tmp_path):
    path = tmp_path / "sub" / "x.jsonl"
    sft_data.write_jsonl([{"task": "t", "response": "Café ✓", "prompt": "p"}], path)
    text = path.read_text(encoding="utf-8")
    assert text == '{"prompt": "p", "response": "Café ✓", "task": "t"}\n'


def test_main_cli(tmp_path, capsys):
    out = tmp_path / "demo.jsonl"
    sft_data.main(["--out", str(out), "--n", "30", "--seed", "2"])
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == sft_data.generate(30, 2)
    assert "30" in capsys.readouterr().out


def test_write_jsonl_other_keys(tmp_path):
    path = tmp_path / "x.jsonl"
    sft_data.write_jsonl([{"task": "t", "extra": 1, "prompt": "p"}], path, keys=("prompt", "task"))
    assert path.read_text(encoding="utf-8") == '{"prompt": "p", "task": "t"}\n'


def test_some_responses_close_with_the_judges_lines(rows):
    # The room PPO has to improve on: closers the judge rewards, but not every time.
    closed = sum(r["response"].endswith(judge.CLOSERS) for r in rows)
    assert 0.15 < closed / len(rows) < 0.35
    warm = sum(r["response"].startswith(judge.WARM_OPENERS) for r in rows)
    assert 0 < warm < len(rows)
