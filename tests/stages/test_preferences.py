"""Preference rows: every accepted shape, the K-wise expansion, HH-RLHF dialogues,
the split by prompt, and each bad-row error."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError
from stages.shared import preferences
from stages.shared.preferences import BadRow, parse


def test_a_k_wise_ranking_yields_its_k_choose_2_pairs_best_first():
    r = parse("f:1", {"prompt": "Q", "completions": ["best", "mid", "worst"]})
    assert r.prompt == [{"role": "user", "content": "Q"}]
    assert r.pairs == [(0, 1), (0, 2), (1, 2)]
    r4 = parse("f:1", {"prompt": "Q", "completions": ["a", "b", "c", "d"]})
    assert len(r4.pairs) == 6 and all(i < j for i, j in r4.pairs)


def test_scores_order_pairs_and_ties_make_none():
    r = parse("f:1", {"prompt": "Q", "completions": ["a", "b", "c", "d"], "scores": [1, 3, 1, 0.5]})
    # b beats everyone; a and c tie, so neither beats the other; both beat d
    assert sorted(r.pairs) == [(0, 3), (1, 0), (1, 2), (1, 3), (2, 3)]


def test_chosen_rejected_and_conversational_rows():
    pair = parse("f:1", {"prompt": "Q", "chosen": "yes", "rejected": "no", "margin": 2})
    assert pair.completions == ["yes", "no"] and pair.pairs == [(0, 1)] and pair.margin == 2.0
    conv = parse("f:2", {
        "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello!"}],
        "rejected": [{"role": "assistant", "content": "What."}],
    })
    assert conv.prompt[0] == {"role": "system", "content": "Be kind."} and conv.completions == ["Hello!", "What."]


def test_hh_rlhf_dialogues_split_at_the_last_assistant_turn():
    shared = "\n\nHuman: How do I boil an egg?\n\nAssistant: In water.\n\nHuman: For how long?\n\nAssistant:"
    r = parse("hh:7", {"chosen": shared + " About nine minutes.", "rejected": shared + " Forever."})
    assert r.prompt == [
        {"role": "user", "content": "How do I boil an egg?"},
        {"role": "assistant", "content": "In water."},
        {"role": "user", "content": "For how long?"},
    ]
    assert r.completions == ["About nine minutes.", "Forever."]
    messages = [{"role": "user", "content": "Hi"}]
    trl_style = parse("f:3", {"chosen": messages + [{"role": "assistant", "content": "Hey"}], "rejected": messages + [{"role": "assistant", "content": "Go"}]})
    assert trl_style.prompt == messages and trl_style.completions == ["Hey", "Go"]


@pytest.mark.parametrize(("row", "reason", "message"), [
    ({"prompt": "Q", "completions": ["only one"]}, "too_few_completions", "f:4: a ranking needs at least two completions, got 1"),
    ({"prompt": "Q", "completions": ["a", "  "]}, "empty_text", "f:4: 'completions[1]' is empty"),
    ({"prompt": "Q", "completions": ["a", "b"], "scores": [1]}, "scores_mismatch", "f:4: 'scores' must be 2 finite number(s)"),
    ({"prompt": "Q", "completions": ["a", "b"], "scores": [1, "x"]}, "scores_mismatch", "f:4: 'scores' must be 2 finite number(s)"),
    ({"prompt": "Q", "completions": ["a", "b", "c"], "scores": [float("nan"), 1, 0]}, "scores_mismatch", "f:4: 'scores' must be 3 finite number(s)"),
    ({"prompt": "Q", "completions": ["a", "b"], "scores": [float("inf"), 0]}, "scores_mismatch", "f:4: 'scores' must be 2 finite number(s)"),
    ({"prompt": "Q", "completions": ["a", "a", "b"]}, "duplicate_completions", "f:4: the same completion appears twice"),
    ({"prompt": "Q", "completions": ["a", "b"], "scores": [2, 2]}, "no_pairs", "f:4: every score is tied"),
    ({"prompt": "", "chosen": "a", "rejected": "b"}, "empty_text", "f:4: 'prompt' is empty"),
    ({"chosen": "\n\nHuman: hi\n\nAssistant: ", "rejected": "\n\nHuman: hi\n\nAssistant: go"}, "empty_text", "f:4: the last assistant turn of 'chosen' is empty"),
    ({"chosen": "\n\nHuman: a\n\nAssistant: x", "rejected": "\n\nHuman: b\n\nAssistant: y"}, "prompt_mismatch", "f:4: 'chosen' and 'rejected' differ before their last assistant turn"),
])
def test_bad_rows_name_their_line_and_reason(row, reason, message):
    with pytest.raises(BadRow) as error:
        parse("f:4", row)
    assert str(error.value).startswith(message)
    assert error.value.reason == reason


@pytest.mark.parametrize(("row", "message"), [
    ({"prompt": "Q", "answer": "a"}, "f:5: expected 'prompt' with 'completions' (best first) or 'chosen'/'rejected'; found keys: answer, prompt"),
    ({"chosen": "just text", "rejected": "more text"}, "f:5: 'chosen' is not a dialogue"),
    ({"prompt": "Q", "completions": "a, b"}, "f:5: 'completions' must be a list, got str"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "margin": "big"}, "f:5: 'margin' must be a finite number"),
    ({"prompt": "Q", "chosen": "a", "rejected": "b", "margin": float("nan")}, "f:5: 'margin' must be a finite number"),
])
def test_malformed_rows_are_errors_even_when_dropping(row, message):
    with pytest.raises(ConfigError) as error:
        parse("f:5", row)
    assert not isinstance(error.value, BadRow)
    assert str(error.value).startswith(message)


def test_bad_rows_are_dropped_and_counted_only_when_asked():
    rows = [("f:1", {"prompt": "Q", "completions": ["a", "b"]}), ("f:2", {"prompt": "Q2", "completions": ["a"]}),
            ("f:3", {"prompt": "Q3", "completions": ["a", "a"]}), ("f:4", {"prompt": "Q4", "completions": ["x"]})]
    with pytest.raises(BadRow, match="^f:2: "):
        preferences.read_rankings(rows, drop_bad_rows=False)
    kept, dropped = preferences.read_rankings(rows, drop_bad_rows=True)
    assert [r.where for r in kept] == ["f:1"]
    assert dropped == {"too_few_completions": 2, "duplicate_completions": 1}


def test_the_split_is_by_prompt_never_by_pair():
    rows = [parse(f"f:{i}", {"prompt": f"Q{i % 10}", "completions": [f"a{i}", f"b{i}", f"c{i}"]}) for i in range(40)]
    train, held = preferences.split_by_prompt(rows, 0.3, seed=0, key="rm.data.train")
    assert len(train) + len(held) == 40
    assert {r.key for r in train}.isdisjoint({r.key for r in held}), "a prompt on both sides leaks"
    assert len({r.key for r in held}) == 3, "30% of the 10 prompts"
    again, _ = preferences.split_by_prompt(rows, 0.3, seed=0, key="rm.data.train")
    assert [r.where for r in again] == [r.where for r in train], "the split follows the seed"
    other, _ = preferences.split_by_prompt(rows, 0.3, seed=1, key="rm.data.train")
    assert {r.key for r in other} != {r.key for r in train}
    with pytest.raises(ConfigError, match="rm.data.train: 1 distinct prompt"):
        preferences.split_by_prompt(rows[:1], 0.3, seed=0, key="rm.data.train")
