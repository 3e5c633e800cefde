"""Data augmentation: accounting, labels, filters, resuming after SIGKILL, bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import pytest
import torch
from typer.testing import CliRunner

import gpt2lab
from gpt2lab.apps.augment import (
    ADDED_COLUMNS,
    NearDuplicateIndex,
    augment,
    jaccard,
    read_dataset,
    read_output,
    shingles,
)
from gpt2lab.cli.main import app
from gpt2lab.sampling import SamplingParams

from .conftest import SHAPES, make_hf_checkpoint

REVIEWS = [
    ("The movie was wonderful and I loved every minute of it", "pos"),
    ("A dull and lifeless film that wasted two hours of my life", "neg"),
    ("Great acting and a moving story, highly recommended to all", "pos"),
    ("Terrible script; I walked out halfway through the show", "neg"),
    ("Beautiful music and photography, a real treat for the eyes", "pos"),
    ("The plot made no sense and the ending was even worse", "neg"),
]


@pytest.fixture(scope="module")
def aug_model(tmp_path_factory):
    path = make_hf_checkpoint(tmp_path_factory.mktemp("augment-model"), seed=4, **SHAPES["tiny"])
    return path, gpt2lab.load(path)


def write_csv(path, rows, header=("id", "text", "label")):
    with open(path, "w", encoding="utf-8", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


def check_output(records, originals, text_column, label_column, per_example, summary):
    """Every original once, in order, each followed by its generated rows, labels and columns kept."""
    by_row = Counter(int(r["aug_source_row"]) for r in records)
    originals_seen = [int(r["aug_source_row"]) for r in records if r["aug_origin"] == "original"]
    assert originals_seen == list(range(len(originals)))
    assert summary.rows_out == len(records) == len(originals) + summary.generated
    assert summary.generated + sum(summary.filtered.values()) == summary.attempts == len(originals) * per_example
    for r in records:
        source = originals[int(r["aug_source_row"])]
        for column, value in source.items():
            if column != text_column:
                assert r[column] == value  # label and every other column kept
        if r["aug_origin"] == "original":
            assert r[text_column] == source[text_column] and r["aug_method"] == ""
        else:
            assert r["aug_origin"] == "generated" and r["aug_method"] in ("continuation", "few-shot")
            assert r[text_column].strip() and r[text_column] != source[text_column]
    assert all(count <= 1 + per_example for count in by_row.values())
    texts = [r[text_column] for r in records if r["aug_origin"] == "generated"]
    assert len(set(texts)) == len(texts)


def test_csv_accounting_and_labels(aug_model, tmp_path):
    _, gen = aug_model
    rows = [(i + 1, t, lab) for i, (t, lab) in enumerate(REVIEWS)] + [(7, "", "pos")]
    data = write_csv(tmp_path / "reviews.csv", rows)
    out = tmp_path / "aug.csv"
    seen = []
    summary = augment(gen, data, out, text_column="text", label_column="label", per_example=3,
                      params=SamplingParams(temperature=1.0, top_k=50, max_new_tokens=12, seed=1),
                      progress=lambda done, total: seen.append((done, total)))
    records = read_output(out)
    originals = read_dataset(data, "text", "label").rows
    check_output(records, originals, "text", "label", 3, summary)
    assert summary.filtered["empty_source"] == 3  # the row with no text: kept, nothing generated from it
    assert seen[-1] == (7, 7)
    assert list(records[0]) == ["id", "text", "label", *ADDED_COLUMNS]
    methods = Counter(r["aug_method"] for r in records if r["aug_origin"] == "generated")
    assert methods["continuation"] > 0 and methods["few-shot"] > 0
    # a continuation starts with the example's opening
    first = [r for r in records if r["aug_method"] == "continuation" and r["aug_source_row"] == "0"]
    assert first and all(r["text"].startswith("The movie was wonderful") for r in first)
    # a finished job rerun has nothing to do and reports the same totals
    again = augment(gen, data, out, text_column="text", label_column="label", per_example=3,
                    params=SamplingParams(temperature=1.0, top_k=50, max_new_tokens=12, seed=1))
    assert again.rows_resumed == 7 and again.generated == summary.generated and read_output(out) == records


def test_jsonl_filters(aug_model, tmp_path):
    _, gen = aug_model
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"review": t, "stars": 5 if lab == "pos" else 1, "meta": {"i": i}}) + "\n"
                            for i, (t, lab) in enumerate(REVIEWS)), encoding="utf-8")
    out = tmp_path / "aug.jsonl"
    # continuations that keep 90% of the example and add one token are near copies of it
    summary = augment(gen, data, out, text_column="review", label_column="stars", per_example=2,
                      methods=["continuation"], opening=0.9, similarity=0.7,
                      params=SamplingParams(max_new_tokens=1, seed=2))
    assert summary.filtered["near_duplicate"] + summary.filtered["duplicate"] >= 10
    records = read_output(out)
    check_output(records, [json.loads(line) for line in data.read_text().splitlines()], "review", "stars", 2, summary)
    assert isinstance(records[0]["stars"], int) and records[0]["meta"] == {"i": 0}  # JSON types kept
    # length bounds
    out2 = tmp_path / "aug2.jsonl"
    summary = augment(gen, data, out2, text_column="review", label_column="stars", per_example=2,
                      methods=["few-shot"], min_words=50, params=SamplingParams(max_new_tokens=10, seed=2))
    assert summary.filtered["too_short"] == 12 and summary.generated == 0
    assert len(read_output(out2)) == 6


def test_near_duplicate_index():
    a, b = "The movie was wonderful and I loved it", "the movie was  wonderful and I loved it!"
    assert jaccard(shingles(a), shingles(b)) > 0.8
    index = NearDuplicateIndex(0.8)
    index.add(a)
    assert index.check(a.upper()) == "duplicate"
    assert index.check(b) == "near_duplicate"
    assert index.check("Something else entirely, about cats and dogs") is None
    assert NearDuplicateIndex(1.0).check(b) is None
    with pytest.raises(ValueError, match="similarity"):
        NearDuplicateIndex(0)


def test_resume_after_partial_row(aug_model, tmp_path):
    """The state a kill can leave (a row half written, a torn line, no progress entry) is repaired on rerun."""
    _, gen = aug_model
    data = write_csv(tmp_path / "reviews.csv", [(i, t, lab) for i, (t, lab) in enumerate(REVIEWS)])
    options = dict(text_column="text", label_column="label", per_example=2,
                   params=SamplingParams(max_new_tokens=8, seed=3))
    whole = tmp_path / "whole.csv"
    augment(gen, data, whole, **options)
    expected = whole.read_bytes()
    lines = expected.splitlines(keepends=True)
    progress = (tmp_path / "whole.csv.progress").read_text().splitlines(keepends=True)
    kept_before = sum(1 + json.loads(p)["kept"] for p in progress[1:4])  # rows 0-2 finished
    broken = tmp_path / "broken.csv"
    # rows 0-2 complete, row 3's original and half of its next line on disk, row 3 not logged
    broken.write_bytes(b"".join(lines[:1 + kept_before + 1]) + lines[1 + kept_before + 1][:7])
    (tmp_path / "broken.csv.progress").write_text("".join(progress[:4]) + progress[4][:5])
    summary = augment(gen, data, broken, **options)
    assert summary.rows_resumed == 3
    assert broken.read_bytes() == expected  # seeded per row: the same as an uninterrupted run
    with pytest.raises(ValueError, match="other settings .different: per_example"):
        augment(gen, data, broken, **{**options, "per_example": 3})


def test_resume_copes_with_a_torn_multibyte_character(aug_model, tmp_path):
    """A kill in the middle of a UTF-8 character at the end of the output: the rerun still resumes."""
    _, gen = aug_model
    data = tmp_path / "reviews.jsonl"
    data.write_text("".join(json.dumps({"text": f"\u00e9t\u00e9 \u2028 {t} \U0001f600", "label": lab},
                                       ensure_ascii=False) + "\n" for t, lab in REVIEWS), encoding="utf-8")
    options = dict(text_column="text", label_column="label", per_example=1,
                   params=SamplingParams(max_new_tokens=6, seed=5))
    whole = tmp_path / "whole.jsonl"
    augment(gen, data, whole, **options)
    expected = whole.read_bytes()
    lines = expected.split(b"\n")
    progress = (tmp_path / "whole.jsonl.progress").read_text().splitlines(keepends=True)
    kept_before = sum(1 + json.loads(p)["kept"] for p in progress[1:3])  # rows 0-1 finished
    torn_line = lines[kept_before]
    cut = torn_line.index("\u00e9".encode()) + 1  # inside the two bytes of the first é
    broken = tmp_path / "broken.jsonl"
    broken.write_bytes(b"".join(line + b"\n" for line in lines[:kept_before]) + torn_line[:cut])
    (tmp_path / "broken.jsonl.progress").write_text("".join(progress[:3]))
    summary = augment(gen, data, broken, **options)
    assert summary.rows_resumed == 2
    assert broken.read_bytes() == expected


@pytest.mark.slow
def test_sigkill_then_rerun_every_row_once(aug_model, tmp_path):
    path, gen = aug_model
    rows = [(i, f"{t} (take {i})", lab) for i in range(4) for t, lab in REVIEWS]
    data = write_csv(tmp_path / "big.csv", rows)
    out = tmp_path / "big-aug.jsonl"
    cmd = [sys.executable, "-m", "gpt2lab", "augment", str(data), "--text-column", "text", "--label-column", "label",
           "--per-example", "2", "--out", str(out), "--model", str(path), "--max-new-tokens", "6", "--seed", "9"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    progress = tmp_path / "big-aug.jsonl.progress"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if progress.exists() and len(progress.read_text().splitlines()) >= 4:  # header + 3 rows done
            break
        time.sleep(0.02)
    assert proc.poll() is None, "finished before it could be interrupted"
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    done_before = len(progress.read_text().splitlines()) - 1
    assert 3 <= done_before < len(rows)
    rerun = CliRunner().invoke(app, [*cmd[3:], "--json"])  # the same command again
    assert rerun.exit_code == 0, rerun.output
    summary = json.loads(rerun.stdout)
    assert summary["rows_resumed"] >= 3
    records = read_output(out)
    originals = [r for r in records if r["aug_origin"] == "original"]
    assert [r["aug_source_row"] for r in originals] == list(range(len(rows)))  # every row exactly once
    assert summary["rows_out"] == len(records)
    assert summary["generated"] + sum(summary["filtered"].values()) == 2 * len(rows)
    for r in records:
        assert r["label"] == rows[r["aug_source_row"]][2]
    texts = [r["text"] for r in records if r["aug_origin"] == "generated"]
    assert len(texts) == len(set(texts)) == summary["generated"]


def test_bad_input_errors(aug_model, tmp_path):
    path, _ = aug_model
    runner = CliRunner()
    good = write_csv(tmp_path / "good.csv", [(1, "hello world", "a")])
    empty_csv = tmp_path / "empty.csv"
    empty_csv.write_text("id,text,label\n", encoding="utf-8")
    empty_jsonl = tmp_path / "empty.jsonl"
    empty_jsonl.write_text("\n", encoding="utf-8")
    latin = tmp_path / "latin.csv"
    latin.write_bytes("id,text\n1,caf\u00e9 cr\u00e8me\n".encode("latin-1"))
    bad_json = tmp_path / "bad.jsonl"
    bad_json.write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    ragged = tmp_path / "ragged.csv"
    ragged.write_text("id,text\n1,a,b\n", encoding="utf-8")
    taken = tmp_path / "taken.csv"
    taken.write_text("x\n", encoding="utf-8")
    cases = [
        ([str(good), "--text-column", "body"], "good.csv: no column 'body' (--text-column); columns: id, text, label"),
        ([str(good), "--label-column", "y"], "no column 'y' (--label-column)"),
        ([str(empty_csv)], "empty.csv: empty dataset (no rows)"),
        ([str(empty_jsonl)], "empty.jsonl: empty dataset (no rows)"),
        ([str(latin)], "latin.csv:2: not valid UTF-8 (byte 0xe9 at column 6)"),
        ([str(bad_json)], "bad.jsonl:2: not valid JSON"),
        ([str(ragged)], "ragged.csv:2: 3 fields, the header has 2"),
        ([str(tmp_path / "missing.csv")], "missing.csv: data file not found"),
        ([str(tmp_path / "data.txt")], "unknown data format '.txt'"),
        ([str(good), "--per-example", "0"], "per_example must be an integer in [1, 100]"),
        ([str(good), "--similarity", "1.5"], "similarity must be in (0, 1]"),
        ([str(good), "--method", "paraphrase"], "methods must be some of continuation, few-shot"),
        ([str(good), "--top-k", "-2"], "top_k must be an integer >= 0"),  # -1 is vLLM's "off"
    ]
    for args, message in cases:
        out = ["--out", str(taken if "taken" in message else tmp_path / "o.csv")]
        result = runner.invoke(app, ["augment", *args, *out, "--model", str(path)])
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output and "Traceback" not in result.output, (message, result.output)
    result = runner.invoke(app, ["augment", str(good), "--out", str(taken), "--model", str(path)])
    assert result.exit_code == 2 and "taken.csv exists and has no progress log" in result.output
    result = runner.invoke(app, ["augment", str(good), "--out", str(good), "--model", str(path)])
    assert result.exit_code == 2 and "is the input file" in result.output


def test_a_continuation_that_adds_no_word_is_empty(aug_model, tmp_path):
    """The opening plus only punctuation (",") was kept as a new example: it adds nothing."""
    _, gen = aug_model
    data = write_csv(tmp_path / "d.csv", [(1, "the cat sat on the mat today", "a"), (2, "a dog ran in the park", "a")])
    comma = gen.tokenizer.encode(",")
    assert len(comma) == 1
    params = SamplingParams(seed=1, max_new_tokens=1, logit_bias={comma[0]: 100.0})
    summary = augment(gen, data, tmp_path / "out.jsonl", label_column="label", per_example=2,
                      methods=["continuation"], params=params)
    assert summary.generated == 0 and summary.filtered["empty"] == 4, summary


def test_a_candidate_whose_settings_ban_every_token_fails_instead_of_counting_as_empty(aug_model, tmp_path):
    """A candidate the engine ended with an error (every token banned, NaN scores) was filtered as "empty",
    and the run reported success with nothing generated; the CLI now says why in one line, exit 2."""
    from gpt2lab.errors import GenerationFailed

    path, gen = aug_model
    data = write_csv(tmp_path / "d.csv", [(1, "the cat sat on the mat", "a"), (2, "a dog ran in the park", "a")])
    params = SamplingParams(seed=1, top_k=5, bad_words_ids=[[t] for t in range(gen.config.vocab_size)])
    with pytest.raises(GenerationFailed, match="every token masked"):
        augment(gen, data, tmp_path / "out.jsonl", label_column="label", per_example=1, params=params)
    nan = gpt2lab.load(path)
    with torch.no_grad():
        nan.model.h[0].mlp.c_fc.weight[0, 0] = float("nan")
    with pytest.raises(GenerationFailed, match="NaN"):
        augment(nan, data, tmp_path / "out2.jsonl", label_column="label", per_example=1)
