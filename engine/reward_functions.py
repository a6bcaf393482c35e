"""Calling a reward function named in the config: one batch in, one rating per
completion out, and a one-line error naming the prompt when the function misbehaves.

A reward function is `fn(prompts: list[str], completions: list[str]) -> list[float | None]`,
where a prompt is the text of the chat prompt's last user message and a completion
the decoded response (special tokens skipped, stripped). None means "cannot rate this
completion": it becomes NaN here, and the caller decides what an unrated completion
gets. True and False count as 1 and 0, since checkers often answer that way. The
rlhf stage probes each function with this same `rate` before training, so the checks
before and during the run cannot drift apart.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence

import torch

from pipeline.errors import RewardFunctionError

# A finite float64 beyond this turns into inf in the float32 ratings.
FLOAT32_MAX = torch.finfo(torch.float32).max


def rate(name: str, fn: Callable, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
    """(n,) float32 ratings of each (prompt, completion) pair by `fn`, NaN where it
    returned None; RewardFunctionError, naming `name` and the prompt, on anything else."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts but {len(completions)} completions")
    n = len(prompts)
    if n == 0:
        return torch.empty(0)
    try:
        # Copies: a function that edits its arguments must not edit the caller's.
        out = fn(list(prompts), list(completions))
    except (Exception, SystemExit) as e:  # a sys.exit() in user code is its failure, not the run's exit
        raise culprit(name, fn, prompts, completions, e) from e
    if not isinstance(out, (list, tuple)):
        raise RewardFunctionError(name, f"returned {show(out)}, not a list of {n} ratings", prompts[0])
    if len(out) != n:
        raise RewardFunctionError(name, f"returned {len(out)} ratings for {n} completions", prompts[0])
    ratings = []
    for value, prompt, completion in zip(out, prompts, completions):
        if value is None:
            ratings.append(math.nan)
            continue
        # bool is an int, so checkers' True/False pass here as 1/0.
        if not isinstance(value, numbers.Real):
            raise RewardFunctionError(name, f"returned {show(value)}, not a number or None", prompt, completion)
        x = float(value)
        if not math.isfinite(x) or abs(x) > FLOAT32_MAX:
            raise RewardFunctionError(name, f"returned {x!r}, not a finite number (None says it cannot rate one)", prompt, completion)
        ratings.append(x)
    return torch.tensor(ratings, dtype=torch.float32)


def culprit(name: str, fn: Callable, prompts: Sequence[str], completions: Sequence[str], error: BaseException) -> RewardFunctionError:
    """The error for `fn` raising `error` on a batch, naming the first pair that makes it
    raise alone: the batch call cannot say which one did. Runs only when the run is
    stopping anyway, so the extra calls cost nothing that matters."""
    if len(prompts) == 1:
        return RewardFunctionError(name, f"raised {show_error(error)}", prompts[0], completions[0])
    for prompt, completion in zip(prompts, completions):
        try:
            fn([prompt], [completion])
        except (Exception, SystemExit) as e:
            return RewardFunctionError(name, f"raised {show_error(e)}", prompt, completion)
    return RewardFunctionError(name, f"raised {show_error(error)} on the whole batch but on no pair alone", prompts[0])


def prompt_text(messages: list[dict]) -> str:
    """What a reward function sees of a chat prompt: its last user message."""
    for message in reversed(messages):
        if message.get("role") == "user":
            return message["content"]
    return messages[-1]["content"] if messages else ""


def show(value) -> str:
    text = repr(value)
    text = text if len(text) <= 60 else text[:57] + "..."
    return f"{text} (a {type(value).__name__})"


def show_error(error: BaseException) -> str:
    text = repr(error)
    return text if len(text) <= 200 else text[:197] + "..."
