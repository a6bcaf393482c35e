"""Tests for the demo task (`demo`): standard library and pytest only, no ML stack."""

from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def read_jsonl(path: Path) -> list[dict]:
    assert path.is_file(), f"missing {path}"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
