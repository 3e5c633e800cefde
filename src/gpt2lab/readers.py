"""The one reader of each input format (plain text, JSON Lines, CSV/TSV), shared by every command.

Training data, fine-tuning data, augment datasets, prompt files and evaluation files all come through
here, so they follow the same rules:

* UTF-8, with or without a byte-order mark (``utf-8-sig``); a file with a NUL byte near its start is
  refused as binary.
* Lines end at ``\\n`` only (a ``\\r`` before it is dropped). U+2028, U+2029, U+0085, form feeds and
  the other characters :meth:`str.splitlines` also splits on are ordinary characters: they are legal
  inside JSON strings and CSV fields.
* Invalid UTF-8 is an error naming ``file:line`` (``errors="strict"``, the default) or, where the docs
  say so (training data), each invalid byte becomes U+FFFD and is counted in :class:`ReadStats`.
* Memory stays bounded whatever the line lengths: plain text is read in chunks
  (:func:`iter_text_chunks`), and a JSONL or CSV line longer than ``max_line_bytes`` is an error.
* CSV is parsed strictly: a quote that is never closed (it would swallow the rest of the file) or
  text after a closing quote is an error naming the line where the record starts.

Formats are looked up by suffix in :data:`FORMATS`; :func:`read_records` reads any of them as
``(line, record)`` pairs. Other modules can add formats with :func:`register_format`.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BOM = codecs.BOM_UTF8
MAX_LINE_BYTES = 256 << 20  # one JSONL record / CSV line; longer is refused rather than read whole
CHUNK_CHARS = 1 << 18  # plain text reaches the tokenizer in pieces of about this many characters
_BINARY_PROBE = 1 << 16
_ESCAPED = re.compile("[\udc80-\udcff]")  # bytes the "surrogateescape" handler could not decode


class ReadError(ValueError):
    """A file that cannot be read as its format says; the message names ``file:line`` and the problem."""


@dataclass
class ReadStats:
    """What lenient reading did: invalid UTF-8 bytes replaced by U+FFFD."""

    replaced_bytes: int = 0


Record = tuple[int, Any]  # (1-based line where the record starts, the record)


# -- bytes to text -------------------------------------------------------------------------------------
def _open_binary(path: Path):
    path = Path(path)
    if path.is_dir():
        raise ReadError(f"{path}: is a directory, not a file")
    try:
        fh = open(path, "rb", buffering=_BINARY_PROBE)  # noqa: SIM115 - the callers close it
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except OSError as exc:
        raise ReadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    head = fh.peek(_BINARY_PROBE)[:_BINARY_PROBE]
    nul = head.find(b"\x00")
    if nul >= 0:
        fh.close()
        raise ReadError(f"{path}: looks like a binary file, not UTF-8 text (NUL byte at offset {nul})")
    if head.startswith(BOM):
        fh.read(len(BOM))
    return fh


def decode(raw: bytes, where: str, errors: str = "strict", stats: ReadStats | None = None) -> str:
    """UTF-8 ``raw`` as text. ``errors="strict"``: :class:`ReadError` naming ``where`` and the byte;
    ``"replace"``: each invalid byte becomes U+FFFD, counted in ``stats``."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if errors == "strict":
            raise ReadError(f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                            "convert the file first, e.g. `iconv -f latin1 -t utf-8`") from None
    text = raw.decode("utf-8", errors="surrogateescape")
    return _replace_escaped(text, stats)


def _replace_escaped(text: str, stats: ReadStats | None) -> str:
    if stats is not None:
        stats.replaced_bytes += len(_ESCAPED.findall(text))
    return _ESCAPED.sub("\ufffd", text)


def iter_raw_lines(path: str | os.PathLike[str], *, max_line_bytes: int = MAX_LINE_BYTES
                   ) -> Iterator[tuple[int, bytes]]:
    """``(line number, bytes)`` of each line, split on ``\\n`` only, without the ``\\n`` / ``\\r\\n``.

    A line longer than ``max_line_bytes`` is a :class:`ReadError` (it is never held whole).
    """
    path = Path(path)
    with _open_binary(path) as fh:
        number = 0
        while True:
            raw = fh.readline(max_line_bytes + 1)
            if not raw:
                return
            number += 1
            if len(raw) > max_line_bytes and not raw.endswith(b"\n"):
                raise ReadError(f"{path}:{number}: line longer than {max_line_bytes:,} bytes; "
                                "split the file into shorter records")
            yield number, raw.removesuffix(b"\n").removesuffix(b"\r")


def iter_lines(path: str | os.PathLike[str], *, errors: str = "strict", stats: ReadStats | None = None,
               max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, str]]:
    """``(line number, text)`` of each line (split on ``\\n`` only; BOM dropped; no line ending)."""
    for number, raw in iter_raw_lines(path, max_line_bytes=max_line_bytes):
        yield number, decode(raw, f"{path}:{number}", errors, stats)


def read_text(path: str | os.PathLike[str], *, errors: str = "strict", stats: ReadStats | None = None) -> str:
    """A whole text file (BOM dropped); invalid UTF-8 is an error naming the line, or replaced and counted."""
    path = Path(path)
    with _open_binary(path) as fh:
        raw = fh.read()
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        if errors == "strict":
            line = raw.count(b"\n", 0, exc.start) + 1
            column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
            raise ReadError(f"{path}:{line}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {column}); "
                            "convert the file first, e.g. `iconv -f latin1 -t utf-8`") from None
    return _replace_escaped(raw.decode("utf-8", errors="surrogateescape"), stats)


def split_text(text: str, chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """``text`` in pieces of at most about ``chunk_chars`` characters, cut where tokens do not change.

    A cut goes after the last newline of a piece, else before its last whitespace character (GPT-2's
    pre-tokenizer never joins a word to the whitespace before it across such a cut), else anywhere.
    The pieces concatenate to ``text``.
    """
    start = 0
    while len(text) - start > chunk_chars:
        cut = _cut(text, start, start + chunk_chars)
        yield text[start:cut]
        start = cut
    if start < len(text):
        yield text[start:]


def _cut(text: str, start: int, end: int) -> int:
    low = start + max(1, (end - start) // 2)
    newline = text.rfind("\n", low, end)
    if newline >= 0:
        return newline + 1
    for i in range(end - 1, low - 1, -1):  # the last whitespace character, scanned from the end
        if text[i].isspace():
            return i
    return end


def iter_text_chunks(path: str | os.PathLike[str], *, errors: str = "replace", stats: ReadStats | None = None,
                     chunk_chars: int = CHUNK_CHARS) -> Iterator[str]:
    """A text file as pieces of about ``chunk_chars`` characters (see :func:`split_text`), read in
    bounded memory whatever its line lengths. Invalid UTF-8 is replaced and counted (or an error)."""
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")(errors="surrogateescape")
    buffer = ""
    line = 1  # for strict errors: the line the buffer starts on
    with _open_binary(path) as fh:
        while True:
            block = fh.read(chunk_chars)
            final = not block
            buffer += decoder.decode(block, final=final)
            if _ESCAPED.search(buffer):
                if errors == "strict":
                    bad = _ESCAPED.search(buffer).start()
                    raise ReadError(f"{path}:{line + buffer.count(chr(10), 0, bad)}: not valid UTF-8 (byte "
                                    f"0x{ord(buffer[bad]) - 0xdc00:02x})")
                buffer = _replace_escaped(buffer, stats)
            while len(buffer) > chunk_chars or (final and buffer):
                cut = _cut(buffer, 0, chunk_chars) if len(buffer) > chunk_chars else len(buffer)
                piece, buffer = buffer[:cut], buffer[cut:]
                line += piece.count("\n")
                yield piece
            if final:
                return


# -- records -------------------------------------------------------------------------------------------
def iter_jsonl(path: str | os.PathLike[str], *, errors: str = "strict", stats: ReadStats | None = None,
               max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[Record]:
    """``(line number, value)`` for each non-blank line; a bad line is a :class:`ReadError` naming it."""
    for number, line in iter_lines(path, errors=errors, stats=stats, max_line_bytes=max_line_bytes):
        if not line.strip():
            continue
        try:
            value = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ReadError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
        yield number, value


def iter_csv(path: str | os.PathLike[str], *, delimiter: str = ",", errors: str = "strict",
             stats: ReadStats | None = None, max_line_bytes: int = MAX_LINE_BYTES
             ) -> tuple[list[str], Iterator[Record]]:
    """The header and ``(line number, {column: value})`` of each data row of a CSV/TSV file.

    Empty rows are skipped. A row with another number of fields than the header, a quote never
    closed, or text after a closing quote is a :class:`ReadError` naming the row's first line.
    """
    path = Path(path)
    lines = iter_lines(path, errors=errors, stats=stats, max_line_bytes=max_line_bytes)
    csv.field_size_limit(max(csv.field_size_limit(), max_line_bytes))
    # csv wants the line endings: it reads on to the next line inside a quoted field
    reader = csv.reader((line + "\n" for _, line in lines), delimiter=delimiter, strict=True)

    def rows() -> Iterator[tuple[int, list[str]]]:
        while True:
            start = reader.line_num + 1
            try:
                values = next(reader)
            except StopIteration:
                return
            except csv.Error as exc:
                if "unexpected end of data" in str(exc):
                    raise ReadError(f"{path}:{start}: malformed CSV: the quoted field opened in this row is "
                                    "never closed (it would swallow every later row)") from None
                raise ReadError(f"{path}:{start}: malformed CSV ({exc}; line {reader.line_num})") from None
            if values:
                yield start, values

    it = rows()
    first = next(it, None)
    if first is None or not any(h.strip() for h in first[1]):
        raise ReadError(f"{path}: empty CSV file (no header row)")
    header = first[1]
    dupes = sorted({h for h in header if header.count(h) > 1})
    if dupes:
        raise ReadError(f"{path}: duplicate column name(s) in the header: {', '.join(dupes)}")

    def records() -> Iterator[Record]:
        for number, values in it:
            if len(values) != len(header):
                raise ReadError(f"{path}:{number}: {len(values)} fields, the header has {len(header)} "
                                "(a stray delimiter or quote?)")
            yield number, dict(zip(header, values))

    return header, records()


FORMATS: dict[str, str] = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl",
                           ".csv": "csv", ".tsv": "tsv"}
RecordReader = Callable[..., Iterator[Record]]
_READERS: dict[str, RecordReader] = {
    "txt": iter_lines,
    "jsonl": iter_jsonl,
    "csv": lambda path, **kw: iter_csv(path, delimiter=",", **kw)[1],
    "tsv": lambda path, **kw: iter_csv(path, delimiter="\t", **kw)[1],
}


def register_format(name: str, reader: RecordReader, suffixes: tuple[str, ...] = ()) -> None:
    """Add a format: ``reader(path, errors=..., stats=...)`` yields ``(line, record)`` pairs."""
    _READERS[name] = reader
    for suffix in suffixes:
        FORMATS[suffix.lower()] = name


def format_of(path: str | os.PathLike[str]) -> str | None:
    """The format name for ``path``'s suffix (``"txt"``, ``"jsonl"``, ``"csv"``, ``"tsv"``, ...), or None."""
    name = Path(path).name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):  # ".jsonl.gz" before ".gz"
        if name.endswith(suffix):
            return FORMATS[suffix]
    return None


def read_records(path: str | os.PathLike[str], format: str | None = None, *, errors: str = "strict",
                 stats: ReadStats | None = None) -> Iterator[Record]:
    """``(line, record)`` pairs of any registered format: a line's text (txt), a JSON value (jsonl), a
    ``{column: value}`` dict (csv/tsv). ``format`` defaults to the one of the suffix."""
    fmt = format or format_of(path)
    if fmt not in _READERS:
        raise ReadError(f"{path}: unknown format {fmt or Path(path).suffix or '(no suffix)'!r}; "
                        f"use one of {', '.join(sorted(FORMATS))}")
    return _READERS[fmt](Path(path), errors=errors, stats=stats)


# -- append-only outputs -------------------------------------------------------------------------------
def complete_lines(path: str | os.PathLike[str]) -> Iterator[tuple[bytes, int]]:
    """Each complete (``\\n``-terminated) line of an append-only output and the byte offset after it.

    A last line without ``\\n`` was torn by a crash (it may end inside a multi-byte character) and is
    not returned; truncating the file to the last offset drops it.
    """
    with open(path, "rb") as fh:
        offset = 0
        for raw in fh:
            if not raw.endswith(b"\n"):
                return
            offset += len(raw)
            yield raw, offset
