"""Tests for `demo.prompts` and the shipped demo_prompts.jsonl and demo_eval.jsonl."""

from __future__ import annotations

from collections import Counter

import pytest

from demo import prompts, sft_data
from demo.judge import gold_parts
from demo.tasks import FAMILIES
from tests.demo import ROOT, read_jsonl

PROMPTS_FILE = ROOT / prompts.DEFAULT_PROMPTS_PATH
EVAL_FILE = ROOT / prompts.DEFAULT_EVAL_PATH
SFT_FILE = ROOT / sft_data.DEFAULT_PATH


def test_shipped_prompt_files_are_a_fresh_generation(tmp_path, capsys):
    rl, held = tmp_path / "prompts.jsonl", tmp_path / "eval.jsonl"
    prompts.main(["--prompts-out", str(rl), "--eval-out", str(held), "--seed", "0"])
    assert rl.read_bytes() == PROMPTS_FILE.read_bytes()
    assert held.read_bytes() == EVAL_FILE.read_bytes()
    assert "256 prompts" in capsys.readouterr().out


def test_sets_are_disjoint_from_each_other_and_from_sft(sets):
    sft = {r["prompt"] for r in read_jsonl(SFT_FILE)}
    by_set = {name: {r["prompt"] for r in rows} for name, rows in sets.items()}
    assert {name: len(p) for name, p in by_set.items()} == {**prompts.SPLITS, **prompts.LATER}, "no repeats inside a set"
    names = list(by_set)
    for i, a in enumerate(names):
        assert not by_set[a] & sft, a
        for b in names[i + 1 :]:
            assert not by_set[a] & by_set[b], (a, b)
    for name in ("rank", "rl", "eval"):
        assert {r["task"] for r in sets[name]} == set(FAMILIES), f"every family in {name}"


def test_sets_drawn_later_leave_the_first_sets_as_they_were(sets):
    # The shipped files and rankings were made before rank_more existed: adding it must not move them.
    assert prompts.split_prompts(later={}) == {name: sets[name] for name in prompts.SPLITS}


def test_rows_name_the_family_that_made_them(sets):
    for rows in sets.values():
        for r in rows:
            assert list(r) == ["prompt", "task", "response"]
            assert FAMILIES[r["task"]].match(r["prompt"]) is not None, r
            assert gold_parts(r["prompt"], r["response"])["correct"], "the written answer is right"


def test_seed_is_deterministic_and_matters():
    sizes = {"rank": 10, "rl": 10, "eval": 5}
    assert prompts.split_prompts(3, sizes) == prompts.split_prompts(3, sizes)
    assert prompts.split_prompts(3, sizes) != prompts.split_prompts(4, sizes)


def test_too_many_prompts_refused():
    # The sets drawn later count too, and the message says how many were asked for in all.
    with pytest.raises(ValueError, match=f"asked for {sft_data.max_rows() + sum(prompts.LATER.values())}$"):
        prompts.split_prompts(0, {"rank": sft_data.max_rows(), "rl": 0, "eval": 0})


def test_small_families_run_out_and_leave_the_rotation():
    # Once a family's prompts outside demo_sft are all drawn, drawing must go on without it.
    used = Counter(r["task"] for r in read_jsonl(SFT_FILE))
    left = {name: f.capacity - used[name] for name, f in FAMILIES.items() if f.capacity <= 100}
    assert left, "weekdays and colour_mixing are small"
    # Taking turns, every family still in the rotation gets one prompt in each round.
    n = len(FAMILIES) * max(left.values())
    counts = Counter(r["task"] for r in prompts.split_prompts(1, {"rank": 0, "rl": 0, "eval": n})["eval"])
    assert {name: counts[name] for name in left} == left
