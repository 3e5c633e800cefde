"""The one reader of every input format, shared by every command: plain text, JSON, JSON Lines, CSV/TSV,
parquet and Arrow (``datasets``) files.

Training data, fine-tuning data, augment datasets, prompt files, evaluation files, review files and
logs, and every JSON file of a checkpoint (``config.json``, ``tokenizer_config.json``, index files ...)
come through here, so they follow the same rules:

* UTF-8, with or without a byte-order mark (``utf-8-sig``); a file with a NUL byte near its start is
  refused as binary. A ``.gz`` file is decompressed on the fly (``.jsonl.gz``, ``.json.gz``).
* Lines end at ``\\n`` only (a ``\\r`` before it is dropped). U+2028, U+2029, U+0085, form feeds and
  the other characters :meth:`str.splitlines` also splits on are ordinary characters: they are legal
  inside JSON strings and CSV fields.
* Invalid UTF-8 is an error naming ``file:line`` (``errors="strict"``, the default) or, where the docs
  say so (training data), each invalid byte becomes U+FFFD and is counted in :class:`ReadStats`.
* Memory stays bounded whatever the line lengths: plain text is read in chunks
  (:func:`iter_text_chunks`), and a JSONL or CSV line longer than ``max_line_bytes`` is an error.
* JSON is parsed by :func:`parse_json` alone: nesting deeper than :data:`MAX_JSON_DEPTH` is an error
  naming the file (and line), never a ``RecursionError``; a JSON file read whole (:func:`read_json`) may
  have at most :data:`MAX_JSON_BYTES` unless its caller says otherwise.
* CSV is parsed strictly: a quote that is never closed (it would swallow the rest of the file) or
  text after a closing quote is an error naming the line where the record starts.

Formats are looked up by suffix in :data:`FORMATS`, the one table every command uses;
:func:`read_records` reads any of them as ``(line, record)`` pairs. Other modules can add formats with
:func:`register_format`.
"""

from __future__ import annotations

import codecs
import csv
import json
import os
import re
from collections.abc import Callable, Iterable, Iterator, Sequence
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
    """``path`` opened for reading bytes (decompressed when it ends in ``.gz``), past its BOM; refused
    when it is a folder, or binary (a NUL byte near its start)."""
    path = Path(path)
    if path.is_dir():
        raise ReadError(f"{path}: is a directory, not a file")
    try:
        fh = open(path, "rb", buffering=_BINARY_PROBE)  # noqa: SIM115 - the callers close it
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: file not found") from None
    except OSError as exc:
        raise ReadError(f"{path}: cannot read ({exc.strerror or exc})") from None
    if path.name.lower().endswith(".gz"):
        import gzip

        fh.close()
        fh = gzip.open(path, "rb")  # noqa: SIM115 - the callers close it
    try:
        head = _guarded(path, lambda: fh.peek(_BINARY_PROBE)[:_BINARY_PROBE])
    except ReadError:
        fh.close()
        raise
    nul = head.find(b"\x00")
    if nul >= 0:
        fh.close()
        raise ReadError(f"{path}: looks like a binary file, not UTF-8 text (NUL byte at offset {nul})")
    if head.startswith(BOM):
        fh.read(len(BOM))
    return fh


def _guarded(path: Path, read: Callable[[], Any]) -> Any:
    """``read()``, with a damaged file (a truncated or corrupt ``.gz``, an I/O error) reported as a
    :class:`ReadError` naming ``path``."""
    try:
        return read()
    except (OSError, EOFError) as exc:
        raise ReadError(f"{path}: cannot read ({exc})") from None


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
            raw = _guarded(path, lambda: fh.readline(max_line_bytes + 1))
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
        raw = _guarded(path, fh.read)
    return _decode_whole(raw, path, errors, stats)


def _decode_whole(raw: bytes, path: Path, errors: str, stats: ReadStats | None) -> str:
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
            block = _guarded(path, lambda: fh.read(chunk_chars))
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


# -- JSON ----------------------------------------------------------------------------------------------
# Deeper nesting is refused before parsing: Python's json recursion would end in a RecursionError that
# names no file, and any later recursive walk (json.dumps when a config is written back) could too. 128 is
# serde_json's limit (what `tokenizers` parses tokenizer.json with); no file gpt2lab reads nests beyond
# about 5 (a chat conversation in JSONL).
MAX_JSON_DEPTH = 128
# A JSON file read whole may be at most this big unless the caller says otherwise: the largest one a
# checkpoint holds is tokenizer.json (1.4 MB for GPT-2, under 20 MB for the largest vocabularies in use),
# an explore results.json of thousands of samples is a few MB; json.loads holds several times the
# file's size in Python objects, so a bigger file is refused rather than parsed.
MAX_JSON_BYTES = 64 << 20
_JSON_NOT_STRUCTURE = bytes(b for b in range(256) if b not in b'[]{}"')  # bytes.translate deletes these
_JSON_STEPS = bytes.maketrans(b"[{]}", bytes([1, 1, 255, 255]))  # +1 / -1 as int8
_JSON_TYPES = {dict: "object", list: "array", str: "string"}


def _nesting_exceeds(text: str, limit: int) -> bool:
    """Whether JSON ``text`` nests arrays/objects deeper than ``limit`` (brackets inside strings do not
    count). Linear time, in C throughout (bytes methods, numpy); two ``str.count`` for text with at most
    ``limit`` brackets, which is nearly every text."""
    if text.count("[") + text.count("{") <= limit:
        return False
    raw = text.encode("utf-8", "surrogatepass")
    if b"\\" in raw:  # escaped backslashes and quotes, so that only real string delimiters are left
        raw = raw.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside = b"".join(raw.translate(None, _JSON_NOT_STRUCTURE).split(b'"')[::2])  # drop string contents
    if outside.count(b"[") + outside.count(b"{") <= limit:
        return False
    import numpy as np

    steps = np.frombuffer(outside.translate(_JSON_STEPS), dtype=np.int8)
    depth = 0
    for start in range(0, len(steps), 1 << 20):
        running = np.cumsum(steps[start:start + (1 << 20)], dtype=np.int64) + depth
        if running.max() > limit:
            return True
        depth = int(running[-1])
    return False


def parse_json(text: str, source: str | os.PathLike[str], *, line: int | None = None,
               max_depth: int = MAX_JSON_DEPTH) -> Any:
    """Parse JSON ``text`` from ``source`` (line ``line`` of it for JSON Lines): every JSON parse of
    gpt2lab goes through here.

    Raises :class:`ReadError` naming ``source`` (and ``line``): not valid JSON (with where, and
    "truncated?" when the text ends before the value does), or nested deeper than ``max_depth``.
    """
    where = f"{source}:{line}" if line is not None else str(source)
    too_deep = ReadError(f"{where}: JSON nested deeper than {max_depth} levels; not a file gpt2lab reads")
    if _nesting_exceeds(text, max_depth):
        raise too_deep
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        if line is not None:
            raise ReadError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from None
        # an error at the very end, or a string never closed, is what a cut-off download looks like
        cut = " (truncated?)" if exc.pos >= len(text.rstrip()) - 1 or exc.msg.startswith("Unterminated") else ""
        raise ReadError(f"{where}: not valid JSON{cut}: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:  # not reached with max_depth well under the interpreter's limit; kept as a net
        raise too_deep from None


def _check_type(value: Any, expect: type | None, where: str) -> Any:
    if expect is not None and not isinstance(value, expect):
        raise ReadError(f"{where}: expected a JSON {_JSON_TYPES.get(expect, expect.__name__)}, "
                        f"got {_JSON_TYPES.get(type(value), type(value).__name__)}")
    return value


def read_json(path: str | os.PathLike[str], *, expect: type | None = None, max_bytes: int | None = MAX_JSON_BYTES,
              errors: str = "strict", stats: ReadStats | None = None) -> Any:
    """A whole JSON file (BOM dropped; ``.gz`` decompressed) parsed by :func:`parse_json`.

    ``expect``: ``dict`` or ``list``, the type the value must have. ``max_bytes``: the largest file
    accepted (None: no bound, for data that is big for a reason). Raises ``FileNotFoundError``, or
    :class:`ReadError` naming the file and what is wrong (binary, not UTF-8, too big, not JSON, too
    deep, another type).
    """
    path = Path(path)
    gz = path.name.lower().endswith(".gz")
    with _open_binary(path) as fh:
        if max_bytes is None or not gz:
            raw = None if max_bytes is not None and os.fstat(fh.fileno()).st_size > max_bytes else \
                _guarded(path, fh.read)
        else:  # the decompressed size is unknown: read up to the bound, never past it
            raw = _guarded(path, lambda: _read_at_most(fh, max_bytes + 1))
            raw = None if len(raw) > max_bytes else raw
    if raw is None:
        raise ReadError(f"{path}: more than {max_bytes:,} bytes, the most a JSON file of this kind may have")
    return _check_type(parse_json(_decode_whole(raw, path, errors, stats), path), expect, str(path))


def _read_at_most(fh, limit: int) -> bytes:
    parts, size = [], 0
    while size < limit:
        block = fh.read(min(1 << 20, limit - size))
        if not block:
            break
        parts.append(block)
        size += len(block)
    return b"".join(parts)


def parse_jsonl(lines: Iterable[str], source: str | os.PathLike[str], *, objects: bool = False) -> Iterator[Record]:
    """``(line number, value)`` for each non-blank line of JSON Lines text already split on ``\\n``
    (stdin, say); ``objects``: every value must be a JSON object. A bad line is a :class:`ReadError`
    naming ``source:line``."""
    for number, line in enumerate(lines, 1):
        if line.strip():
            value = parse_json(line, source, line=number)
            yield number, _check_type(value, dict, f"{source}:{number}") if objects else value


def iter_jsonl(path: str | os.PathLike[str], *, errors: str = "strict", stats: ReadStats | None = None,
               max_line_bytes: int = MAX_LINE_BYTES, objects: bool = False) -> Iterator[Record]:
    """``(line number, value)`` for each non-blank line of a JSON Lines file (``.gz`` decompressed);
    ``objects``: every value must be a JSON object. A bad line is a :class:`ReadError` naming it."""
    for number, line in iter_lines(path, errors=errors, stats=stats, max_line_bytes=max_line_bytes):
        if line.strip():
            value = parse_json(line, path, line=number)
            yield number, _check_type(value, dict, f"{path}:{number}") if objects else value


def is_json_array(path: str | os.PathLike[str]) -> bool:
    """Whether a ``.json`` file holds one JSON array (its first character after any BOM and whitespace
    is ``[``) rather than JSON Lines."""
    path = Path(path)
    with _open_binary(path) as fh:
        return _guarded(path, lambda: fh.peek(4096)[:4096]).lstrip(b" \t\r\n").startswith(b"[")


def iter_json(path: str | os.PathLike[str], *, errors: str = "strict", stats: ReadStats | None = None
              ) -> Iterator[Record]:
    """The records of a ``.json`` file: one JSON array of them (parsed whole; the number is the record's
    1-based index), or JSON Lines (the number is the line), as ``datasets``' json loader reads both."""
    if not is_json_array(path):
        yield from iter_jsonl(path, errors=errors, stats=stats)
        return
    yield from enumerate(read_json(path, expect=list, max_bytes=None, errors=errors, stats=stats), 1)


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


# -- parquet and Arrow (pyarrow) -----------------------------------------------------------------------
_TABLE_BATCH = 512  # rows converted to Python at a time: memory stays bounded by a batch, not the file


def _pyarrow(module: str, path: Path):
    """Import a pyarrow module, or say which extra brings it; first, ``path`` must be a file."""
    import importlib

    if not path.is_file():
        if path.is_dir():
            raise ReadError(f"{path}: is a directory, not a file")
        raise FileNotFoundError(f"{path}: file not found")

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ReadError(f"reading {path} needs the pyarrow package: pip install 'gpt2lab[data]'") from None


def _table_rows(batches: Iterable[Any], names: list[str], columns: Sequence[str] | None) -> Iterator[Record]:
    wanted = [c for c in (names if columns is None else columns) if c in names]
    number = 0
    for batch in batches:
        values = [batch.column(batch.schema.get_field_index(c)).to_pylist() for c in wanted]
        for row in zip(*values):
            number += 1
            yield number, dict(zip(wanted, row))


def iter_parquet(path: str | os.PathLike[str], *, columns: Sequence[str] | None = None
                 ) -> tuple[list[str], Iterator[Record]]:
    """The column names and ``(row number, {column: value})`` of each row of a parquet file, read a few
    hundred rows at a time (only ``columns``, when given, are read)."""
    path = Path(path)
    pq = _pyarrow("pyarrow.parquet", path)
    try:
        reader = pq.ParquetFile(str(path))
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors all mean "not a parquet file"
        raise ReadError(f"{path}: not a readable parquet file ({exc})") from exc
    names = reader.schema_arrow.names
    read = [c for c in columns if c in names] if columns is not None else None
    return names, _table_rows(reader.iter_batches(batch_size=_TABLE_BATCH, columns=read), names, columns)


def iter_arrow(path: str | os.PathLike[str], *, columns: Sequence[str] | None = None
               ) -> tuple[list[str], Iterator[Record]]:
    """The column names and rows of an Arrow file as ``datasets`` writes them (IPC stream or file,
    memory-mapped), as :func:`iter_parquet`."""
    path = Path(path)
    pa = _pyarrow("pyarrow", path)
    try:
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_stream(source)
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(source)
            batches: Iterable[Any] = (reader.get_batch(i) for i in range(reader.num_record_batches))
        else:
            batches = reader
    except Exception as exc:  # noqa: BLE001
        raise ReadError(f"{path}: not a readable Arrow file ({exc})") from exc
    return reader.schema.names, _table_rows(batches, reader.schema.names, columns)


# -- the table of formats ------------------------------------------------------------------------------
FORMATS: dict[str, str] = {".txt": "txt", ".text": "txt", ".md": "txt", ".jsonl": "jsonl", ".ndjson": "jsonl",
                           ".jsonl.gz": "jsonl", ".json": "json", ".json.gz": "json", ".csv": "csv", ".tsv": "tsv",
                           ".parquet": "parquet", ".arrow": "arrow"}
RecordReader = Callable[..., Iterator[Record]]
_READERS: dict[str, RecordReader] = {
    "txt": iter_lines,
    "jsonl": iter_jsonl,
    "json": iter_json,
    "csv": lambda path, **kw: iter_csv(path, delimiter=",", **kw)[1],
    "tsv": lambda path, **kw: iter_csv(path, delimiter="\t", **kw)[1],
    "parquet": lambda path, **_: iter_parquet(path)[1],  # binary formats: no text decoding to configure
    "arrow": lambda path, **_: iter_arrow(path)[1],
}


def register_format(name: str, reader: RecordReader, suffixes: tuple[str, ...] = ()) -> None:
    """Add a format: ``reader(path, errors=..., stats=...)`` yields ``(line, record)`` pairs."""
    _READERS[name] = reader
    for suffix in suffixes:
        FORMATS[suffix.lower()] = name


def format_of(path: str | os.PathLike[str]) -> str | None:
    """The format name for ``path``'s suffix in :data:`FORMATS` (``"txt"``, ``"jsonl"``, ``"json"``,
    ``"csv"``, ``"tsv"``, ``"parquet"``, ``"arrow"``, ...), or None."""
    name = Path(path).name.lower()
    for suffix in sorted(FORMATS, key=len, reverse=True):  # ".jsonl.gz" before ".gz"
        if name.endswith(suffix):
            return FORMATS[suffix]
    return None


def read_records(path: str | os.PathLike[str], format: str | None = None, *, errors: str = "strict",
                 stats: ReadStats | None = None) -> Iterator[Record]:
    """``(line, record)`` pairs of any registered format: a line's text (txt), a JSON value (jsonl,
    json), a ``{column: value}`` dict (csv/tsv, parquet/arrow: the number is the row). ``format``
    defaults to the one of the suffix."""
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
