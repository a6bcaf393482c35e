"""Reward functions the critic-free tests train on, named `tests.engine.planted_rewards:...`
in their configs the way a user names their own. Not tests themselves."""

from __future__ import annotations


def shouting(prompts: list[str], completions: list[str]) -> list[float | None]:
    """The share of a completion's letters that are capitals: dense enough for a tiny
    random policy to find a gradient in every group, and learnable by preferring the
    tokens that hold capitals."""
    return [sum(c.isupper() for c in text) / max(1, sum(c.isalpha() for c in text)) for text in completions]


def shouting_or_none(prompts: list[str], completions: list[str]) -> list[float | None]:
    """`shouting`, but unable to rate every other completion (None), to exercise unrated episodes."""
    return [score if i % 2 == 0 else None for i, score in enumerate(shouting(prompts, completions))]


CALLS = {"n": 0}


def breaks_later(prompts: list[str], completions: list[str]) -> list[float | None]:
    """Rates like `shouting` through the stage's probe (two calls), then fails on the
    second prompt of the run's first batch: a bug that shows only mid-run."""
    CALLS["n"] += 1
    if CALLS["n"] > 2 and len(prompts) > 1:
        raise ZeroDivisionError("division by zero")
    return shouting(prompts, completions)
