"""Benchmarks and measurements (`python -m bench.<name>`); bench/RESULTS.md holds what they printed."""

from __future__ import annotations

import argparse
from pathlib import Path


def require_finished(parser: argparse.ArgumentParser, folder: Path, label: str) -> None:
    """Stop with one line unless `folder` is a finished stage (its manifest is written last)."""
    if not (folder / "manifest.json").is_file():
        parser.error(f"{label}: not a finished stage folder (no manifest.json)")


def default_config(parser: argparse.ArgumentParser, overrides: list[str]):
    """configs/default.yaml with `overrides`, checked as the CLI checks them: a bad key, value
    or file stops with one line before anything loads a model."""
    from pipeline import config as configuration
    from pipeline.errors import ConfigError
    from stages import config_classes

    try:
        return configuration.load("configs/default.yaml", overrides, config_classes())
    except ConfigError as error:
        parser.error(str(error))
