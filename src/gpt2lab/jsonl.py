"""Reading JSON Lines, shared by every command that takes JSONL (training data, prompts, datasets,
predictions): blank lines are skipped and a bad line is named as ``source:line``."""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from typing import Any


def json_lines(lines: Iterable[str], source: str) -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` for each non-blank line; ``ValueError`` names the first bad line."""
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{source}:{number}: not valid JSON ({exc.msg})") from None
        yield number, value


def json_objects(lines: Iterable[str], source: str) -> Iterator[tuple[int, dict[str, Any]]]:
    """Like :func:`json_lines`, and every value must be a JSON object."""
    for number, value in json_lines(lines, source):
        if not isinstance(value, dict):
            raise ValueError(f"{source}:{number}: expected a JSON object, got {type(value).__name__}")
        yield number, value
