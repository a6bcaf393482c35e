"""The Stage record: everything the runner knows about a stage. The registry of the
project's stages is `stages/__init__.py`; the framework takes it as an argument and
imports no stage itself.

Every stage module follows the same shape:

    XConfig                                  frozen dataclass, the YAML section `x:`
    check(cfg) -> None                       validate inputs (data files, ...) before anything runs
    run(cfg, inputs, out_dir, seed) -> dict  build the checkpoint in out_dir, return its metrics
                                             (a "fallbacks" list among them goes to the manifest)
    headline(metrics) -> str                 one line for logs and `make status`

`inputs` maps each parent stage to the folder to read (the run's checkpoint, or the
folder the user named with `init_from`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str
    config: type
    inputs: tuple[str, ...]
    """Parent stages."""
    check: Callable
    run: Callable
    headline: Callable
    input_settings: tuple[str, ...] = ("init_from",)
    """Config keys naming a folder that replaces the parent at the same position."""
    main_only: bool = False
    """Runs on the main process alone when launched on several (nothing to train)."""
    card: bool = False
    """Its folder is a model: it gets a model card, README.md, written from its manifest
    (replacing the Trainer's), refreshed with the figures of a later stage that evaluates it."""
    optional: bool = False
    """Part of a run only when its config names its section (or it is run by name); a
    stage that reads it as a parent then reads it, and otherwise does without."""
    publish: Callable | None = None
    """publish(folder), whenever a run finds the finished folder in place (built or
    reused): writes what lives outside it (the eval report's copy at the top of the
    run), so that never runs ahead of the folder nor stays behind it."""
