"""The demo's verifiable rewards, for its GRPO config: reward functions in the batch
signature `fn(prompts, completions) -> list[float | None]` that `rlhf.rewards` names
(`demo.rewards:correct`, `demo.rewards:gold`).

Both read a completion the way the gold judge does (`demo.judge`): `correct` is the
judge's correctness alone, a reward a checker can verify, and `gold` its whole score,
as an audit of what a reward model would be trained toward. Each gives None for a
prompt that is not a demo prompt. Standard library only.
"""

from __future__ import annotations

from demo import judge


def correct(prompts: list[str], completions: list[str]) -> list[float | None]:
    """1.0 where the expected answer appears in the completion, 0.0 where it does not."""
    return [None if (parts := judge.gold_parts(p, c)) is None else float(parts["correct"]) for p, c in zip(prompts, completions, strict=True)]


def gold(prompts: list[str], completions: list[str]) -> list[float | None]:
    """The gold judge's score of each pair (`demo.judge.gold_score`)."""
    return [judge.gold_score(p, c) for p, c in zip(prompts, completions, strict=True)]
