"""The two kinds of failure the CLI tells apart by exit code."""

from __future__ import annotations


class ConfigError(Exception):
    """A problem with the user's configuration or input, found before training: the CLI
    prints it as one line and exits 2, having overwritten nothing."""


class TrainingDiverged(Exception):
    """Training produced a non-finite loss or score. Not bad input: the CLI prints it
    and exits 3; the stage's last good checkpoint stays in its work folder."""


EXIT_BAD_INPUT = 2
EXIT_DIVERGED = 3
