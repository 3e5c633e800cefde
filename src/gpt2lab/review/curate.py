"""The curated dataset of a curation review: the ``augment`` output minus what reviewers rejected.

Rules, over every reviewer's latest judgement of each item: a generated row is dropped when any
reviewer rejected it, or when nobody reviewed it (unless ``keep_unreviewed``); an edited row keeps the
latest edit's text. Original rows are always kept. Columns, their order, labels and the file format
(CSV/TSV/JSONL) are those of the input.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..atomic import write_file
from .reviewset import ReviewSet
from .summary import latest


@dataclass
class CurationResult:
    rows_in: int
    rows_out: int
    accepted: int
    edited: int
    rejected: int
    unreviewed: int
    output: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def export_curated(review: ReviewSet, records: list[dict[str, Any]], out: str | Path, *,
                   keep_unreviewed: bool = False) -> CurationResult:
    """Write the curated dataset to ``out`` atomically, in the input's format (``out``'s suffix must match).

    Raises ``ValueError`` when the review set is not a curation set, the input changed since ``make``, or
    ``records`` are not empty yet judge none of this review's items (another review's log).
    """
    from ..apps.augment import data_format, read_dataset

    if review.mode != "curation" or not review.dataset:
        raise ValueError(f"export needs a curation review file (made with --augment), this one is {review.mode}")
    ds = review.dataset
    out = Path(out)
    try:
        style = data_format(out, "output")
    except ValueError:
        style = None
    if style != ds["format"]:
        raise ValueError(f"--out {out}: the input is {ds['format']}; give a .{ds['format']} output to keep its format")
    if out.resolve() == Path(ds["path"]).resolve():
        raise ValueError(f"--out {out} is the input file; choose another output")
    data = read_dataset(ds["path"], ds["text_column"], augmented=True)
    if len(data.rows) != ds.get("rows", len(data.rows)) or data.columns != ds.get("columns", data.columns):
        raise ValueError(f"{ds['path']}: changed since the review file was made (rows or columns differ)")
    by_item = {it.id: it for it in review.items}
    state: dict[int, str] = {}  # row -> reject | edit | accept, in that order of precedence
    edits: dict[int, str] = {}
    rank = {"accept": 0, "edit": 1, "reject": 2}
    mine = [r for r in records if r.get("mode") == "curation" and r.get("item") in by_item]
    if records and not mine:  # another review's log: exporting would silently drop every generated row
        raise ValueError(f"the log holds {len(records)} judgement(s) but none of this review's items; is it the "
                         "log of this review file?")
    for r in latest(mine):
        row = by_item[r["item"]].row
        if rank[r["decision"]] >= rank[state.get(row, "accept")]:
            state[row] = r["decision"]
        if r["decision"] == "edit":
            edits[row] = str(r["text"])  # records are in time order: the latest edit wins
    review_rows = {it.row for it in review.items}
    unreviewed = review_rows - set(state)
    drop = {row for row, s in state.items() if s == "reject"} | (set() if keep_unreviewed else unreviewed)
    kept = []
    for i, row in enumerate(data.rows):
        if i in drop:
            continue
        kept.append({**row, ds["text_column"]: edits[i]} if state.get(i) == "edit" else row)
    write_file(out, _serialise(kept, data.columns, ds["format"]))
    states = list(state.values())
    return CurationResult(len(data.rows), len(kept), states.count("accept"), states.count("edit"),
                          states.count("reject"), len(unreviewed), str(out))


def _serialise(rows: list[dict[str, Any]], columns: list[str], fmt: str) -> str:
    if fmt == "jsonl":
        return "".join(json.dumps({c: r[c] for c in columns if c in r}, ensure_ascii=False) + "\n" for r in rows)
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="," if fmt == "csv" else "\t", lineterminator="\n")
    writer.writerow(columns)
    for r in rows:
        writer.writerow(["" if r.get(c) is None else r[c] if isinstance(r[c], str) else json.dumps(r[c])
                         for c in columns])
    return buf.getvalue()
