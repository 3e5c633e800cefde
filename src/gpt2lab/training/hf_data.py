"""Training documents from Hugging Face formats: ``datasets`` folders (``save_to_disk``), datasets in the
local Hugging Face datasets cache (by name), parquet, and JSON (``.json`` arrays or lines, ``.json.gz``).

A ``datasets`` folder and a cached dataset both come down to the Arrow files ``datasets`` keeps them
in, so each source is a list of real files (sizes and times for the tokenized-data cache key). The
files are read by :mod:`gpt2lab.readers` (parquet and Arrow a batch of rows at a time: memory stays
bounded by a batch, not the corpus); this module picks the ``--text-field`` column (default ``text``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from .. import readers
from ..readers import ReadError


class HFDataError(ValueError):
    """Raised with a message naming the source; training/data.py reports it as a ``DataError``."""


def _require(module: str, what: str):
    """Import an optional dependency, or say which extra brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise HFDataError(f"{what} needs the {module.split('.')[0]} package: pip install 'gpt2lab[data]'") from None


def _texts(records: Iterable[tuple[int, Any]], text_field: str, source: str, what: str = "record") -> Iterator[str]:
    """The ``text_field`` strings of ``(number, record)`` pairs (``None`` values skipped); errors name
    ``source`` and the record (``what="line"``: ``source:N``, else ``source: record N``)."""
    try:
        for number, record in records:
            where = f"{source}:{number}:" if what == "line" else f"{source}: record {number}"
            if not isinstance(record, dict) or text_field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise HFDataError(f"{where} no field {text_field!r} (found {keys}); choose it with --text-field")
            value = record[text_field]
            if value is None:
                continue
            if not isinstance(value, str):
                raise HFDataError(f"{where} field {text_field!r} is {type(value).__name__}, expected a string")
            yield value
    except ReadError as exc:  # a bad line, a file that is not JSON, a damaged .gz: named by the reader
        raise HFDataError(str(exc)) from None


def _table_documents(read: Callable[..., tuple[list[str], Iterator[readers.Record]]]
                     ) -> Callable[[Path, str], Iterator[str]]:
    def documents(path: Path, text_field: str) -> Iterator[str]:
        try:
            names, rows = read(path, columns=[text_field])
        except ReadError as exc:
            raise HFDataError(str(exc)) from None
        if text_field not in names:
            raise HFDataError(f"{path}: no column {text_field!r} (columns: {', '.join(names)}); "
                              "choose it with --text-field")
        for _, row in rows:
            value = row[text_field]
            if value is not None and not isinstance(value, str):
                raise HFDataError(f"{path}: column {text_field!r} holds {type(value).__name__}, expected strings")
            if value is not None:
                yield value
    return documents


parquet_documents = _table_documents(readers.iter_parquet)
parquet_documents.__doc__ = "The texts of a parquet file, read a few hundred rows at a time."
arrow_documents = _table_documents(readers.iter_arrow)
arrow_documents.__doc__ = "The texts of an Arrow file written by ``datasets`` (IPC stream, memory-mapped)."


def json_documents(path: Path, text_field: str) -> Iterator[str]:
    """The texts of ``.json`` (an array of objects, or JSON Lines) and gzip-compressed JSON / JSON Lines
    (invalid UTF-8 replaced, as in every training file)."""
    try:
        lines = readers.format_of(path) == "jsonl" or not readers.is_json_array(path)
    except ReadError as exc:
        raise HFDataError(str(exc)) from None
    records = readers.read_records(path, errors="replace")
    yield from _texts(records, text_field, str(path), "line" if lines else "record")


_READERS = {"parquet": parquet_documents, "arrow": arrow_documents, "json": json_documents}


def reader_for(path: Path) -> Callable[[Path, str], Iterator[str]] | None:
    """The reader of a file this module handles (its format in :data:`gpt2lab.readers.FORMATS` is
    parquet, arrow or json), or None."""
    return _READERS.get(readers.format_of(path) or "")


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
    return readers.format_of(name) is None and Path(name).suffix.lower() != ".gz"


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
