"""The two kinds of failure the CLI tells apart by exit code."""

from __future__ import annotations


class ConfigError(Exception):
    """A problem with the user's configuration or input, found before training: the CLI
    prints it as one line and exits 2, having overwritten nothing."""


class RewardFunctionError(ConfigError):
    """A reward function named in the config returned something other than one finite
    number (or None) per completion, or raised. The function is user input, so like bad
    input the CLI prints one line and exits 2; mid-run, the stage's last good checkpoint
    stays in its work folder. `completion` is None when the fault is the whole batch's
    (its type or length), and `prompt` is then the batch's first."""

    def __init__(self, source: str, problem: str, prompt: str, completion: str | None = None):
        self.source, self.problem, self.prompt, self.completion = source, problem, prompt, completion
        where = f"(a batch starting with prompt {quote(prompt)})" if completion is None else f"on prompt {quote(prompt)} (completion {quote(completion)})"
        super().__init__(f"reward function {source} {problem} {where}")

    def __reduce__(self):  # the default would call __init__ with the message alone
        return type(self), (self.source, self.problem, self.prompt, self.completion)


def quote(text: str, limit: int = 80) -> str:
    """`text` quoted on one line whatever it holds, cut to about `limit` characters."""
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


class TrainingDiverged(Exception):
    """Training produced a non-finite loss or score. Not bad input: the CLI prints it
    and exits 3; the stage's last good checkpoint stays in its work folder."""


EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
