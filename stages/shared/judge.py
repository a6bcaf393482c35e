"""Loading a gold judge (or any callable) named as `module:function`, and the reward
model's score statistics: what both the rlhf and the eval stage read.

A judge is any function `judge(prompt: str, response: str) -> float | None`; None
means it cannot rate that prompt. The demo's is `demo.judge:gold_score`.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path

from pipeline.errors import ConfigError

MOVED = {"pipeline.demo_judge": "demo.judge"}
"""Modules that held a judge in earlier releases, so an old config gets told where it went."""


def load_judge(spec: str | None, key: str) -> Callable[[str, str], float | None] | None:
    """The judge function named `module:function`, or a ConfigError naming `key`."""
    return None if spec is None else load_callable(spec, key)


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
    except Exception as e:  # the module's own code failed as it loaded: still one line
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
