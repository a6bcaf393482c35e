"""The fallbacks a stage takes: a slower or different path than the one asked for (unmerged
sampling, plain packing, a check that could not run). Each is said once in the log and kept
for the stage's manifest: a stage returns `fallbacks.taken` as its metrics' "fallbacks"."""

from __future__ import annotations

from collections.abc import Callable


class Fallbacks:
    def __init__(self, stage: str, log: Callable[[str], None] = print):
        self.stage = stage
        self.log = log
        self.taken: list[str] = []

    def __call__(self, message: str) -> None:
        if message not in self.taken:
            self.taken.append(message)
            self.log(f"[{self.stage}] fallback: {message}")
