"""The rlhf stage's reward sources (`rlhf.rewards`): what each one is, and the checks
that run on them before anything trains.

A source is a reward-model folder ("rm", the run's own, by default) or a Python
callable `module:function` that rates a batch,
`fn(prompts: list[str], completions: list[str]) -> list[float | None]`. A `train`
source enters the reward with its weight; an `audit` source is only logged, per step,
to watch what the training sources miss (TRL's reward_funcs and reward_weights, plus
a role). Calling a function, during the run and in the probe here, is
`engine.reward_functions.rate`.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pipeline.config import REQUIRED, SettingError, setting
from pipeline.errors import ConfigError, RewardFunctionError, quote
from stages.shared.judge import load_callable
from stages.shared.settings import check_model_folder

RUN_RM = "rm"
PROBE_COMPLETIONS = ("", "The answer is 4.")
"""Completions every probe prompt is rated with: an empty one, which a policy does
write, and a short plausible one."""
PROBE_PROMPTS = 4
DEFAULT_PROBE = "What is 2+2?"
"""Probed when the stage has no prompts to hand."""
BATCH_SIGNATURE = "fn(prompts: list[str], completions: list[str]) -> list[float | None]"


@dataclass(frozen=True)
class RewardSpec:
    source: str = setting(REQUIRED)
    """"rm" (the run's reward model), a reward-model folder, or `module:function`, a
    callable rating a batch: fn(prompts, completions) -> list[float | None], None for a
    completion it cannot rate."""
    weight: float = 1.0
    """This source's share of the reward (train sources; audit sources ignore it)."""
    role: Literal["train", "audit"] = "train"
    """train: in the reward. audit: logged per step, never in the gradient."""
    normalize: bool = True
    """Standardise this source by its own running mean and std before weighting, so
    weights compare sources on one scale; reward models use the held-out mean and std
    the RM stage stored instead."""
    name: str | None = setting(None, fingerprint=False)
    """Its metric name; null: "rm" for the run's RM, the folder's name for a folder,
    the function's name for a callable."""

    def __post_init__(self):
        if not self.source.strip():
            raise SettingError("source", 'must name "rm", a model folder or module:function')
        if self.role not in ("train", "audit"):
            raise SettingError("role", f"must be train or audit, got {self.role!r}")
        if not math.isfinite(self.weight):
            raise SettingError("weight", f"must be a finite number, got {self.weight}")
        if self.role == "train" and self.weight == 0:
            raise SettingError("weight", "is 0 for a train source; use role: audit to log a source without training on it")
        if self.name is not None and (not self.name or any(c.isspace() or c == "/" for c in self.name)):
            raise SettingError("name", f"must be a non-empty metric name without spaces or '/', got {self.name!r}")

    @property
    def metric_name(self) -> str:
        if self.name is not None:
            return self.name
        if kind(self) == "function":
            return self.source.partition(":")[2]
        return Path(os.path.abspath(os.path.expanduser(self.source))).name if self.source != RUN_RM else RUN_RM


def kind(spec: RewardSpec) -> Literal["model", "function"]:
    """model: "rm", a path (it has a "/") or an existing folder; function: `module:function`.
    Anything else is taken for a folder, so its check says the folder is missing."""
    source = spec.source
    if source == RUN_RM or "/" in source or Path(source).expanduser().is_dir():
        return "model"
    return "function" if ":" in source else "model"


def check_rewards(specs: tuple[RewardSpec, ...], key: str, probe_prompts: list[str]) -> None:
    """Refuse, with one line naming `key[i]`, reward sources that cannot work: none to
    train on, two with one metric name, a missing model folder, or a callable that
    cannot be imported, called as fn(prompts, completions), or rate a probe batch
    (up to 4 of `probe_prompts`, each with the completions in PROBE_COMPLETIONS)."""
    if not any(spec.role == "train" for spec in specs):
        raise ConfigError(f"{key}: no source has role train; at least one must make the reward")
    seen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        if spec.metric_name in seen:
            raise ConfigError(f"{key}[{i}].name: {spec.metric_name!r} is also the name of {key}[{seen[spec.metric_name]}]; set name: to tell them apart")
        seen[spec.metric_name] = i
    prompts = list(probe_prompts[:PROBE_PROMPTS]) or [DEFAULT_PROBE]
    for i, spec in enumerate(specs):
        if kind(spec) == "function":
            check_function(spec.source, f"{key}[{i}]", prompts)
        elif spec.source != RUN_RM:
            if not Path(spec.source).expanduser().is_dir():
                raise ConfigError(f"{key}[{i}].source: no such folder: {spec.source} (a callable is written module:function)")
            check_model_folder(spec.source, f"{key}[{i}].source", "classifier")


def check_function(source: str, key: str, prompts: list[str]) -> None:
    """Import `source`, check it can be called as fn(prompts, completions), and rate a
    probe batch with the same `rate` the run uses."""
    from engine.reward_functions import rate

    fn = load_callable(source, f"{key}.source")
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none to show; the probe still runs
        signature = None
    if signature is not None:
        try:
            signature.bind(prompts, PROBE_COMPLETIONS)
        except TypeError:
            raise ConfigError(f"{key}: {source}{signature} cannot be called as {BATCH_SIGNATURE}") from None
    for completion in PROBE_COMPLETIONS:
        try:
            rate(source, fn, prompts, [completion] * len(prompts))
        except RewardFunctionError as e:
            # A judge f(prompt, response) binds two lists as well; it shows itself here,
            # where its first try on lists raises or returns one number.
            if rates_one_pair(fn, prompts[0], completion):
                raise ConfigError(f"{key}: {source} rates one (prompt, response) pair at a time, like a judge; a reward source rates a batch: {BATCH_SIGNATURE}") from None
            where = "" if e.completion is None else f" on the probe prompt {quote(e.prompt)}" + (f" (completion {quote(e.completion)})" if e.completion else "")
            raise ConfigError(f"{key}: {e.source} {e.problem}{where}") from None


def rates_one_pair(fn, prompt: str, completion: str) -> bool:
    try:
        out = fn(prompt, completion)
    except (Exception, SystemExit):
        return False
    return out is None or isinstance(out, (int, float))
