"""The judgement log: JSON Lines, one line per judgement, appended and fsynced as each is made.

The log is never rewritten: each judgement is one ``write`` on an ``O_APPEND`` descriptor (the only
rewrite-like step is cutting a torn tail off at start-up), so it does not go through
:mod:`gpt2lab.atomic`, which replaces whole files.

Every record is self-contained (it names the sources it judged), so ``gpt2lab review summary LOG``
needs nothing else. A crash can at worst leave the last line torn (no newline, or not JSON): readers
skip it and :class:`JudgementLog` cuts it off before appending, so later lines stay whole.
Record fields are documented in docs/review.md.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path
from typing import Any

from ..readers import ReadError, parse_json

CHOICES = ("A", "B", "tie", "both-bad")
DECISIONS = ("accept", "reject", "edit")


def record_problem(rec: dict[str, Any]) -> str | None:
    """What makes ``rec`` not a judgement record (docs/review.md), or None when it is one.

    Checked on reading, so that ``summary``/``export``/``serve`` never count or append to another file
    (a review file given as the log, say) and a hand-edited log fails naming the line.
    """
    if rec.get("format") == "gpt2lab-review":
        return "this is a review file's header, not a judgement: give the log (default: REVIEW_FILE.log.jsonl)"
    if not isinstance(rec.get("reviewer"), str) or not isinstance(rec.get("item"), str):
        return "a judgement needs \"reviewer\" and \"item\" strings"
    mode = rec.get("mode")
    if mode == "pairwise":
        sources = rec.get("sources")
        if not (isinstance(sources, list) and len(sources) == 2 and all(isinstance(s, str) for s in sources)):
            return "a pairwise judgement needs \"sources\": [two source names]"
        if rec.get("choice") not in CHOICES:
            return f"\"choice\" must be one of {', '.join(CHOICES)}"
    elif mode == "ratings":
        scores = rec.get("scores")
        if not isinstance(rec.get("source"), str) or not isinstance(scores, dict) or not scores or not all(
                isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 5 for v in scores.values()):
            return "a ratings judgement needs \"source\" and \"scores\": {criterion: integer 1 to 5}"
    elif mode == "curation":
        decision = rec.get("decision")
        if decision not in DECISIONS or not isinstance(rec.get("row"), int):
            return f"a curation judgement needs \"row\" and \"decision\" ({', '.join(DECISIONS)})"
        if decision == "edit" and not isinstance(rec.get("text"), str):
            return "an edit judgement needs its \"text\""
    else:
        return f"\"mode\" must be pairwise, ratings or curation, got {mode!r}"
    if not isinstance(rec.get("flags", []), list) or not isinstance(rec.get("comment", ""), str):
        return "\"flags\" must be a list and \"comment\" a string"
    return None


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Every judgement of a log, in order; a torn last line is skipped.

    Raises ``FileNotFoundError``, or ``ValueError`` naming ``file:line`` for a bad line that is not the last
    or a whole line that is not a judgement record.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: log not found") from None
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a review log") from None
    return _parse(raw, str(path))[0]


def _parse(raw: bytes, source: str) -> tuple[list[dict[str, Any]], int]:
    """(records, byte length of the whole lines) of a log's bytes."""
    records: list[dict[str, Any]] = []
    good = 0
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, 1):
        last = number == len(lines)  # after the final newline: empty, or a line torn by a crash
        if not line.strip():
            good += len(line) + (0 if last else 1)
            continue
        try:
            value = parse_json(line.decode("utf-8"), source, line=number)
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            if last or (number == len(lines) - 1 and not lines[-1].strip()):
                break  # a torn tail: the judgement being written when the process died
            detail = str(exc).removeprefix(f"{source}:{number}: ") if isinstance(exc, ReadError) else exc
            raise ValueError(f"{source}:{number}: not a review log record ({detail})") from None
        if last:
            break  # no newline yet: not known to be complete
        problem = record_problem(value)
        if problem:
            raise ValueError(f"{source}:{number}: not a review log record ({problem})")
        records.append(value)
        good += len(line) + 1
    return records, good


class JudgementLog:
    """An append-only log file shared by the server's request handlers (thread-safe)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise ValueError(f"{self.path}: is a directory, not a review log")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        raw = self.path.read_bytes()
        self.records, good = _parse(raw, str(self.path))
        if good < len(raw):  # cut a torn tail off, or the next record would be glued to it
            os.ftruncate(self._fd, good)
            os.fsync(self._fd)

    def append(self, record: dict[str, Any]) -> None:
        """Write one record as one line and fsync it before returning."""
        line = (json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8")
        with self._lock:
            written = os.write(self._fd, line)  # O_APPEND: one write, at the end
            if written != len(line):  # a full disk: remove the partial line rather than leave it torn
                os.ftruncate(self._fd, os.fstat(self._fd).st_size - written)
                raise OSError(f"{self.path}: could not write the whole judgement (disk full?)")
            os.fsync(self._fd)
            self.records.append(record)

    def close(self) -> None:
        os.close(self._fd)
