"""Loading a gold judge (or any callable) named as `module:function`, and the reward
model's score statistics: what both the rlhf and the eval stage read.

A judge is any function `judge(prompt: str, response: str) -> float | None`; None
means it cannot rate that prompt. The demo's is `demo.judge:gold_score`.
"""

from __future__ import annotations

import importlib
import inspect
import json
import math
import numbers
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import ConfigError, quote

MOVED = {"pipeline.demo_judge": "demo.judge"}
"""Modules that held a judge in earlier releases, so an old config gets told where it went."""


def load_judge(spec: str | None, key: str) -> Callable[[str, str], float | None] | None:
    """The judge function named `module:function`, or a ConfigError naming `key`."""
    return None if spec is None else load_callable(spec, key)


PROBE_RESPONSES = ("", "The answer is 4.")
"""Responses a judge is tried on before anything runs: an empty one, which a policy does
write, and a short plausible one."""


def probe_judge(spec: str | None, key: str, prompts: list[str], parts: bool = False) -> None:
    """Load the judge (or, with `parts`, the criteria function) named `spec` and try it on
    up to 4 of `prompts` with each probe response, so one that cannot be called as
    judge(prompt, response), raises or returns the wrong thing is refused before the
    stage's upstream trains, not after the eval stage has sampled everything."""
    fn = load_judge(spec, key)
    if fn is None:
        return
    try:
        inspect.signature(fn).bind("prompt", "response")
    except TypeError:
        raise ConfigError(f"{key}: {spec}{inspect.signature(fn)} cannot be called as {spec.partition(':')[2]}(prompt: str, response: str)") from None
    except ValueError:  # a builtin without a signature: its call below tells
        pass
    for prompt in prompts[:4] or ["What is 2+2?"]:
        for response in PROBE_RESPONSES:
            judged(fn, spec, key, prompt, response, parts)


def judged(fn: Callable, spec: str, key: str, prompt: str, response: str, parts: bool = False):
    """fn(prompt, response), checked: a finite number or None (with `parts`: a dict of
    names to finite numbers or bools, or None). Anything else, or an exception, is one
    line naming `key` and the prompt: a judge is user input."""
    try:
        value = fn(prompt, response)
    except (Exception, SystemExit) as e:  # a sys.exit() in a judge is its failure, not the run's exit
        raise ConfigError(f"{key}: {spec} raised {e!r} on prompt {quote(prompt)} (response {quote(response)})") from None
    problem = _parts_problem(value) if parts else None if value is None else _number_problem(value)
    if problem:
        wanted = "a dict of names to numbers or bools, or None" if parts else "a finite number or None"
        raise ConfigError(f"{key}: {spec} returned {problem}, not {wanted}, on prompt {quote(prompt)} (response {quote(response)})")
    return value


def _number_problem(value) -> str | None:
    if isinstance(value, bool):
        return None
    if not isinstance(value, numbers.Real):
        return f"a {type(value).__name__}"
    return None if math.isfinite(value) else repr(float(value))


def _parts_problem(value) -> str | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        return f"a {type(value).__name__}"
    for name, part in value.items():
        problem = _number_problem(part) if part is not None else None
        if not isinstance(name, str) or problem:
            return f"{problem or 'a non-string name'} for part {name!r}"
    return None


def load_callable(spec: str, key: str) -> Callable:
    """The callable named `module:function` (a judge or a reward function), or a
    one-line ConfigError naming `key`."""
    module_name, _, name = spec.partition(":")
    if not module_name or not name:
        raise ConfigError(f"{key}: expected module:function, got {spec!r}")
    if module_name in MOVED:
        raise ConfigError(f"{key}: {module_name} moved to {MOVED[module_name]}; write {MOVED[module_name]}:{name}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ConfigError(f"{key}: cannot import {module_name!r}: {e}") from None
    except (Exception, SystemExit) as e:  # the module's own code failed as it loaded (a sys.exit too): still one line
        raise ConfigError(f"{key}: importing {module_name!r} raised {e!r}") from None
    if not hasattr(module, name):
        raise ConfigError(f"{key}: {module_name!r} has no function {name!r}")
    found = getattr(module, name)
    if not callable(found):
        raise ConfigError(f"{key}: {module_name}:{name} is not callable (type {type(found).__name__})")
    return found


def reward_stats(rm_dir: Path) -> tuple[float, float] | None:
    """The held-out reward mean and std the RM stage stored in its manifest."""
    manifest = rm_dir / "manifest.json"
    if not manifest.is_file():
        return None
    metrics = json.loads(manifest.read_text()).get("metrics", {})
    if "reward_mean" not in metrics or not metrics.get("reward_std"):
        return None
    return float(metrics["reward_mean"]), float(metrics["reward_std"])
