"""Printing text that came from a file, a model or a user: as text, never as markup or terminal control.

Everything gpt2lab prints for the operator goes through here (the commands' output and errors, ``gpt2lab
chat``'s replies, ``generate``'s and ``story``'s streams, the tables of ``review summary``, ``eval``
and ``explore``), so one rule holds everywhere:

* **Where the output is a terminal**, control characters other than newline and tab -- the C0 controls
  (ESC, and with it every CSI/OSC/DCS sequence: colours, cursor moves, window titles, clipboard writes),
  DEL and the C1 controls (the 8-bit CSI ``U+009B`` ...) -- are shown as ``\\u001b``-style escapes, so a
  text cannot recolour, rewrite, hide or retitle what the operator sees; ``\\r\\n`` shows as a newline.
  The escapes keep a JSON line valid JSON.
  So are the bidirectional overrides/isolates and U+2028/U+2029, which reorder or split a shown line.
* **Where it is a file or a pipe**, text is written exactly as it is: generated text is data
  (``gpt2lab generate "..." > out.txt`` keeps every character the model wrote, control characters
  included), and whatever reads it decides what to do with them.
* **Nothing is read as rich markup**: tables are built from :class:`rich.text.Text` cells, so a reviewer
  comment ``[/b]`` is the four characters it is.

Light to import (rich loads only for tables), so the CLI's error path can use it.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import IO, TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.text import Text

# C0/DEL/C1 controls, plus what reorders or splits a terminal's line without being a control: the bidirectional
# embeddings, overrides and isolates (U+202A-E, U+2066-9: "Trojan Source" text that reads otherwise than it is)
# and the line/paragraph separators U+2028/9
_REORDERING = "\u2028\u2029\u202a-\u202e\u2066-\u2069"  # a character class's body, shared by both patterns
_CONTROL = re.compile(f"\r\n|[\x00-\x08\x0b-\x1f\x7f-\x9f{_REORDERING}]")


def escape_controls(text: str) -> str:
    """``text`` with every control character but newline and tab written as a ``\\uXXXX`` escape
    (``"\\r\\n"`` becomes ``"\\n"``): what a terminal may be shown."""
    return _CONTROL.sub(lambda m: "\n" if m.group() == "\r\n" else f"\\u{ord(m.group()):04x}", text)


# a log line: every control character, newline and tab included, and the same reordering characters as above
_LOG_CONTROL = re.compile(f"[\x00-\x1f\x7f-\x9f{_REORDERING}]")


def log_text(text: object) -> str:
    """``text`` (a client's request id, a URL path, an error quoting a request) as one line of a log: every
    control character, newline and tab included, the line separators and the bidirectional overrides written
    as a ``\\uXXXX`` escape (backslashes doubled first, so an escape a client wrote is not mistaken for one), so that it
    can neither start a fake log line nor send the terminal tailing the log an escape sequence."""
    return _LOG_CONTROL.sub(lambda m: f"\\u{ord(m.group()):04x}", str(text).replace("\\", "\\\\"))


def is_terminal(stream: IO[str] | None) -> bool:
    """Whether ``stream`` is an interactive terminal (False for files, pipes and closed streams)."""
    try:
        return bool(stream is not None and stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


def shown(text: str, stream: IO[str] | None = None) -> str:
    """``text`` as it may be written to ``stream`` (default stdout): controls escaped on a terminal,
    unchanged anywhere else."""
    return escape_controls(text) if is_terminal(stream if stream is not None else sys.stdout) else text


def write(text: str, stream: IO[str] | None = None, *, flush: bool = True) -> None:
    """Write ``text`` to ``stream`` (default stdout) under the rule of this module; flushed by default, as
    streamed text should be seen at once."""
    stream = stream if stream is not None else sys.stdout
    stream.write(shown(text, stream))
    if flush:
        stream.flush()


def echo(text: str = "", stream: IO[str] | None = None) -> None:
    """``print(text)`` to ``stream`` (default stdout) under the rule of this module."""
    write(f"{text}\n", stream)


def error(message: str) -> None:
    """``gpt2lab: error: message`` on stderr, the one line every command fails with."""
    echo(f"gpt2lab: error: {message}", sys.stderr)


def cell(text: Any, stream: IO[str] | None = None, style: str | None = None) -> Text:
    """A table cell or title holding ``text`` literally (never markup), controls escaped when ``stream``
    (default stdout) is a terminal."""
    from rich.text import Text

    if isinstance(text, Text):
        return text
    return Text(shown(str(text), stream), style=style or "")


def print_table(title: str, head: Sequence[str], rows: Sequence[Sequence[Any]], *,
                stream: IO[str] | None = None, width: int | None = None) -> None:
    """A rich table on ``stream`` (default stdout): the first column left-aligned, the others right-aligned;
    every title, header and cell is literal text (a :class:`rich.text.Text` cell passes as it is, for a
    caller's own styling). ``width``: the console width when ``stream`` is not a terminal (rich's default
    is 80 columns)."""
    from rich.table import Table

    stream = stream if stream is not None else sys.stdout
    table = Table(title=cell(title, stream))
    for i, name in enumerate(head):
        table.add_column(cell(name, stream), justify="left" if i == 0 else "right")
    for row in rows:
        table.add_row(*(cell(value, stream) for value in row))
    console(stream, width=width).print(table)


def console(stream: IO[str] | None = None, *, width: int | None = None):  # noqa: ANN201 - rich's Console
    """A rich ``Console`` on ``stream`` (default stdout) that reads no markup and highlights nothing;
    ``width`` applies when ``stream`` is not a terminal."""
    from rich.console import Console

    stream = stream if stream is not None else sys.stdout
    return Console(file=stream, markup=False, highlight=False, emoji=False,
                   width=None if is_terminal(stream) else width)


class _Bar:
    """What :func:`progress_bar` yields: ``bar(n)`` advances by ``n``, ``bar.update(done, total)`` sets."""

    def __init__(self, progress: Any = None, task: Any = None) -> None:
        self._progress, self._task = progress, task

    def __call__(self, n: int = 1) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, n)

    def update(self, completed: int, total: int | None = None) -> None:
        if self._progress is not None:
            self._progress.update(self._task, completed=completed, **({} if total is None else {"total": total}))


@contextmanager
def progress_bar(total: int | None, description: str, enabled: bool | None = None) -> Iterator[_Bar]:
    """A progress bar on stderr (removed when done) for ``total`` steps; yields a callable ``advance(n)``
    (with ``.update(completed, total)``). ``enabled``: default, only where stderr is a terminal (a log
    file gets no bar); a no-op when off. ``description`` is shown literally. Nothing else should be
    printed while the bar runs (it would be drawn over): let errors leave the ``with`` block first."""
    if enabled is None:  # a dumb terminal cannot redraw a line: rich would leave blank lines
        enabled = is_terminal(sys.stderr) and os.environ.get("TERM") not in ("dumb", "unknown")
    if not enabled:
        yield _Bar()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}", markup=False), BarColumn(), MofNCompleteColumn(),
               TimeRemainingColumn())
    # redirect_*: rich would capture what is printed meanwhile, and print it unescaped
    with Progress(*columns, console=console(sys.stderr), transient=True, redirect_stdout=False,
                  redirect_stderr=False) as bar:
        yield _Bar(bar, bar.add_task(escape_controls(description), total=total))
