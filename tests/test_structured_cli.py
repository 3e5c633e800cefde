"""Structured outputs on the command line: ``gpt2lab generate --json-schema/--regex/--choice/--grammar`` and
``gpt2lab augment --json-schema``, as real subprocesses."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from gpt2lab.apps.augment import read_output

from .server_helpers import _env

pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")

SCHEMA = {"type": "object", "properties": {"text": {"type": "string", "minLength": 5, "maxLength": 40},
                                           "label": {"enum": ["pos", "neg"]},
                                           "stars": {"type": "integer", "minimum": 1, "maximum": 5}},
          "required": ["text", "label", "stars"], "additionalProperties": False}


def _gpt2lab(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gpt2lab", *args], capture_output=True, text=True, env=_env(),
                          timeout=300)


def test_generate_with_each_kind_of_constraint(tiny_checkpoint, tmp_path):
    schema = tmp_path / "schema.json"
    schema.write_text(json.dumps(SCHEMA), encoding="utf-8")
    grammar = tmp_path / "g.gbnf"
    grammar.write_text('root ::= ("red" | "blue") "-" [0-9]', encoding="utf-8")
    cases = [(["--json-schema", str(schema)], None), (["--regex", "[a-c]{2}-[0-9]{2}"], r"[a-c]{2}-[0-9]{2}"),
             (["--choice", "yes", "--choice", "no\\t"], r"yes|no\t"),
             (["--grammar", str(grammar)], r"(red|blue)-[0-9]")]
    for flags, pattern in cases:
        r = _gpt2lab("generate", "Go:", "--model", str(tiny_checkpoint), "--json", "-n", "3", "--seed", "2",
                     "--max-new-tokens", "60", *flags)
        assert r.returncode == 0, r.stderr
        records = [json.loads(line) for line in r.stdout.splitlines()]
        assert len(records) == 3
        for record in records:
            assert record["finish_reason"] == "stop", record
            if pattern is None:
                jsonschema.validate(json.loads(record["text"]), SCHEMA)
            else:
                assert re.fullmatch(pattern, record["text"]), record


@pytest.mark.parametrize("args, message", [
    (["--regex", "(ab"], "--regex: "),
    (["--regex", "a", "--choice", "b"], "give one of --json-schema"),
    (["--json-schema", "missing.json"], "--json-schema missing.json: cannot read"),
    (["--json-schema", "{schema}"], "--json-schema {schema}: Invalid type"),
    (["--choice", "a", "--num-beams", "2"], "beam search"),
    # nested 5000 deep: a RecursionError traceback (exit 1) before the bounded reader
    (["--json-schema", "{deep}"], "--json-schema {deep}: JSON nested deeper than"),
])
def test_bad_constraints_fail_in_one_line_before_any_model_loads(tmp_path, args, message):
    schema = tmp_path / "bad.json"
    schema.write_text('{"type": "objekt"}', encoding="utf-8")
    deep = _deep_schema(tmp_path)
    args = [a.format(schema=schema, deep=deep) for a in args]
    message = message.replace("{deep}", str(deep))
    r = _gpt2lab("generate", "x", "--model", str(tmp_path / "no-such-model"), *args)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith("gpt2lab: error: ") and message.format(schema=schema) in lines[0], lines


def _deep_schema(tmp_path):
    deep = tmp_path / "deep.json"
    deep.write_text('{"anyOf":[' * 5000 + "{}" + "]}" * 5000, encoding="utf-8")
    return deep


def test_augment_deep_json_schema_fails_in_one_line(tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("text,label\nI loved this film,pos\n", encoding="utf-8")
    deep = _deep_schema(tmp_path)
    r = _gpt2lab("augment", str(data), "--out", str(tmp_path / "o.jsonl"), "--json-schema", str(deep),
                 "--model", str(tmp_path / "no-such-model"))
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1, r.stderr
    assert lines[0].startswith(f"gpt2lab: error: --json-schema {deep}: JSON nested deeper than"), lines


def test_augment_json_schema_rows_parse_and_keep_their_label(tiny_checkpoint, tmp_path):
    data = tmp_path / "data.csv"
    data.write_text("text,label,stars\nI loved this film,pos,5\nA wonderful story,pos,4\nWhat a waste,neg,1\n"
                    "I hated the plot,neg,2\n", encoding="utf-8")
    schema = tmp_path / "row.json"
    schema.write_text(json.dumps(SCHEMA), encoding="utf-8")
    out = tmp_path / "out.jsonl"
    r = _gpt2lab("augment", str(data), "--label-column", "label", "--out", str(out), "--json-schema", str(schema),
                 "--model", str(tiny_checkpoint), "--seed", "1", "-k", "3", "--min-words", "0", "--similarity", "1",
                 "--json")
    assert r.returncode == 0, r.stderr
    summary = json.loads(r.stdout)
    assert summary["attempts"] == summary["generated"] + sum(summary["filtered"].values())
    records = read_output(out)
    generated = [rec for rec in records if rec["aug_origin"] == "generated"]
    assert generated and len(records) == summary["rows_out"]
    for rec in generated:
        source = records[[r["aug_source_row"] for r in records].index(rec["aug_source_row"])]
        assert rec["label"] == source["label"]  # pinned: the new row keeps its source's label
        row = {k: rec[k] for k in SCHEMA["properties"]}
        jsonschema.validate(row, {**SCHEMA, "properties": {**SCHEMA["properties"], "text": {"type": "string"}}})
    r = _gpt2lab("augment", str(data), "--out", str(tmp_path / "o2.jsonl"), "--json-schema", str(schema),
                 "--method", "continuation", "--model", str(tiny_checkpoint))
    assert r.returncode == 2 and "continuation does not apply" in r.stderr
