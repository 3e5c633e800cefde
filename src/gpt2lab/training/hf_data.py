"""Training documents from Hugging Face formats: ``datasets`` folders (``save_to_disk``), datasets in the
local Hugging Face datasets cache (by name), parquet, and JSON (``.json`` arrays or lines,
``.jsonl.gz`` / ``.json.gz``).

A ``datasets`` folder and a cached dataset both come down to the Arrow files ``datasets`` keeps them
in, so each source is a list of real files (sizes and times for the tokenized-data cache key) read by
one small reader per format. Every reader streams record batches: memory stays bounded by a batch,
not the corpus. The text is the ``--text-field`` column (default ``text``).
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from ..jsonl import json_lines

# file name endings -> reader, matched on the lower-cased name
PARQUET = (".parquet",)
ARROW = (".arrow",)
JSON = (".json", ".json.gz", ".jsonl.gz")
FOLDER_SUFFIXES = (".parquet", ".jsonl.gz", ".json.gz")  # taken from folders (a plain .json only when named)
_BATCH = 512


class HFDataError(ValueError):
    """Raised with a message naming the source; training/data.py reports it as a ``DataError``."""


def _require(module: str, what: str):
    """Import an optional dependency, or say which extra brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise HFDataError(f"{what} needs the {module.split('.')[0]} package: pip install 'gpt2lab[data]'") from None


def _texts(records: Iterable[Any], text_field: str, source: str) -> Iterator[str]:
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict) or text_field not in record:
            keys = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise HFDataError(f"{source}: record {number} has no field {text_field!r} (found {keys}); "
                              "choose it with --text-field")
        value = record[text_field]
        if value is None:
            continue
        if not isinstance(value, str):
            raise HFDataError(f"{source}: field {text_field!r} of record {number} is {type(value).__name__}, "
                              "expected a string")
        yield value


def _column(batches: Iterable[Any], names: list[str], text_field: str, source: str) -> Iterator[str]:
    """The ``text_field`` strings of Arrow record batches (``None`` rows skipped)."""
    if text_field not in names:
        raise HFDataError(f"{source}: no column {text_field!r} (columns: {', '.join(names)}); "
                          "choose it with --text-field")
    for batch in batches:
        column = batch.column(batch.schema.get_field_index(text_field))
        for value in column.to_pylist():
            if value is None:
                continue
            if not isinstance(value, str):
                raise HFDataError(f"{source}: column {text_field!r} holds {type(value).__name__}, expected strings")
            yield value


def parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    """The texts of a parquet file, read a few hundred rows at a time."""
    pq = _require("pyarrow.parquet", f"reading {path}")
    try:
        reader = pq.ParquetFile(str(path))
    except Exception as exc:  # noqa: BLE001 - pyarrow's errors all mean "not a parquet file"
        raise HFDataError(f"{path}: not a readable parquet file ({exc})") from exc
    names = reader.schema_arrow.names
    yield from _column(reader.iter_batches(batch_size=_BATCH, columns=[text_field] if text_field in names else None),
                       names, text_field, str(path))


def arrow_documents(path: Path, text_field: str) -> Iterator[str]:
    """The texts of an Arrow file written by ``datasets`` (IPC stream, memory-mapped)."""
    pa = _require("pyarrow", f"reading {path}")
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
        raise HFDataError(f"{path}: not a readable Arrow file ({exc})") from exc
    yield from _column(batches, reader.schema.names, text_field, str(path))


def json_documents(path: Path, text_field: str) -> Iterator[str]:
    """The texts of ``.json`` (an array of objects, or JSON Lines) and gzip-compressed JSON / JSON Lines."""
    opener: Callable[[], Any] = (lambda: gzip.open(path, "rt", encoding="utf-8-sig", errors="replace")) \
        if path.name.lower().endswith(".gz") else (lambda: open(path, encoding="utf-8-sig", errors="replace"))
    try:
        with opener() as fh:
            head = fh.read(4096).lstrip("\ufeff \t\r\n")
        with opener() as fh:
            if head.startswith("["):  # one JSON array: parsed whole (JSON Lines is the streaming form)
                try:
                    records = json.load(fh)
                except json.JSONDecodeError as exc:
                    raise HFDataError(f"{path}: not valid JSON ({exc})") from None
                yield from _texts(records, text_field, str(path))
                return
            try:
                for number, record in json_lines(fh, str(path)):
                    if not isinstance(record, dict) or text_field not in record:
                        keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                        raise HFDataError(f"{path}:{number}: no field {text_field!r} (found {keys}); "
                                          "choose it with --text-field")
                    yield from _texts([record], text_field, f"{path}:{number}")
            except HFDataError:
                raise
            except ValueError as exc:  # a bad line, named by json_lines
                raise HFDataError(str(exc)) from None
    except (OSError, EOFError) as exc:  # gzip: not a gzip file, truncated
        raise HFDataError(f"{path}: cannot read ({exc})") from exc


def reader_for(path: Path) -> Callable[[Path, str], Iterator[str]] | None:
    """The reader of a file this module handles, or None."""
    name = path.name.lower()
    if name.endswith(PARQUET):
        return parquet_documents
    if name.endswith(ARROW):
        return arrow_documents
    if name.endswith(JSON):
        return json_documents
    return None


def in_folder(path: Path) -> bool:
    """Whether a file found inside a given folder is training data of a format handled here."""
    return path.name.lower().endswith(FOLDER_SUFFIXES)


# -- datasets folders and the datasets cache ----------------------------------------------------------
def is_dataset_dir(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` or ``DatasetDict.save_to_disk``."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _split_files(dataset: Any, source: str) -> list[Path]:
    """The Arrow files holding a ``Dataset`` (its train split when a ``DatasetDict``)."""
    if isinstance(dataset, _require("datasets", source).DatasetDict):
        splits = list(dataset.keys())
        if not splits:
            raise HFDataError(f"{source}: the dataset has no splits")
        dataset = dataset["train"] if "train" in splits else dataset[splits[0]]
    if getattr(dataset, "_indices", None) is not None:
        raise HFDataError(f"{source}: the dataset has an indices mapping (a select/shuffle view); "
                          "save it with save_to_disk first")
    files = [Path(f["filename"]) for f in dataset.cache_files]
    if not files:
        raise HFDataError(f"{source}: the dataset is held in memory only, not in Arrow files")
    return files


def dataset_dir_files(path: Path) -> list[Path]:
    """The Arrow files of a ``save_to_disk`` folder (its ``train`` split, else its first)."""
    datasets = _require("datasets", f"reading the datasets folder {path}")
    try:
        dataset = datasets.load_from_disk(str(path))
    except Exception as exc:  # noqa: BLE001 - a damaged folder, whatever the parser says
        raise HFDataError(f"{path}: not a readable datasets folder ({exc})") from exc
    return _split_files(dataset, str(path))


def looks_like_dataset_name(raw: str) -> bool:
    """``name``, ``user/name``, either with ``:config``: what could be a Hugging Face dataset id (not a
    path: no leading ``.``/``/``/``~``, at most one ``/``, no data-file suffix)."""
    name = raw.split(":", 1)[0]
    if not name or raw.startswith((".", "/", "~")) or name.count("/") > 1:
        return False
    return Path(name).suffix.lower() not in (".txt", ".md", ".jsonl", ".csv", ".json", ".parquet", ".gz", ".arrow")


def cached_dataset_files(raw: str) -> list[Path]:
    """The Arrow files of dataset ``NAME[:CONFIG]`` (train split) from the Hugging Face datasets cache.

    With ``HF_HUB_OFFLINE=1`` (or ``HF_DATASETS_OFFLINE=1``) only the local cache is used, as
    ``datasets.load_dataset`` does; the error says how to get the dataset otherwise.
    """
    datasets = _require("datasets", f"{raw}: not a file or folder; loading it as a dataset name")
    name, _, config = raw.partition(":")
    try:
        dataset = datasets.load_dataset(name, config or None, split="train")
    except Exception as exc:  # noqa: BLE001 - not cached / offline / unknown: one message
        raise HFDataError(f"{raw}: no such file or folder, and no dataset of that name in the local Hugging Face "
                          f"datasets cache ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}). "
                          "Download it once while online (datasets.load_dataset), or save it with "
                          "save_to_disk and pass the folder") from exc
    return _split_files(dataset, raw)
