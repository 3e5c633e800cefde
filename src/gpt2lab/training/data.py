"""Training data: documents from .txt / .jsonl / .csv / .tsv (and, through :mod:`.hf_data`, ``datasets``
folders, cached datasets by name, parquet, .json), tokenized once into uint16 memmaps (nanoGPT style).
Files are read by :mod:`gpt2lab.readers`, their format named by its one suffix table.

Every document is followed by ``<|endoftext|>`` and the documents are concatenated into one token
stream per split; training reads fixed-length blocks from that stream. Tokenizing streams the input
in chunks and writes straight to disk, so a corpus of gigabytes never sits in RAM.

Validation is either a given file or a held-out share of the documents. Documents with identical
text always land on the same side, so no text is in both splits; with a single distinct document the
tail of its tokens is held out instead.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from array import array
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..atomic import write_file
from ..readers import ReadError, ReadStats, format_of, iter_csv, iter_text_chunks, read_json, read_records, split_text
from . import hf_data

# the formats (gpt2lab.readers.FORMATS) taken from inside a given folder; any file named directly is read
# (as text when its suffix is none of FORMATS'). A folder's plain .json files are more often settings than
# data: they are read only when named.
FOLDER_FORMATS = ("txt", "jsonl", "csv", "json", "parquet")
BATCH_CHARS = 1 << 20  # characters handed to the tokenizer at once (its memory is ~100x this)
CACHE_VERSION = 1


class DataError(ValueError):
    """Training data that cannot be used; the message names the file and what is wrong."""


@dataclass
class DataStats(ReadStats):
    documents: int = 0
    files: list[str] = field(default_factory=list)


# -- reading documents -------------------------------------------------------------------------------
def expand_paths(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """Files given directly, plus the supported files inside given folders (recursively, sorted)."""
    files: list[Path] = []
    for raw in paths:
        path = Path(raw).expanduser()
        if path.is_dir() and hf_data.is_dataset_dir(path):
            files.extend(_hf(hf_data.dataset_dir_files, path))
        elif path.is_dir():
            found = sorted(p for p in path.rglob("*") if p.is_file() and _data_in_folder(p)
                           and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not found:
                raise DataError(f"{path}: folder has no .txt, .md, .text, .jsonl, .csv, .parquet or .json.gz files")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        elif hf_data.looks_like_dataset_name(str(raw)):
            files.extend(_hf(hf_data.cached_dataset_files, str(raw)))
        else:
            raise DataError(f"{path}: no such file or folder")
    return files


def _data_in_folder(path: Path) -> bool:
    return format_of(path) in FOLDER_FORMATS and not path.name.lower().endswith(".json")


def _hf(fn, *args):
    """Call a :mod:`.hf_data` function, reporting its errors as :class:`DataError`."""
    try:
        return fn(*args)
    except hf_data.HFDataError as exc:
        raise DataError(str(exc)) from None


def _read_error(fn: Callable[[], Iterator[str]]) -> Iterator[str]:
    """Run a reader, turning its errors into the data error the CLI reports."""
    try:
        yield from fn()
    except DataError:
        raise
    except ReadError as exc:
        raise DataError(str(exc)) from None


def _jsonl_documents(path: Path, text_field: str, stats: DataStats) -> Iterator[str]:
    seen_field = False
    for lineno, record in read_records(path, "jsonl", errors="replace", stats=stats):
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{lineno}: no field {text_field!r} (found {keys}); "
                            "choose it with --text-field")
        value = record[text_field]
        if not isinstance(value, str):
            raise DataError(f"{path}:{lineno}: field {text_field!r} is {type(value).__name__}, "
                            "expected a string")
        seen_field = True
        yield value
    if not seen_field:
        raise DataError(f"{path}: no JSON records")


def _csv_documents(path: Path, text_column: str, stats: DataStats, delimiter: str = ",") -> Iterator[str]:
    header, rows = iter_csv(path, delimiter=delimiter, errors="replace", stats=stats)
    if text_column not in header:
        raise DataError(f"{path}: no column {text_column!r} (columns: {', '.join(header)}); "
                        "choose it with --text-column")
    for _, row in rows:
        yield row[text_column]


def iter_documents(path: Path, *, text_field: str = "text", text_column: str = "text",
                   stats: DataStats) -> Iterator[Iterator[str]]:
    """The documents of one file, each as an iterator of text pieces (a text file is one document)."""
    fmt = format_of(path)
    hf_reader = hf_data.reader_for(path)
    if hf_reader is not None:
        docs = hf_reader(path, text_field)
        while True:
            try:
                doc = next(docs)
            except StopIteration:
                break
            except hf_data.HFDataError as exc:
                raise DataError(str(exc)) from None
            yield split_text(doc)
    elif fmt == "jsonl":
        for doc in _read_error(lambda: _jsonl_documents(path, text_field, stats)):
            yield split_text(doc)
    elif fmt in ("csv", "tsv"):
        delimiter = "," if fmt == "csv" else "\t"
        for doc in _read_error(lambda: _csv_documents(path, text_column, stats, delimiter)):
            yield split_text(doc)
    else:
        yield _read_error(lambda: iter_text_chunks(path, errors="replace", stats=stats))


# -- tokenizing into a memmap -----------------------------------------------------------------------
class _TokenWriter:
    """Append token ids to a growing binary file (no RAM beyond one chunk)."""

    def __init__(self, path: Path, dtype: np.dtype) -> None:
        self.path, self.dtype = path, dtype
        self.fh = open(path, "wb")
        self.count = 0

    def write(self, ids: Sequence[int] | np.ndarray) -> None:
        arr = np.asarray(ids, dtype=self.dtype)
        self.fh.write(arr.tobytes())
        self.count += arr.size

    def close(self) -> None:
        self.fh.flush()
        os.fsync(self.fh.fileno())
        self.fh.close()


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _progress(total: int, description: str, enabled: bool):
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn

    progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TimeRemainingColumn(),
                        disable=not enabled, transient=False)
    task = progress.add_task(description, total=total)
    return progress, task


def tokenize_documents(files: Sequence[Path], encode: Callable[[list[str]], list[list[int]]], eos_id: int,
                       out: Path, dtype: np.dtype, *, text_field: str, text_column: str, stats: DataStats,
                       progress: bool = True) -> tuple[array, array, array]:
    """Tokenize every document into ``out``, each followed by ``eos_id``.

    Returns per-document (token offset, token count incl. EOS, text hash) arrays.
    """
    offsets, lengths, hashes = array("q"), array("q"), array("Q")
    writer = _TokenWriter(out, dtype)
    total = sum(f.stat().st_size for f in files)
    bar, task = _progress(total, "tokenizing", progress)
    done = 0
    with bar:
        for path in files:
            stats.files.append(str(path))
            for pieces in iter_documents(path, text_field=text_field, text_column=text_column, stats=stats):
                start = writer.count
                digest = hashlib.blake2b(digest_size=8)
                batch: list[str] = []
                for piece in pieces:
                    digest.update(piece.encode("utf-8", errors="replace"))
                    batch.append(piece)
                    # encode_batch runs pieces in parallel in Rust; bounded in characters, as its memory is
                    if sum(len(p) for p in batch) >= BATCH_CHARS:
                        writer.write(np.concatenate([np.asarray(x, dtype=dtype) for x in encode(batch)]))
                        bar.update(task, advance=sum(len(p) for p in batch))
                        batch = []
                if batch:
                    ids = encode(batch)
                    writer.write(np.concatenate([np.asarray(x, dtype=dtype) for x in ids]) if ids else [])
                    bar.update(task, advance=sum(len(p) for p in batch))
                if writer.count == start:
                    continue  # empty document: nothing to learn from, not even an EOS
                writer.write([eos_id])
                stats.documents += 1
                offsets.append(start)
                lengths.append(writer.count - start)
                hashes.append(int.from_bytes(digest.digest(), "little"))
            done += path.stat().st_size
            bar.update(task, completed=done)
    writer.close()
    return offsets, lengths, hashes


def _copy_segments(src: np.memmap, segments: Sequence[tuple[int, int]], out: Path, dtype: np.dtype) -> int:
    writer = _TokenWriter(out, dtype)
    for start, length in segments:
        for s in range(start, start + length, 1 << 24):  # bounded copies
            writer.write(src[s:min(start + length, s + (1 << 24))])
    writer.close()
    return writer.count


def split_documents(hashes: Sequence[int], lengths: Sequence[int], val_share: float,
                    seed: int) -> tuple[list[int], list[int]] | None:
    """Indices of train and validation documents, or None when there is a single distinct text.

    Identical texts are one group, so they never straddle the split. Groups are picked in a seeded
    pseudo-random order until the validation side holds ``val_share`` of the documents.
    """
    groups: dict[int, list[int]] = {}
    for i, h in enumerate(hashes):
        groups.setdefault(h, []).append(i)
    if len(groups) < 2:
        return None

    def order(h: int) -> bytes:
        return hashlib.blake2b(f"{seed}:{h}".encode(), digest_size=8).digest()

    want = max(1, round(val_share * len(hashes)))
    val: list[int] = []
    for h in sorted(groups, key=order):
        if len(val) >= want or len(val) + len(groups[h]) >= len(hashes):
            break
        val.extend(groups[h])
    if not val:  # every group is too big to move without emptying training: take the smallest
        smallest = min(groups.values(), key=len)
        val = list(smallest)
    val_set = set(val)
    train = [i for i in range(len(hashes)) if i not in val_set]
    return train, sorted(val)


# -- the prepared dataset ---------------------------------------------------------------------------
@dataclass
class TokenData:
    """Tokens of the train and validation splits, memory-mapped from the cache folder."""

    train: np.ndarray
    val: np.ndarray | None
    meta: dict

    def num_blocks(self, block_size: int, split: str = "train") -> int:
        tokens = self.train if split == "train" else self.val
        return 0 if tokens is None else max(0, (len(tokens) - 1) // block_size)


def _source_key(files: Sequence[Path]) -> list[list]:
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _vocab_hash(tokenizer) -> str:  # noqa: ANN001 - a gpt2lab Tokenizer
    """A short digest of the tokenizer's vocabulary: part of a token cache's key."""
    return hashlib.blake2b(json.dumps(tokenizer.backend.get_vocab(), sort_keys=True).encode(),
                           digest_size=8).hexdigest()


def _cached_meta(cache: Path, key: dict) -> dict | None:
    """The ``meta.json`` of a token cache in ``cache`` built for ``key``, or None. On None the folder exists
    and holds no ``meta.json``: a cache is valid only once :func:`_write_meta` has written it, last."""
    meta_path = cache / "meta.json"
    if meta_path.is_file():
        try:
            meta = read_json(meta_path, expect=dict)
        except ValueError:  # unreadable JSON (or text): rebuild
            meta = {}
        if meta.get("key") == key:
            return meta
    cache.mkdir(parents=True, exist_ok=True)
    meta_path.unlink(missing_ok=True)
    return None


def _write_meta(cache: Path, meta: dict) -> None:
    write_file(cache / "meta.json", json.dumps(meta, indent=2))


def prepare_data(paths: Sequence[str | os.PathLike[str]], cache_dir: str | os.PathLike[str], *,
                 tokenizer, val: str | os.PathLike[str] | None = None, val_share: float = 0.05,
                 text_field: str = "text", text_column: str = "text", seed: int = 0,
                 progress: bool = True, log: Callable[[str], None] | None = None) -> TokenData:
    """Tokenize ``paths`` (and ``val``) into ``cache_dir`` unless an identical cache is already there."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    if not 0.0 <= val_share < 1.0:
        raise DataError(f"val share must be in [0, 1), got {val_share}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise DataError("the tokenizer has no <|endoftext|> token to separate documents")
    files = expand_paths(paths)
    val_files = expand_paths([val]) if val is not None else []
    dtype = token_dtype(tokenizer.vocab_size)
    key = {"version": CACHE_VERSION, "sources": _source_key(files), "val_sources": _source_key(val_files),
           "val_share": val_share if val is None else None, "seed": seed, "text_field": text_field,
           "text_column": text_column, "vocab_size": tokenizer.vocab_size, "eos": eos, "dtype": dtype.name,
           "vocab_hash": _vocab_hash(tokenizer)}
    cache = Path(cache_dir)
    if (meta := _cached_meta(cache, key)) is not None:
        return _open(cache, meta, dtype)

    def encode(texts: list[str]) -> list[list[int]]:
        return tokenizer.encode_batch(texts)

    stats = DataStats()
    common = dict(text_field=text_field, text_column=text_column, stats=stats, progress=progress)
    everything = cache / "all.bin"
    offsets, lengths, hashes = tokenize_documents(files, encode, eos, everything, dtype, **common)
    if stats.documents == 0 or sum(lengths) <= 1:
        everything.unlink(missing_ok=True)
        raise DataError(f"no text to train on in {', '.join(str(f) for f in files)} (empty files?)")
    note = ""
    if val_files:
        n_train_docs = stats.documents
        os.replace(everything, cache / "train.bin")
        vstats = DataStats()
        common["stats"] = vstats
        tokenize_documents(val_files, encode, eos, cache / "val.bin", dtype, **common)
        if vstats.documents == 0:
            raise DataError(f"validation file {val}: no text")
        stats.replaced_bytes += vstats.replaced_bytes
        n_val_docs = vstats.documents
        note = f"validation from {val}"
    elif val_share == 0:
        os.replace(everything, cache / "train.bin")
        n_train_docs, n_val_docs = stats.documents, 0
        note = "no validation"
    else:
        src = np.memmap(everything, dtype=dtype, mode="r")
        split = split_documents(hashes, lengths, val_share, seed)
        if split is None:  # one distinct text: hold out the tail of the token stream
            total = len(src)
            cut = total - max(2, int(total * val_share))
            train_seg, val_seg = [(0, cut)], [(cut, total - cut)]
            n_train_docs, n_val_docs = stats.documents, 0
            note = f"validation is the last {val_share:.0%} of the tokens (single document)"
        else:
            train_idx, val_idx = split
            train_seg = [(offsets[i], lengths[i]) for i in train_idx]
            val_seg = [(offsets[i], lengths[i]) for i in val_idx]
            n_train_docs, n_val_docs = len(train_idx), len(val_idx)
            note = f"validation: {n_val_docs} of {stats.documents} documents held out"
        _copy_segments(src, train_seg, cache / "train.bin", dtype)
        _copy_segments(src, val_seg, cache / "val.bin", dtype)
        del src
        everything.unlink()
    n_train = os.path.getsize(cache / "train.bin") // dtype.itemsize
    n_val = os.path.getsize(cache / "val.bin") // dtype.itemsize if (cache / "val.bin").exists() else 0
    meta = {"key": key, "train_tokens": n_train, "val_tokens": n_val, "train_documents": n_train_docs,
            "val_documents": n_val_docs, "replaced_bytes": stats.replaced_bytes, "note": note}
    _write_meta(cache, meta)
    if stats.replaced_bytes:
        log(f"gpt2lab: replaced {stats.replaced_bytes} invalid UTF-8 sequence(s) with U+FFFD")
    documents = f"{n_train_docs} document{'s' if n_train_docs != 1 else ''}"
    log(f"gpt2lab: {n_train:,} training tokens ({documents}), {n_val:,} validation tokens; {note}")
    return _open(cache, meta, dtype)


def _open(cache: Path, meta: dict, dtype: np.dtype) -> TokenData:
    train = np.memmap(cache / "train.bin", dtype=dtype, mode="r")
    val = np.memmap(cache / "val.bin", dtype=dtype, mode="r") if meta["val_tokens"] > 0 else None
    return TokenData(train=train, val=val, meta=meta)
