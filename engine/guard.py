"""Stopping a run that has started to game its reward: over-optimisation (the train
reward still rising while an audit score falls, Gao et al. 2023's picture) and
collapse (answers shrinking to a few tokens, as the demo does at high learning
rates). Both read the metrics history only, so a resumed run reaches the same
verdict at the same step. Off unless `rlhf.guard` names what to watch.
"""

from __future__ import annotations


def slope(values: list[float]) -> float:
    """The least-squares slope of `values` against 0, 1, 2, ...: a trend that one noisy
    step does not flip."""
    n = len(values)
    mean_x, mean_y = (n - 1) / 2, sum(values) / n
    spread = sum((x - mean_x) ** 2 for x in range(n))
    return sum((x - mean_x) * (y - mean_y) for x, y in enumerate(values)) / spread if spread else 0.0


def verdict(history: list[dict], settings) -> str | None:
    """Why the run should stop after the last row of `history`, or None. `settings` is
    the rlhf.guard section: audit (an audit source's name), window, min_length."""
    if settings is None or len(history) < settings.window:
        return None
    recent = history[-settings.window :]
    if settings.audit is not None:
        key = f"reward/{settings.audit}"
        audit = [row[key] for row in recent if row.get(key) is not None]
        train = [row["objective/scores"] for row in recent]
        if len(audit) == len(recent) and slope(train) > 0 and slope(audit) < 0:
            return f"over-optimisation: over the last {settings.window} steps the train reward rose ({slope(train):+.3f}/step) while {key} fell ({slope(audit):+.3f}/step)"
    if settings.min_length is not None:
        length = sum(row["response/length"] for row in recent) / len(recent)
        if length < settings.min_length:
            return f"collapse: responses averaged {length:.1f} tokens over the last {settings.window} steps (rlhf.guard.min_length {settings.min_length})"
    return None
