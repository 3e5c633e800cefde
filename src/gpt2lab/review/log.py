"""The judgement log: JSON Lines, one line per judgement, appended and fsynced as each is made.

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


def read_log(path: str | Path) -> list[dict[str, Any]]:
    """Every judgement of a log, in order; a torn last line is skipped.

    Raises ``FileNotFoundError``, or ``ValueError`` naming ``file:line`` for a bad line that is not the last.
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
            value = json.loads(line.decode("utf-8"))
            if not isinstance(value, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as exc:
            if last or (number == len(lines) - 1 and not lines[-1].strip()):
                break  # a torn tail: the judgement being written when the process died
            raise ValueError(f"{source}:{number}: not a review log record ({exc})") from None
        if last:
            break  # no newline yet: not known to be complete
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
