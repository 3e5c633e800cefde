"""The one JSONL reader behind training data, prompts, augmentation datasets and predictions."""

from __future__ import annotations

import pytest

from gpt2lab.jsonl import json_lines, json_objects


def test_numbers_lines_and_skips_blanks():
    lines = ['{"a": 1}', "", "   ", "[2, 3]", '"text"']
    assert list(json_lines(lines, "f.jsonl")) == [(1, {"a": 1}), (4, [2, 3]), (5, "text")]


def test_bad_line_is_named():
    with pytest.raises(ValueError, match=r"^f\.jsonl:3: not valid JSON \("):
        list(json_lines(['{"a": 1}', "", '{"a": '], "f.jsonl"))


def test_objects_only():
    assert list(json_objects(['{"x": "y"}'], "d")) == [(1, {"x": "y"})]
    with pytest.raises(ValueError, match=r"^d:2: expected a JSON object, got list$"):
        list(json_objects(['{"x": 1}', "[1]"], "d"))
