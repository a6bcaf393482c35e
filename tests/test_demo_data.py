"""Tests for the demo SFT generator and the shipped configs/data/demo_sft.jsonl.

The correctness checks re-derive each answer from the prompt text alone (not from
the generator's tables), so a bug in a family's arithmetic or template is caught.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from pathlib import Path

import pytest

from pipeline import demo_data

REPO_ROOT = Path(__file__).resolve().parents[1]
SHIPPED = REPO_ROOT / demo_data.DEFAULT_PATH


@pytest.fixture(scope="module")
def rows():
    return demo_data.generate(demo_data.DEFAULT_N, demo_data.DEFAULT_SEED)


def _by_task(rows, task):
    selected = [r for r in rows if r["task"] == task]
    assert selected, f"no rows for {task}"
    return selected


def _quoted(text):
    return re.findall(r'"([^"]*)"', text)


def _ints(text):
    return [int(x) for x in re.findall(r"\d+", text)]


def test_defaults():
    assert demo_data.DEFAULT_N == 480
    assert demo_data.DEFAULT_SEED == 0
    assert demo_data.DEFAULT_PATH == "configs/data/demo_sft.jsonl"
    assert len(demo_data.TASKS) >= 8


def test_same_seed_same_rows():
    assert demo_data.generate(100, seed=3) == demo_data.generate(100, seed=3)


def test_different_seed_different_rows():
    assert demo_data.generate(100, seed=0) != demo_data.generate(100, seed=1)


def test_rows_well_formed_and_unique(rows):
    assert len(rows) == demo_data.DEFAULT_N
    for r in rows:
        assert list(r) == ["prompt", "response", "task"]
        assert isinstance(r["prompt"], str) and r["prompt"].strip()
        assert isinstance(r["response"], str) and r["response"].strip()
        assert "\n" not in r["prompt"] + r["response"]
        assert r["task"] in demo_data.TASKS
        assert len(r["response"].split()) <= 20  # concise
    assert len({r["prompt"] for r in rows}) == len(rows)


def test_zero_and_bad_n():
    assert demo_data.generate(0) == []
    with pytest.raises(ValueError):
        demo_data.generate(-1)
    with pytest.raises(ValueError):
        demo_data.generate(demo_data.max_rows() + 1)


@pytest.mark.parametrize("task", [t for t, (_, cap) in demo_data.FAMILIES.items() if cap <= 1000])
def test_small_family_capacity_is_exact(task):
    # generate() relies on capacities being exact: too high would loop forever.
    draw, capacity = demo_data.FAMILIES[task]
    rng = random.Random(0)
    prompts = {draw(rng)[0] for _ in range(40 * capacity)}
    assert len(prompts) == capacity


def test_exhausting_families_still_works():
    # Asking for more than the small families hold forces them out of the rotation.
    n = 3000
    rows = demo_data.generate(n, seed=5)
    assert len(rows) == n and len({r["prompt"] for r in rows}) == n
    counts = Counter(r["task"] for r in rows)
    assert counts["weekdays"] == demo_data.FAMILIES["weekdays"][1]
    assert counts["colour_mixing"] == demo_data.FAMILIES["colour_mixing"][1]


def test_word_tables_are_unambiguous():
    words = [w for pair in demo_data.OPPOSITES for w in pair]
    assert len(words) == len(set(words))
    assert all(w.isalpha() and w.islower() for w in demo_data.WORDS)
    assert len(set(demo_data.WORDS)) == len(demo_data.WORDS)
    assert len({s for s, _ in demo_data.PLURALS}) == len(demo_data.PLURALS)


# --- correctness: recompute each answer from the prompt -----------------------

SUBTRACT_WORDS = (" - ", "minus", "subtract", "take away")


def test_arithmetic_correct():
    rows = _by_task(demo_data.generate(600, seed=11), "arithmetic")
    for r in rows:
        x, y = _ints(r["prompt"])
        if any(w in r["prompt"].lower() for w in SUBTRACT_WORDS):
            expected = max(x, y) - min(x, y)  # the generator never goes negative
        else:
            expected = x + y
        assert _ints(r["response"])[-1] == expected, r


def test_letter_count_correct():
    for r in _by_task(demo_data.generate(600, seed=12), "letter_count"):
        (word,) = _quoted(r["prompt"])
        assert _ints(r["response"]) == [len(word)], r
        assert word in r["response"]


def test_backwards_correct():
    for r in _by_task(demo_data.generate(600, seed=13), "backwards"):
        (word,) = _quoted(r["prompt"])
        assert _quoted(r["response"])[-1] == word[::-1], r


def test_sorting_correct():
    for r in _by_task(demo_data.generate(600, seed=14), "sorting"):
        prompt = r["prompt"].lower()
        numbers = _ints(prompt)
        assert 3 <= len(numbers) <= 5
        descending = any(k in prompt for k in ("descending", "largest to smallest", "highest to lowest", "big to small"))
        ascending = any(k in prompt for k in ("ascending", "smallest to largest", "lowest to highest", "small to big"))
        assert ascending != descending, r
        assert _ints(r["response"]) == sorted(numbers, reverse=descending), r


def test_weekdays_correct():
    days = ["Monday", "Tuesday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday"]
    for r in _by_task(demo_data.generate(600, seed=15), "weekdays"):
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
    for r in _by_task(demo_data.generate(600, seed=16), "unit_conversion"):
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
    for r in _by_task(demo_data.generate(600, seed=17), "capitals"):
        (phrase,) = _quoted(r["prompt"])
        assert _quoted(r["response"])[-1] == phrase.upper(), r


# --- the shipped file ---------------------------------------------------------


def test_shipped_file_matches_generator(rows, tmp_path):
    assert SHIPPED.is_file(), f"missing {SHIPPED}; run python -m pipeline.demo_data"
    shipped = [json.loads(line) for line in SHIPPED.read_text(encoding="utf-8").splitlines()]
    assert shipped == rows
    # Byte for byte, too: rebuilding the file must not produce a diff.
    rebuilt = tmp_path / "demo_sft.jsonl"
    demo_data.write_jsonl(rows, rebuilt)
    assert rebuilt.read_bytes() == SHIPPED.read_bytes()


def test_shipped_file_balanced():
    shipped = [json.loads(line) for line in SHIPPED.read_text(encoding="utf-8").splitlines()]
    counts = Counter(r["task"] for r in shipped)
    assert set(counts) == set(demo_data.TASKS)
    assert min(counts.values()) >= 20, counts


def test_write_jsonl_format(tmp_path):
    path = tmp_path / "sub" / "x.jsonl"
    demo_data.write_jsonl([{"task": "t", "response": "Café ✓", "prompt": "p"}], path)
    text = path.read_text(encoding="utf-8")
    assert text == '{"prompt": "p", "response": "Café ✓", "task": "t"}\n'


def test_main_cli(tmp_path, capsys):
    out = tmp_path / "demo.jsonl"
    demo_data.main(["--out", str(out), "--n", "30", "--seed", "2"])
    lines = out.read_text(encoding="utf-8").splitlines()
    assert [json.loads(line) for line in lines] == demo_data.generate(30, 2)
    assert "30" in capsys.readouterr().out
