from __future__ import annotations

import pytest

from demo import prompts


@pytest.fixture(scope="session")
def sets():
    """The default prompt sets {"rank", "rl", "eval"}."""
    return prompts.split_prompts()
