"""One reader per format for every command: BOM, line ends, invalid bytes, CSV quoting, bounded memory."""

from __future__ import annotations

import codecs
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from gpt2lab.apps.augment import read_dataset
from gpt2lab.evaluation.text import read_predictions
from gpt2lab.readers import (
                             CHUNK_CHARS,
                             ReadError,
                             iter_csv,
                             iter_text_chunks,
                             parse_jsonl,
                             read_records,
                             split_text,
)
from gpt2lab.tokenizer import Tokenizer
from gpt2lab.training.data import BATCH_CHARS, DataError, DataStats, iter_documents, tokenize_documents

ROOT = Path(__file__).resolve().parents[1]
# characters str.splitlines() splits on but JSON strings and CSV fields may hold
ODD = ["caf\u00e9 line\u2028separator", "next\u0085line", "form\x0cfeed and \x1c\x1d\x1e", "para\u2029graph\x0bvt"]


def _training(path: Path) -> list[str]:
    return ["".join(doc) for doc in iter_documents(path, stats=DataStats())]


def _augment(path: Path) -> list[str]:
    return [row["text"] for row in read_dataset(path, "text").rows]


def _eval(path: Path) -> list[str]:
    return read_predictions(path)[0]


def _prompts(path: Path) -> list[str]:
    from gpt2lab.cli.generate import _collect_prompts

    return _collect_prompts([], path)


CONSUMERS = {"training": _training, "augment": _augment, "eval": _eval, "prompts": _prompts}
SUPPORTS = {"jsonl": ["training", "augment", "eval", "prompts"], "csv": ["training", "augment"],
            "txt": ["eval", "prompts"]}


def _write(path: Path, fmt: str, texts: list[str], bom: bool) -> Path:
    if fmt == "jsonl":
        body = "".join(json.dumps({"text": t, "prompt": t}, ensure_ascii=False) + "\n" for t in texts)
    elif fmt == "csv":
        body = "text,prompt\n" + "".join(f'"{t}",x\n' for t in texts)
    else:
        body = "".join(t + "\n" for t in texts)
    path.write_bytes((codecs.BOM_UTF8 if bom else b"") + body.encode("utf-8"))
    return path


@pytest.mark.parametrize("fmt, consumer", [(f, c) for f, cs in SUPPORTS.items() for c in cs])
def test_every_command_reads_bom_and_odd_line_separators_the_same(tmp_path, fmt, consumer):
    """A BOM is dropped and only \\n ends a line, whichever command reads the file."""
    path = _write(tmp_path / f"data.{fmt}", fmt, ODD, bom=True)
    assert CONSUMERS[consumer](path) == ODD


def test_training_txt_keeps_the_file_whole_without_its_bom(tmp_path):
    path = _write(tmp_path / "doc.txt", "txt", ODD, bom=True)
    assert _training(path) == ["".join(t + "\n" for t in ODD)]


@pytest.mark.parametrize("fmt, consumer", [(f, c) for f, cs in SUPPORTS.items() for c in cs
                                            if c not in ("training", "prompts")])
def test_invalid_utf8_names_file_and_line(tmp_path, fmt, consumer):
    path = _write(tmp_path / f"bad.{fmt}", fmt, ["fine", "cafe au lait"], bom=False)
    path.write_bytes(path.read_bytes().replace(b"cafe", b"caf\xe9"))
    line = 3 if fmt == "csv" else 2  # the CSV header is line 1
    with pytest.raises(ValueError, match=rf"bad\.{fmt}:{line}: not valid UTF-8 \(byte 0xe9 at column \d+\)"):
        CONSUMERS[consumer](path)


def test_prompts_file_invalid_utf8_is_one_line(tmp_path):
    from typer.testing import CliRunner

    from gpt2lab.cli.main import app

    path = tmp_path / "p.txt"
    path.write_bytes(b"hello\ncaf\xe9\n")
    result = CliRunner().invoke(app, ["generate", "--file", str(path), "--model", "nowhere/none"])
    assert result.exit_code == 2
    assert result.output.strip() == f"gpt2lab: error: {path}:2: not valid UTF-8 (byte 0xe9 at column 4); " \
                                    "convert the file first, e.g. `iconv -f latin1 -t utf-8`"


def test_training_replaces_and_counts_invalid_bytes_in_every_format(tmp_path):
    for fmt in ("jsonl", "csv", "txt"):
        path = _write(tmp_path / f"d.{fmt}", fmt, ["ok", "cafe"], bom=False)
        path.write_bytes(path.read_bytes().replace(b"cafe", b"caf\xe9\xff"))
        stats = DataStats()
        docs = ["".join(d) for d in iter_documents(path, stats=stats)]
        assert stats.replaced_bytes == (4 if fmt == "jsonl" else 2), fmt  # JSONL holds it twice
        assert any("caf\ufffd\ufffd" in d for d in docs), fmt


@pytest.mark.parametrize("reader", ["training", "augment"])
def test_csv_with_an_unterminated_quote_is_an_error_with_its_line(tmp_path, reader):
    path = tmp_path / "broken.csv"
    path.write_text('text,label\n"fine",a\n"this quote never closes,b\nlater row,c\nand another,d\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.csv:3: malformed CSV: the quoted field opened in this row is "
                                         r"never closed"):
        CONSUMERS[reader](path)
    path.write_text('text,label\n"fine",a\n"closes late,b\nlater "row",c\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"broken\.csv:3: malformed CSV"):
        CONSUMERS[reader](path)


def test_csv_fields_may_hold_newlines_and_odd_separators(tmp_path):
    path = tmp_path / "ok.csv"
    path.write_text('text,label\n"two\nlines\u2028and more",a\nplain,b\n', encoding="utf-8")
    header, rows = iter_csv(path)
    assert header == ["text", "label"]
    assert list(rows) == [(2, {"text": "two\nlines\u2028and more", "label": "a"}), (4, {"text": "plain", "label": "b"})]


def test_jsonl_line_longer_than_the_bound_is_refused_not_read_whole(tmp_path):
    path = tmp_path / "long.jsonl"
    path.write_text('{"text": "a"}\n{"text": "' + "x" * 5000 + '"}\n', encoding="utf-8")
    from gpt2lab.readers import iter_jsonl

    with pytest.raises(ReadError, match=r"long\.jsonl:2: line longer than 1,000 bytes"):
        list(iter_jsonl(path, max_line_bytes=1000))


def test_text_chunks_are_bounded_and_rejoin_exactly(tmp_path):
    text = ("word " * 300_000) + "\u00e9\U0001f600" * 50_000 + "x" * 400_000  # no newline at all
    path = tmp_path / "one-line.txt"
    path.write_bytes(codecs.BOM_UTF8 + text.encode("utf-8"))
    pieces = list(iter_text_chunks(path, chunk_chars=CHUNK_CHARS))
    assert "".join(pieces) == text
    assert max(len(p) for p in pieces) <= CHUNK_CHARS
    assert len(pieces) > 3
    assert list(split_text(text)) == pieces


def test_chunked_tokenizing_gives_the_same_tokens(tmp_path):
    tokenizer = Tokenizer.gpt2()
    text = "It was the best of times,  it was the worst of times;\tno newline here. " * 3000
    assert "".join(split_text(text, 1000)) == text
    chunked = [i for part in tokenizer.encode_batch(list(split_text(text, 1000))) for i in part]
    assert chunked == tokenizer.encode(text)


def test_tokenizer_never_gets_more_than_a_bounded_batch(tmp_path):
    """A 3 MB file without a newline reaches the tokenizer in bounded pieces (it used to be one string)."""
    tokenizer = Tokenizer.gpt2()
    path = tmp_path / "big.txt"
    path.write_text("lorem ipsum dolor sit amet " * 120_000, encoding="utf-8")
    sizes: list[int] = []

    def encode(texts: list[str]) -> list[list[int]]:
        sizes.append(sum(len(t) for t in texts))
        return tokenizer.encode_batch(texts)

    import numpy as np

    stats = DataStats()
    tokenize_documents([path], encode, tokenizer.eos_token_id, tmp_path / "t.bin", np.dtype(np.uint16),
                       text_field="text", text_column="text", stats=stats, progress=False)
    assert max(sizes) <= BATCH_CHARS + CHUNK_CHARS
    tokens = np.fromfile(tmp_path / "t.bin", dtype=np.uint16)
    assert tokenizer.decode(tokens[:-1].tolist()) == path.read_text(encoding="utf-8")


@pytest.mark.slow
def test_long_line_file_is_tokenized_in_bounded_memory(tmp_path):
    """Peak memory of preparing a 4 MB one-line .txt (it grew by ~640 MB before, ~180 bytes/char)."""
    path = tmp_path / "one-line.txt"
    path.write_text("lorem ipsum dolor sit amet, consectetur " * 100_000, encoding="utf-8")
    script = textwrap.dedent(f"""
        import resource
        from gpt2lab.tokenizer import Tokenizer
        from gpt2lab.training.data import prepare_data
        tok = Tokenizer.gpt2()
        tok.encode("warm up")
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        prepare_data([{str(path)!r}], {str(tmp_path / 'cache')!r}, tokenizer=tok, val_share=0.0, progress=False)
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) // 1024)
    """)
    env = {"PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "PATH": "/usr/bin:/bin"}
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    grew_mb = int(out.stdout.split()[-1])
    assert grew_mb < 300, f"peak memory grew by {grew_mb} MB"


def test_read_records_by_suffix_and_unknown_format(tmp_path):
    path = _write(tmp_path / "d.jsonl", "jsonl", ["a", "b"], bom=True)
    assert [r["text"] for _, r in read_records(path)] == ["a", "b"]
    with pytest.raises(ReadError, match="unknown format"):
        list(read_records(tmp_path / "d.xlsx"))


def test_training_reports_broken_jsonl_as_data_error(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "a"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"d\.jsonl:2: not valid JSON"):
        _training(path)


def test_training_jsonl_gz_with_bom_and_odd_separators(tmp_path):
    """The compressed JSON Lines reader (training's Hugging Face formats) follows the same rules."""
    import gzip

    path = tmp_path / "data.jsonl.gz"
    body = "".join(json.dumps({"text": t}, ensure_ascii=False) + "\n" for t in ODD)
    path.write_bytes(gzip.compress(codecs.BOM_UTF8 + body.encode("utf-8")))
    assert _training(path) == ODD


# -- JSON Lines text already split into lines (stdin prompts): the same parser as the files ----------------
def test_parse_jsonl_numbers_lines_and_skips_blanks():
    lines = ['{"a": 1}', "", "   ", "[2, 3]", '"text"']
    assert list(parse_jsonl(lines, "f.jsonl")) == [(1, {"a": 1}), (4, [2, 3]), (5, "text")]


def test_parse_jsonl_bad_line_is_named():
    with pytest.raises(ReadError, match=r"^f\.jsonl:3: not valid JSON \("):
        list(parse_jsonl(['{"a": 1}', "", '{"a": '], "f.jsonl"))


def test_parse_jsonl_objects_only():
    assert list(parse_jsonl(['{"x": "y"}'], "d", objects=True)) == [(1, {"x": "y"})]
    with pytest.raises(ReadError, match=r"^d:2: expected a JSON object, got array$"):
        list(parse_jsonl(['{"x": 1}', "[1]"], "d", objects=True))


# -- one suffix table for every command ----------------------------------------------------------------------
def _write_format(path: Path, texts: list[str]) -> Path:
    """``texts`` as records with a "text" field, in the format ``path``'s suffix names."""
    import gzip

    from gpt2lab.readers import format_of

    fmt = format_of(path)
    if fmt in ("parquet", "arrow"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({"text": texts, "n": list(range(len(texts)))})
        if fmt == "parquet":
            pq.write_table(table, path, row_group_size=2)
        else:
            with pa.ipc.new_stream(str(path), table.schema) as writer:
                writer.write_table(table)
        return path
    if fmt == "txt":
        body = "".join(t + "\n" for t in texts)
    elif fmt in ("csv", "tsv"):
        sep = "," if fmt == "csv" else "\t"
        body = f"text{sep}n\n" + "".join(f'"{t}"{sep}{i}\n' for i, t in enumerate(texts))
    elif fmt == "json" and ".array" in path.name:
        body = json.dumps([{"text": t, "n": i} for i, t in enumerate(texts)], ensure_ascii=False)
    else:
        body = "".join(json.dumps({"text": t, "n": i}, ensure_ascii=False) + "\n" for i, t in enumerate(texts))
    data = codecs.BOM_UTF8 + body.encode("utf-8")
    path.write_bytes(gzip.compress(data) if path.name.endswith(".gz") else data)
    return path


def _suffix_files(tmp_path: Path) -> list[Path]:
    from gpt2lab.readers import FORMATS

    names = [f"d{suffix}" for suffix in FORMATS] + ["d.array.json", "d.array.json.gz"]
    return [_write_format(tmp_path / name, ODD) for name in names]


def test_every_format_of_the_table_reads_the_same_records(tmp_path):
    from gpt2lab.readers import FORMATS, format_of

    files = _suffix_files(tmp_path)
    assert {format_of(f) for f in files} == set(FORMATS.values())
    for path in files:
        records = [r for _, r in read_records(path)]
        texts = records if format_of(path) == "txt" else [r["text"] for r in records]
        assert texts == ODD, path.name


@pytest.mark.parametrize("consumer, formats", [
    ("training", {"txt", "jsonl", "json", "csv", "tsv", "parquet", "arrow"}),
    ("augment", {"jsonl", "json", "csv", "tsv"}),
    ("eval", {"txt", "jsonl"}),
])
def test_each_command_reads_its_formats_through_the_table(tmp_path, consumer, formats):
    """Training, augment and eval decide a file's format by the one table (a .tsv is a table for training
    too, a .ndjson or .jsonl.gz is JSON Lines for every command that reads JSON Lines)."""
    from gpt2lab.readers import format_of

    read = {"training": _training, "augment": _augment, "eval": _eval}[consumer]
    for path in _suffix_files(tmp_path):
        if format_of(path) not in formats or (consumer == "training" and format_of(path) == "txt"):
            continue
        assert read(path) == ODD, path.name


def test_a_json_file_read_whole_is_bounded_in_size(tmp_path):
    """A JSON file gpt2lab parses whole (a config, an index) is refused past its bound, not parsed into
    memory; a compressed one is not even decompressed past it."""
    import gzip

    from gpt2lab.readers import read_json

    body = json.dumps({"pad": "x" * 1000})
    (tmp_path / "big.json").write_text(body)
    (tmp_path / "big.json.gz").write_bytes(gzip.compress(body.encode()))
    assert read_json(tmp_path / "big.json", max_bytes=len(body)) == {"pad": "x" * 1000}
    for name in ("big.json", "big.json.gz"):
        with pytest.raises(ReadError, match=rf"{name}: more than 100 bytes"):
            read_json(tmp_path / name, max_bytes=100)
    assert read_json(tmp_path / "big.json.gz", max_bytes=None)["pad"] == "x" * 1000
