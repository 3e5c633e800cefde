"""Data augmentation: K new examples per row of a labelled text dataset (CSV/TSV or JSONL).

Each new example keeps its source row's label (and every other column) and is made one of two ways:

- ``continuation``: the model continues the example's opening (its first words);
- ``few-shot``: the model writes the next item of a list of other examples with the same label.

With a JSON Schema (``json_schema=``, ``gpt2lab augment --json-schema FILE``) every new example is a row the
model writes as one JSON object under that schema (structured outputs, docs/structured-outputs.md), after a
few-shot list of rows with the same label as JSON objects; the schema's properties are dataset columns (the
text column among them) and the label's property is pinned to the source row's label (``const``), so each
new row parses, validates and keeps its label. A row cut at the length limit is filtered as ``invalid_json``.

Candidates are filtered: empty output (a continuation that adds no letter or digit is empty), length bounds
(words), exact duplicates and near duplicates (character 3-gram Jaccard similarity >= a threshold) of the
originals and of each other.

Output (CSV/TSV or JSONL by its suffix) holds every original row followed by its kept examples, with
three added columns: ``aug_origin`` (``original`` | ``generated``), ``aug_source_row`` (0-based row of
the input) and ``aug_method``. It is written incrementally (flush + fsync per row) next to a progress
log ``<out>.progress``; rerunning after an interruption truncates any partly written row, skips the
finished ones and goes on, so every row is in the output exactly once.
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..atomic import naming, write_file

# the near-duplicate filter is gpt2lab.near_duplicates' (shared with review's screening), its names kept here
from ..near_duplicates import NearDuplicateIndex, jaccard, normalize, shingles  # noqa: F401 - re-exported
from ..outputs import check_output_file
from ..readers import ReadError, complete_lines, format_of, iter_csv, parse_json, read_records
from ..sampling import SamplingParams

if TYPE_CHECKING:
    from ..generation import Generator

ORIGIN, SOURCE_ROW, METHOD = "aug_origin", "aug_source_row", "aug_method"
ADDED_COLUMNS = (ORIGIN, SOURCE_ROW, METHOD)
METHODS = ("continuation", "few-shot")
FILTER_REASONS = ("empty", "too_short", "too_long", "duplicate", "near_duplicate", "empty_source", "invalid_json")
DEFAULTS = {"temperature": 0.9, "top_k": 50}
# readers.FORMATS name -> how rows are written: a .json dataset is written as JSON Lines (which the
# json reader, and datasets', read back)
_STYLES = {"csv": "csv", "tsv": "tsv", "jsonl": "jsonl", "json": "jsonl"}


# -- dataset IO ------------------------------------------------------------------------------------
@dataclass
class Dataset:
    path: Path
    format: str  # "csv" | "tsv" | "jsonl"
    columns: list[str]
    rows: list[dict[str, Any]]


def data_format(path: Path, what: str = "file") -> str:
    """How a dataset file's rows are laid out, ``csv``, ``tsv`` or ``jsonl``, from its format in
    :data:`gpt2lab.readers.FORMATS`; ``ValueError`` for any other (an output cannot be compressed)."""
    style = _STYLES.get(format_of(path) or "")
    if style is None or (what == "output" and path.name.lower().endswith(".gz")):
        raise ValueError(f"{path}: unknown {what} format {path.suffix or '(no suffix)'!r}; "
                         "use .csv, .tsv or .jsonl")
    return style


def read_dataset(path: str | Path, text_column: str, label_column: str | None = None, *,
                 augmented: bool = False) -> Dataset:
    """Read a CSV/TSV (with a header) or JSONL dataset; ``ValueError`` names what is wrong and where.

    ``augmented``: the file is an augment output (it must have the added columns; ``gpt2lab review``
    reads it to curate), instead of an input (it must not).
    """
    path = Path(path)
    fmt = data_format(path, "data")
    rows: list[dict[str, Any]] = []
    try:
        if fmt == "jsonl":
            columns: dict[str, None] = {}
            for number, record in read_records(path):  # .jsonl, or .json: lines or one array
                if not isinstance(record, dict):
                    raise ValueError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
                columns.update(dict.fromkeys(record))
                rows.append(record)
            cols = list(columns)
        else:
            cols, records = iter_csv(path, delimiter="," if fmt == "csv" else "\t")
            rows = [row for _, row in records]
    except IsADirectoryError:
        raise ValueError(f"{path}: is a directory, not a data file") from None
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: data file not found") from None
    if not rows:
        raise ValueError(f"{path}: empty dataset (no rows)")
    for name, option in ((text_column, "--text-column"), (label_column, "--label-column")):
        if name is not None and name not in cols:
            raise ValueError(f"{path}: no column {name!r} ({option}); columns: {', '.join(cols) or '(none)'}")
    clash = [c for c in ADDED_COLUMNS if c in cols]
    if augmented and len(clash) < len(ADDED_COLUMNS):
        raise ValueError(f"{path}: not an augment output (it lacks column(s) "
                         f"{', '.join(c for c in ADDED_COLUMNS if c not in cols)})")
    if clash and not augmented:
        raise ValueError(f"{path}: already has column(s) {', '.join(clash)}: is it an augment output? "
                         "Augment the original dataset")
    for i, row in enumerate(rows):
        value = row.get(text_column)
        if value is not None and not isinstance(value, str):
            if isinstance(value, (dict, list)):
                raise ValueError(f"{path}: row {i}: {text_column!r} must be text, got {type(value).__name__}")
            row[text_column] = str(value)
    return Dataset(path, fmt, cols, rows)


class _Output:
    """Append-only writer of output records: every record flushed and fsynced when written."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path, self.columns = path, columns
        self.format = data_format(path, "output")
        self._file = open(path, "a", encoding="utf-8", newline="")  # noqa: SIM115 - closed by close()
        if self.format != "jsonl":
            self._csv = csv.writer(self._file, delimiter="," if self.format == "csv" else "\t",
                                   lineterminator="\n")
            if self._file.tell() == 0:
                self._csv.writerow(columns)
                self._sync()

    def write(self, record: dict[str, Any]) -> None:
        with naming(self.path):  # a full disk: one line naming the output
            if self.format == "jsonl":
                self._file.write(json.dumps({c: record.get(c) for c in self.columns}, ensure_ascii=False) + "\n")
            else:
                self._csv.writerow(["" if record.get(c) is None else _cell(record.get(c)) for c in self.columns])
        self._sync()

    def _sync(self) -> None:
        with naming(self.path):
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        with naming(self.path):  # after a failed write, closing flushes (and fails) again
            self._file.close()


def _cell(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _read_output(path: Path, columns: list[str], keep: int) -> tuple[list[dict[str, Any]], int]:
    """The first ``keep`` records of an output file and the byte offset where they end.

    Only complete lines are read: a crash can leave a torn last line, even half a UTF-8 character.
    """
    fmt = data_format(path, "output")
    records: list[dict[str, Any]] = []
    offset = 0
    consumed = [0]

    def lines() -> Iterator[str]:
        for raw, end in complete_lines(path):
            consumed[0] = end
            yield raw.decode("utf-8")

    it = lines()
    if fmt == "jsonl":
        for number, line in enumerate(it, 1):
            if len(records) == keep:
                break
            records.append(parse_json(line, path, line=number))
            offset = consumed[0]
    else:
        reader = csv.reader(it, delimiter="," if fmt == "csv" else "\t")
        header = next(reader, None)
        if header != columns:
            raise ValueError(f"{path}: its columns {header} are not those of this run {columns}; "
                             "use another --out")
        offset = consumed[0]
        try:
            for values in reader:
                if len(records) == keep:
                    break
                records.append(dict(zip(columns, values)))
                offset = consumed[0]
        except csv.Error:  # a row cut inside a quoted field: it is after the finished ones
            pass
    if len(records) < keep:
        raise ValueError(f"{path}: has {len(records)} complete rows but its progress log says {keep}; the file "
                         "was changed by something else. Remove it and its .progress file to start over")
    return records, offset


# -- the job ---------------------------------------------------------------------------------------
@dataclass
class AugmentSummary:
    """Counts over the whole job (earlier interrupted runs included)."""

    rows_in: int
    per_example: int
    generated: int = 0  # kept new examples
    filtered: dict[str, int] = field(default_factory=lambda: dict.fromkeys(FILTER_REASONS, 0))
    rows_resumed: int = 0  # rows finished by an earlier run and skipped by this one
    output: str = ""

    @property
    def attempts(self) -> int:
        return self.rows_in * self.per_example

    @property
    def rows_out(self) -> int:
        return self.rows_in + self.generated

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "attempts": self.attempts, "rows_out": self.rows_out}


@dataclass
class _Candidate:
    row: int
    method: str
    prompt: str
    prefix: str  # kept in front of the generated text (the opening, for continuations)
    max_new_tokens: int
    n: int = 1
    seed: int | None = None
    structured: Any = None  # the row's StructuredOutputsParams (json_schema mode)


# one generated text of a row: (method, text on one line, the JSON row in json_schema mode else None); text is
# None for a JSON row that does not parse
Made = tuple[str, "str | None", "dict[str, Any] | None"]


def _words(text: str) -> list[str]:
    return text.split()


def _one_line(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


class AugmentPrompts:
    """The model side of an augmentation job: each source row's candidate prompts and the texts the model
    writes for them, row by row (a row's candidates depend on the dataset and that row only, and sample ``j``
    of row ``i`` uses ``sample_seed(row_seed(seed, i), j)``, so any process or Ray actor gives a row the same
    texts). :class:`Augmenter` filters and writes them; :class:`gpt2lab.ray.AugmentPredictor` runs this part
    on Ray Data actors."""

    def __init__(self, generator: Generator, data: Dataset, *, text_column: str, label_column: str | None = None,
                 per_example: int = 2, methods: Sequence[str] = METHODS, params: SamplingParams | None = None,
                 opening: float = 0.5, shots: int = 3, json_schema: dict[str, Any] | None = None) -> None:
        if not isinstance(per_example, int) or not 1 <= per_example <= 100:
            raise ValueError(f"per_example must be an integer in [1, 100], got {per_example!r}")
        bad = [m for m in methods if m not in METHODS]
        if bad or not methods:
            raise ValueError(f"methods must be some of {', '.join(METHODS)}, got {', '.join(methods) or '(none)'}")
        if not 0 < opening < 1:
            raise ValueError(f"opening must be a fraction in (0, 1) of the example's words, got {opening!r}")
        if not isinstance(shots, int) or not 1 <= shots <= 20:
            raise ValueError(f"shots must be an integer in [1, 20], got {shots!r}")
        self.gen, self.data = generator, data
        self.text_column, self.label_column = text_column, label_column
        self.schema = _row_schema(json_schema, text_column, label_column, data.columns) \
            if json_schema is not None else None
        if self.schema is not None:  # rows are written as JSON lines after a few-shot list
            methods = ["few-shot"] if list(methods) == list(METHODS) else methods
            if "continuation" in methods:
                raise ValueError("with a JSON Schema, new rows are written few-shot as JSON objects: "
                                 "method continuation does not apply")
        self.per_example, self.methods = per_example, list(methods)
        self.params = (params or SamplingParams(**DEFAULTS)).with_(n=1)
        if self.params.num_beams > 1:
            raise ValueError("augment samples varied examples: num_beams must be 1")
        self.opening, self.shots = opening, shots
        by_label: dict[str, list[int]] = defaultdict(list)
        for i, row in enumerate(data.rows):
            if (row.get(text_column) or "").strip():
                by_label[self._label_key(row)].append(i)
        self.by_label = by_label

    def _label_key(self, row: dict[str, Any]) -> str:
        return "" if self.label_column is None else json.dumps(row.get(self.label_column), sort_keys=True)

    def _budget(self, text: str) -> int:
        if self.params.max_new_tokens is not None:
            return self.params.max_new_tokens
        n = len(self.gen.tokenizer.encode(text))
        return max(8, min(2 * n, 256, self.gen.config.n_positions // 2))

    def _candidates(self, i: int) -> list[_Candidate]:
        from ..generation.engine import row_seed, sample_seed

        if self.schema is not None:
            return self._json_candidates(i)
        row = self.data.rows[i]
        text = _one_line(row.get(self.text_column) or "")
        seed = None if self.params.seed is None else row_seed(self.params.seed, i)
        rng = random.Random(seed)
        others = [j for j in self.by_label.get(self._label_key(row), []) if j != i]
        budget = self._budget(text)
        methods = [self.methods[k % len(self.methods)] for k in range(self.per_example)]
        if not others:
            methods = ["continuation"] * self.per_example  # a label with one example has nothing to show
        out: list[_Candidate] = []
        n_cont = methods.count("continuation")
        if n_cont:  # one request, samples 0 .. n_cont - 1 of the row
            words = _words(text)
            keep = min(max(1, round(self.opening * len(words))), max(1, len(words) - 1))
            opening = " ".join(words[:keep])
            out.append(_Candidate(i, "continuation", opening, opening, budget, n=n_cont, seed=seed))
        for k in range(methods.count("few-shot")):  # sample n_cont + k of the row
            shots = rng.sample(others, min(self.shots, len(others)))
            if self.label_column is not None:
                head = f"Examples of texts with {self.label_column} {_cell(row.get(self.label_column))}:\n"
            else:
                head = "Examples of texts:\n"
            lines = "".join(f"Text: {_one_line(self.data.rows[j][self.text_column])}\n" for j in shots)
            out.append(_Candidate(i, "few-shot", head + lines + "Text:", "", budget,
                                  seed=None if seed is None else sample_seed(seed, n_cont + k)))
        return out

    def _json_candidates(self, i: int) -> list[_Candidate]:
        """``per_example`` few-shot prompts of rows with row ``i``'s label as JSON objects (row ``i`` itself when
        it is the only one), each held to the schema with the label pinned; seeded as :meth:`_candidates`."""
        from ..generation.engine import row_seed, sample_seed
        from ..sampling import StructuredOutputsParams

        row = self.data.rows[i]
        seed = None if self.params.seed is None else row_seed(self.params.seed, i)
        rng = random.Random(seed)
        others = [j for j in self.by_label.get(self._label_key(row), []) if j != i] or [i]
        schema = json.loads(json.dumps(self.schema))
        if self.label_column in schema["properties"]:
            schema["properties"][self.label_column] = {"const": row.get(self.label_column)}
            schema["required"] = sorted({*schema.get("required", []), self.label_column})
        spec = StructuredOutputsParams(json=schema)
        out = []
        for k in range(self.per_example):  # sample k of the row
            lines = [json.dumps({c: self.data.rows[j].get(c) for c in self.schema["properties"]}, ensure_ascii=False)
                     for j in rng.sample(others, min(self.shots, len(others)))]
            # at least 64 tokens: a row cut at the limit does not parse, and the schema may allow longer
            # strings than the shots hold
            budget = self.params.max_new_tokens or max(64, min(2 * max(len(self.gen.tokenizer.encode(line))
                                                                         for line in lines),
                                                               self.gen.config.n_positions // 2))
            out.append(_Candidate(i, "few-shot", "".join(line + "\n" for line in lines), "", budget,
                                  seed=None if seed is None else sample_seed(seed, k), structured=spec))
        return out

    def generate(self, rows: Sequence[int]) -> dict[int, list[Made]]:
        """The generated texts of source ``rows`` (indices into the dataset), every candidate in one continuous
        batch: row -> ``[(method, text, fields), ...]`` (text on one line, a continuation with its opening;
        ``fields``: the JSON row in json_schema mode, else None; there a row that does not parse, cut at the
        length limit, has text None); a row whose text is empty has none. Raises ``GenerationFailed`` when the
        engine ends a candidate with an error."""
        cands = [c for i in rows if (self.data.rows[i].get(self.text_column) or "").strip()
                 for c in self._candidates(i)]
        if not cands:
            return {}
        runner = self.gen.runner()
        stop = [*self.params.stop, "\n"]  # an example is one line
        for c_id, c in enumerate(cands):
            p = self.params.with_(max_new_tokens=c.max_new_tokens, max_length=None, n=c.n, seed=c.seed, stop=stop,
                                  truncate_prompt=True, structured_outputs=c.structured)
            runner.add(self.gen.encode_prompt(c.prompt), p, request_id=str(c_id), source=f"candidate {c_id}")
        runner.run()  # a failed candidate raises GenerationFailed (it was dropped as an "empty" one)
        result: dict[int, list[Made]] = defaultdict(list)
        for c_id, c in enumerate(cands):
            for completion in runner.completions(str(c_id)):
                body = completion.text
                if c.structured is not None:
                    fields = _parse_row(body) if completion.finish_reason == "stop" else None
                    text = None if fields is None else _one_line(str(fields.get(self.text_column) or ""))
                    result[c.row].append((c.method, text, fields))
                    continue
                if c.prefix and not any(ch.isalnum() for ch in body):  # adds no word, only punctuation: "empty"
                    result[c.row].append((c.method, "", None))
                    continue
                result[c.row].append((c.method, _one_line(c.prefix + body) if c.prefix else _one_line(body), None))
        return result


# the generated texts of rows start.., in row order: (row, [(method, text, fields), ...]) for every row
GeneratedRows = Iterable[tuple[int, list[Made]]]


class Augmenter:
    """Build and run an augmentation job; :func:`augment` is the one-call form."""

    def __init__(self, generator: Generator, data: Dataset, out: str | Path, *, text_column: str,
                 label_column: str | None = None, per_example: int = 2, methods: Sequence[str] = METHODS,
                 params: SamplingParams | None = None, similarity: float = 0.8, min_words: int = 3,
                 max_words: int | None = None, opening: float = 0.5, shots: int = 3, batch_rows: int = 8,
                 json_schema: dict[str, Any] | None = None) -> None:
        self.prompts = AugmentPrompts(generator, data, text_column=text_column, label_column=label_column,
                                      per_example=per_example, methods=methods, params=params, opening=opening,
                                      shots=shots, json_schema=json_schema)
        if not isinstance(min_words, int) or min_words < 0:
            raise ValueError(f"min_words must be an integer >= 0, got {min_words!r}")
        if max_words is not None and (not isinstance(max_words, int) or max_words < max(1, min_words)):
            raise ValueError(f"max_words must be an integer >= max(1, min_words={min_words}), got {max_words!r}")
        self.gen, self.data, self.out = generator, data, Path(out)
        if self.out.resolve() == data.path.resolve():
            raise ValueError(f"--out {self.out} is the input file; choose another output")
        data_format(self.out, "output")
        check_output_file(self.out)
        self.text_column, self.label_column = text_column, label_column
        self.per_example, self.params, self.schema = per_example, self.prompts.params, self.prompts.schema
        self.min_words = min_words
        longest = max(len(_words(r.get(text_column) or "")) for r in data.rows)
        self.max_words = max_words if max_words is not None else max(2 * longest, min_words + 1, 10)
        self.batch_rows = max(1, batch_rows)
        self.index = NearDuplicateIndex(similarity)
        self.columns = [*data.columns, *ADDED_COLUMNS]
        self.progress_path = self.out.with_name(self.out.name + ".progress")

    # -- resumable state --------------------------------------------------------------------------
    def _job_header(self) -> dict[str, Any]:
        header = {"job": "augment", "input": str(self.data.path.resolve()), "rows": len(self.data.rows),
                  "text_column": self.text_column, "label_column": self.label_column,
                  "per_example": self.per_example, "columns": self.columns}
        if self.schema is not None:
            header["json_schema"] = self.schema
        return header

    def _resume(self, summary: AugmentSummary) -> int:
        """Read the progress log and truncate the output to its finished rows; the next row to do."""
        header = self._job_header()
        if not self.progress_path.exists():
            if self.out.exists() and self.out.stat().st_size > 0:
                raise ValueError(f"{self.out} exists and has no progress log {self.progress_path.name}, so it is "
                                 "not a resumable augment output; choose another --out or remove it")
            self._write_progress_header(header)
            return 0
        # complete lines only: a kill can tear the last one (the row it logged is then redone)
        lines = [(raw.decode("utf-8", errors="replace"), end) for raw, end in complete_lines(self.progress_path)]
        try:
            first = parse_json(lines[0][0], self.progress_path, line=1) if lines else None
        except ReadError:
            first = None
        if first is None:  # killed while writing the header: nothing was done
            self._write_progress_header(header)
            self.out.unlink(missing_ok=True)
            return 0
        if first != header:
            diff = [k for k in header if first.get(k) != header[k]]
            raise ValueError(f"{self.out} was started with other settings (different: {', '.join(diff)}); rerun "
                             "with the same ones to resume, or choose another --out")
        done, keep, good = 0, 0, lines[0][1]
        for number, (line, end) in enumerate(lines[1:], 2):
            entry = parse_json(line, self.progress_path, line=number)
            if entry["row"] != done:
                raise ValueError(f"{self.progress_path}: rows out of order; remove it and {self.out} to start over")
            done += 1
            keep += 1 + entry["kept"]
            summary.generated += entry["kept"]
            for reason, count in entry["filtered"].items():
                summary.filtered[reason] = summary.filtered.get(reason, 0) + count
            good = end
        if good < self.progress_path.stat().st_size:
            with open(self.progress_path, "r+b") as f:
                f.truncate(good)
        if not self.out.exists():
            if done:
                raise ValueError(f"{self.out} is missing but {self.progress_path.name} says {done} rows are done; "
                                 "remove the progress file to start over")
            return 0
        if done == 0:
            self.out.unlink()
            return 0
        records, offset = _read_output(self.out, self.columns, keep)
        with open(self.out, "r+b") as f:  # drop a partly written row and any torn line after the last done row
            f.truncate(offset)
            os.fsync(f.fileno())
        for record in records:
            if record.get(ORIGIN) == "generated":
                self.index.add(str(record.get(self.text_column) or ""))
        summary.rows_resumed = done
        return done

    def _write_progress_header(self, header: dict[str, Any]) -> None:
        write_file(self.progress_path, json.dumps(header) + "\n")  # a rewrite; the rows after it are appends

    def _log_row(self, row: int, kept: int, filtered: dict[str, int]) -> None:
        with naming(self.progress_path), open(self.progress_path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"row": row, "kept": kept, "filtered": filtered}) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def _judge(self, text: str | None) -> str | None:
        if text is None:
            return "invalid_json"
        if not text:
            return "empty"
        n = len(_words(text))
        if n < self.min_words:
            return "too_short"
        if n > self.max_words:
            return "too_long"
        return self.index.check(text)

    # -- run --------------------------------------------------------------------------------------
    def run(self, progress: Callable[[int, int], None] | None = None,
            generated: Callable[[int], GeneratedRows] | None = None) -> AugmentSummary:
        """Augment every row not done yet; ``progress(done_rows, total_rows)`` after each row.

        ``generated(start)``: the generated texts of rows ``start..`` in row order, one entry per row (see
        :meth:`AugmentPrompts.generate`); default: this process's engine, ``batch_rows`` rows at a time.
        :mod:`gpt2lab.ray` passes Ray Data's. Filtering and writing happen here, row by row in order, so the
        output is the same whoever generated the texts."""
        rows = self.data.rows
        summary = AugmentSummary(rows_in=len(rows), per_example=self.per_example, output=str(self.out))
        for row in rows:
            self.index.add(str(row.get(self.text_column) or ""))
        start = self._resume(summary)
        if progress:
            progress(start, len(rows))
        writer = _Output(self.out, self.columns)
        expected = start
        try:
            for i, made in (generated or self._generate_here)(start):
                if i != expected:
                    raise RuntimeError(f"augment: generated texts came for row {i}, expected row {expected}")
                expected += 1
                self._write_row(i, made, writer, summary)
                if progress:
                    progress(i + 1, len(rows))
        finally:
            writer.close()
        if expected != len(rows):
            raise RuntimeError(f"augment: generated texts stopped at row {expected} of {len(rows)}")
        return summary

    def _generate_here(self, start: int) -> GeneratedRows:
        for first in range(start, len(self.data.rows), self.batch_rows):
            batch = range(first, min(first + self.batch_rows, len(self.data.rows)))
            made = self.prompts.generate(batch)
            for i in batch:
                yield i, made.get(i, [])

    def _write_row(self, i: int, made: list[Made], writer: _Output, summary: AugmentSummary) -> None:
        """Row ``i`` and its kept examples on disk, then its line in the progress log."""
        row = self.data.rows[i]
        filtered = dict.fromkeys(FILTER_REASONS, 0)
        writer.write({**row, ORIGIN: "original", SOURCE_ROW: i, METHOD: ""})
        kept = 0
        if not (row.get(self.text_column) or "").strip():
            filtered["empty_source"] = self.per_example
        for method, text, fields in made:
            reason = self._judge(text)
            if reason:
                filtered[reason] += 1
                continue
            self.index.add(text)
            writer.write({**row, **(fields or {}), self.text_column: text, ORIGIN: "generated", SOURCE_ROW: i,
                          METHOD: method})
            kept += 1
        filtered = {k: v for k, v in filtered.items() if v}
        self._log_row(i, kept, filtered)  # after the row's records are on disk
        summary.generated += kept
        for reason, count in filtered.items():
            summary.filtered[reason] += count


def _parse_row(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def _row_schema(schema: Any, text_column: str, label_column: str | None, columns: Sequence[str]) -> dict[str, Any]:
    """``schema`` checked as the JSON Schema of a dataset row: an object whose properties are columns, the text
    column (a string) among them; ``ValueError`` saying what is wrong."""
    if not isinstance(schema, dict) or schema.get("type") != "object" or not isinstance(schema.get("properties"),
                                                                                           dict):
        raise ValueError('json_schema must describe a row: {"type": "object", "properties": {column: schema, ...}}')
    props = schema["properties"]
    unknown = [c for c in props if c not in columns]
    if unknown:
        raise ValueError(f"json_schema: properties {', '.join(unknown)} are not columns of the dataset "
                         f"(columns: {', '.join(columns)})")
    if text_column not in props:
        raise ValueError(f"json_schema: the text column {text_column!r} must be one of its properties")
    schema = {**schema, "required": sorted({*schema.get("required", []), text_column})}
    from ..sampling import StructuredOutputsParams

    StructuredOutputsParams(json=schema).validate()  # ValueError naming structured_outputs.json
    return schema


def augment(generator: Generator, data: str | Path, out: str | Path, *, text_column: str = "text",
            label_column: str | None = None, per_example: int = 2,
            progress: Callable[[int, int], None] | None = None, **options: Any) -> AugmentSummary:
    """Augment the dataset file ``data`` into ``out`` (resuming if ``out`` is a partial run of the same job).

    ``options``: ``methods``, ``params`` (SamplingParams), ``similarity``, ``min_words``, ``max_words``,
    ``opening``, ``shots``, ``batch_rows``, ``json_schema`` (see :class:`Augmenter`).
    """
    dataset = read_dataset(data, text_column, label_column)
    job = Augmenter(generator, dataset, out, text_column=text_column, label_column=label_column,
                    per_example=per_example, **options)
    return job.run(progress)


def read_output(path: str | Path) -> list[dict[str, Any]]:
    """Every record of an augment output (for inspection and tests)."""
    path = Path(path)
    fmt = data_format(path, "output")
    return [record for _, record in read_records(path, fmt)]
