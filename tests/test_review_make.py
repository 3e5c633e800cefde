"""``gpt2lab review make``: review files from completion files, an explore run and settings of a model;
the review file format; pre-screening; clear errors."""

from __future__ import annotations

import csv
import json

import pytest
from typer.testing import CliRunner

from gpt2lab.cli.main import app
from gpt2lab.review import read_review_set
from gpt2lab.review.reviewset import build, write_review_set
from gpt2lab.review.screening import screen_texts

PROMPTS = ["The sea", "A king", "Night falls"]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(*args):
    result = CliRunner().invoke(app, ["review", *map(str, args)])
    return result.exit_code, result.output


def test_make_pairwise_from_completion_files(tmp_path):
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": p, "completion": f" a-{i}"} for i, p in enumerate(PROMPTS)])
    b = tmp_path / "b.csv"
    with open(b, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["prompt", "completion", "extra"])
        w.writerows([[p, f" b-{i}", "x"] for i, p in enumerate(reversed(PROMPTS))])  # order does not matter
    c = write_jsonl(tmp_path / "c.jsonl", [{"prompt": p, "completion": f" c-{i}"} for i, p in enumerate(PROMPTS[:2])])
    out = tmp_path / "review.jsonl"
    code, text = run("make", "--completions", a, "--completions", f"bee={b}", "--completions", c, "-o", out)
    assert code == 0, text
    lines = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    head, items = lines[0], lines[1:]
    assert head["format"] == "gpt2lab-review" and head["version"] == 1 and head["mode"] == "pairwise"
    assert set(head["sources"]) == {"a", "bee", "c"}
    # c lacks the third prompt: 2 prompts x 3 pairs
    assert len(items) == 6 and sorted(it["id"] for it in items) == [f"i{k:04d}" for k in range(1, 7)]
    for it in items:
        (sa, ta), (sb, tb) = [(c["source"], c["text"]) for c in it["candidates"]]
        assert sa != sb and it["prompt"] in PROMPTS[:2]
        k = PROMPTS.index(it["prompt"])
        expect = {"a": f" a-{k}", "bee": f" b-{2 - k}", "c": f" c-{k}"}
        assert (ta, tb) == (expect[sa], expect[sb])
    rs = read_review_set(out)
    assert rs.mode == "pairwise" and len(rs.items) == 6

    code, text = run("make", "--completions", a, "--completions", f"bee={b}", "--mode", "ratings",
                     "--criteria", "grammar,style", "-o", out)
    assert code == 0, text
    rs = read_review_set(out)
    assert rs.criteria == ["grammar", "style"] and len(rs.items) == 6
    assert all(len(it.candidates) == 1 for it in rs.items)


def test_make_from_an_explore_run(tmp_path):
    settings = [{"label": label, "samples": [{"prompt": p, "text": f" {label} {p}"} for p in PROMPTS]}
                for label in ("T=0.3 k=0 p=1", "T=1 k=0 p=1", "T=1.3 k=0 p=1")]
    (tmp_path / "explore").mkdir()
    (tmp_path / "explore" / "results.json").write_text(json.dumps({"settings": settings}), encoding="utf-8")
    out = tmp_path / "r.jsonl"
    code, text = run("make", "--explore", tmp_path / "explore", "--explore-setting", "T=0.3 k=0 p=1",
                     "--explore-setting", "T=1.3 k=0 p=1", "-o", out)
    assert code == 0, text
    rs = read_review_set(out)
    assert set(rs.sources) == {"T=0.3 k=0 p=1", "T=1.3 k=0 p=1"} and len(rs.items) == 3
    code, text = run("make", "--explore", tmp_path / "explore", "--explore-setting", "T=9", "-o", out)
    assert code == 2 and "no setting 'T=9'" in text


@pytest.mark.slow
def test_make_with_two_settings_of_one_model(tiny_checkpoint, tmp_path):
    out = tmp_path / "r.jsonl"
    code, text = run("make", *PROMPTS, "-m", tiny_checkpoint, "--setting", "temperature=0", "--setting",
                     "temperature=1.5,top_k=40", "--max-new-tokens", "6", "--samples", "2", "-o", out)
    assert code == 0, text
    rs = read_review_set(out)
    assert list(rs.sources) == ["temperature=0", "temperature=1.5,top_k=40"]
    assert rs.sources["temperature=1.5,top_k=40"]["params"] == {"max_new_tokens": 6, "temperature": 1.5,
                                                                 "top_k": 40, "seed": 0}
    assert len(rs.items) == 6
    greedy = {}
    for it in rs.items:
        for c in it.candidates:
            if c.source == "temperature=0":
                greedy.setdefault(it.prompt, set()).add(c.text)
    assert all(len(v) == 1 for v in greedy.values())  # greedy: both samples of a prompt are the same


@pytest.mark.parametrize("args, message", [
    (["--completions", "A"], "two or more sources"),
    (["--setting", "temperature=0.5", "--setting", "tempreature=1"], "unknown generation parameter 'tempreature'"),
    (["--setting", "temperature=-1", "--setting", "temperature=1"], "temperature"),
    (["--setting", "temperature", "--setting", "temperature=1"], "NAME=VALUE"),
    (["--completions", "A", "--completions", "A"], "both called"),
    (["--completions", "A", "--completions", "B", "--mode", "votes"], "--mode"),
    (["--completions", "A", "--completions", "B", "--criteria", "x,x"], "distinct"),
    (["--completions", "A", "--completions", "NOPROMPT"], "share no prompt"),
    (["--completions", "A", "--completions", "missing.jsonl"], "not found"),
    (["--explore", "."], "results.json"),
    (["--augment", "T"], "not an augment output (it lacks column(s) aug_origin"),
])
def test_make_errors_are_one_line(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    write_jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "completion": "x"}])
    write_jsonl(tmp_path / "b.jsonl", [{"prompt": "p", "completion": "y"}])
    write_jsonl(tmp_path / "noprompt.jsonl", [{"prompt": "other", "completion": "y"}])
    write_jsonl(tmp_path / "t.jsonl", [{"text": "plain dataset", "label": 1}])
    files = {"A": "a.jsonl", "B": "b.jsonl", "NOPROMPT": "noprompt.jsonl", "T": "t.jsonl"}
    code, text = run("make", "p", "-m", "shakespeare-gpt2", *[files.get(a, a) for a in args], "-o", "r.jsonl") \
        if args[0] == "--setting" else run("make", *[files.get(a, a) for a in args], "-o", "r.jsonl")
    assert code == 2, text
    assert text.startswith("gpt2lab: error:") and text.count("\n") == 1 and message in text, text


def test_review_file_errors(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"hello": 1}\n', encoding="utf-8")
    code, text = run("serve", bad)
    assert code == 2 and "not a gpt2lab review file" in text
    rs = build({"p": [("x", "1")], "q": [("x", "2")]})
    path = write_review_set(rs, tmp_path / "ok.jsonl")
    lines = path.read_text(encoding="utf-8").splitlines()
    item = json.loads(lines[1])
    item["candidates"][1]["source"] = "p"
    path.write_text(lines[0] + "\n" + json.dumps(item) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"ok.jsonl:2: the two candidates come from the same source"):
        read_review_set(path)
    code, text = run("serve", tmp_path / "ok.jsonl", "--host", "0.0.0.0")
    assert code == 2 and "--allow-remote" in text


def test_screening_repetition_near_duplicates_and_blocklist():
    texts = ["the cat sat on the mat and the cat sat on the mat", "The cat sat on the mat and the cat sat on a mat",
             "a completely different sentence here", "classic assessment", "you ASS, said the donkey"]
    keys = ["i1", "i2", "i3", "i4", "i5"]
    s = screen_texts(keys, texts, blocklist=["ass", "donkey kong", "# not a comment here"], similarity=0.7)
    # 11 word 3-grams, 4 repeat an earlier one
    assert s[0].repetition == pytest.approx(4 / 11)
    assert s[0].near_duplicates == ["i2"] and s[1].near_duplicates == ["i1"] and s[2].near_duplicates == []
    assert s[3].blocklist == [] and s[4].blocklist == ["ass"]  # whole words, any case
    same_item = screen_texts(["i1", "i1"], texts[:2])
    assert same_item[0].near_duplicates == []  # the two sides of one pair are not flagged against each other


@pytest.mark.slow
def test_make_with_two_models_shared_settings(tiny_checkpoint, tmp_path):
    from .conftest import SHAPES, make_hf_checkpoint

    other = make_hf_checkpoint(tmp_path / "other-model", seed=9, **SHAPES["tiny"])
    out = tmp_path / "r.jsonl"
    code, text = run("make", *PROMPTS, "-m", tiny_checkpoint, "-m", other, "--temperature", "0",
                     "--max-new-tokens", "5", "--mode", "ratings", "-o", out)
    assert code == 0, text
    rs = read_review_set(out)
    assert list(rs.sources) == [tiny_checkpoint.name, "other-model"]
    assert all(d["params"]["temperature"] == 0 for d in rs.sources.values())
    assert len(rs.items) == 6 and {it.candidates[0].source for it in rs.items} == set(rs.sources)


def test_near_duplicates_are_exact_and_do_not_compare_every_pair():
    """The same answer as comparing every pair in Python (at several thresholds, near-copies made by edits),
    without doing that: it took minutes for a few thousand texts, so `review serve` took that long to start."""
    import random

    from gpt2lab.near_duplicates import find_near_duplicates, jaccard, shingles
    from gpt2lab.review import screening

    rng = random.Random(0)
    words = [f"w{i}" for i in range(400)] + "the of and to a in that is was he".split()
    base = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 25))) for _ in range(60)]
    texts = base + [t.replace("w1", "x1", 1) + rng.choice(["", " w3", "!"]) for t in base[:40]] + ["", "  ", "ab"]
    keys = [f"i{k // 2}" for k in range(len(texts))]
    for t in (0.3, 0.7, 0.9, 1.0):
        got = [s.near_duplicates for s in screening.screen_texts(keys, texts, similarity=t)]
        want = [sorted({keys[j] for j in range(len(texts)) if keys[j] != keys[i] and texts[i].strip()
                        and texts[j].strip() and jaccard(shingles(texts[i]), shingles(texts[j])) >= t})
                [:screening.MAX_SHOWN] for i in range(len(texts))]
        assert got == want, t
    many = [" ".join(rng.choice(words) for _ in range(40)) for _ in range(1500)]
    assert all(not s.near_duplicates for s in screening.screen_texts([f"i{k}" for k in range(1500)], many))
    assert find_near_duplicates(many, 0.7).comparisons < 1500  # exact comparisons (the pairs: 1,124,250)


def test_export_refuses_the_log_of_another_review(tmp_path):
    """`review export` given another review's log (a pairwise one, say) wrote a 'curated' file with every
    generated row dropped as unreviewed, and exit 0; it must say the log does not fit."""
    from gpt2lab.review.curate import export_curated
    from gpt2lab.review.reviewset import from_augment

    data = tmp_path / "augmented.csv"
    data.write_text("text,label,aug_origin,aug_source_row,aug_method\nGood food,pos,original,0,\n"
                    "Good meal,pos,generated,0,few-shot\nBad soup,neg,original,1,\nBad stew,neg,generated,1,few-shot\n",
                    encoding="utf-8")
    review = from_augment(data)
    other = [{"reviewer": "a", "item": "i0001", "mode": "pairwise", "sources": ["x", "y"], "choice": "A",
              "winner": "x"}]
    with pytest.raises(ValueError, match="none of this review's items"):
        export_curated(review, other, tmp_path / "curated.csv")
    assert not (tmp_path / "curated.csv").exists()
    assert export_curated(review, [], tmp_path / "curated.csv").rows_out == 2  # nobody reviewed yet: originals
    mine = [{"reviewer": "a", "item": review.items[0].id, "mode": "curation", "row": review.items[0].row,
             "decision": "accept"}]
    result = export_curated(review, other + mine, tmp_path / "curated.csv")
    assert (result.rows_out, result.accepted, result.unreviewed) == (3, 1, 1)


# -- U+2028, U+0085 and form feeds are text, not line breaks, from make to serve to export ------------------
ODD = ["one\u2028two", "three\u0085four", "five\x0csix", "seven\u2029eight \x1c\x1d\x1e"]


def test_odd_line_separators_in_candidates_round_trip_make_and_read(tmp_path):
    """JSON allows these raw inside strings (and make writes them raw); str.splitlines() would cut the
    line there and the review file could not be read back."""
    a = write_jsonl(tmp_path / "a.jsonl", [{"prompt": f"p{i}", "completion": t} for i, t in enumerate(ODD)])
    b = write_jsonl(tmp_path / "b.jsonl", [{"prompt": f"p{i}", "completion": t + "!"} for i, t in enumerate(ODD)])
    out = tmp_path / "r.jsonl"
    code, text = run("make", "--completions", a, "--completions", b, "-o", out)
    assert code == 0, text
    assert "\u2028" in out.read_text(encoding="utf-8")  # raw, not escaped: the case splitlines() broke
    texts = {c.source: {} for c in read_review_set(out).items[0].candidates}
    for it in read_review_set(out).items:
        for c in it.candidates:
            texts[c.source][it.prompt] = c.text
    assert texts == {"a": {f"p{i}": t for i, t in enumerate(ODD)}, "b": {f"p{i}": t + "!" for i, t in enumerate(ODD)}}


@pytest.mark.slow
def test_odd_line_separators_round_trip_make_serve_export(tmp_path):
    """A curation review of an augment output whose texts hold U+2028, U+0085 and form feeds: `review make`,
    then the review server (loading the file as `review serve` does, on a real port) shows them and takes
    an edit holding them, then `review export` writes them back into the curated dataset unchanged."""
    import threading
    import time

    import httpx
    import uvicorn

    from gpt2lab.review.app import create_app

    from .server_helpers import free_port

    rows = [{"text": "an original \u2028 row", "label": "x", "aug_origin": "original", "aug_source_row": 0,
             "aug_method": ""}]
    rows += [{"text": t, "label": "x", "aug_origin": "generated", "aug_source_row": 0, "aug_method": "continuation"}
             for t in ODD]
    data = tmp_path / "augmented.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    review, log = tmp_path / "curate.jsonl", tmp_path / "curate.log.jsonl"
    code, text = run("make", "--augment", data, "-o", review)
    assert code == 0, text
    app = create_app(review, log)  # what `review serve` runs: the review file read back from disk
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    shown, edited = [], "edited\u2028text\x0cwith\u0085breaks"
    try:
        for _ in range(600):
            if server.started:
                break
            time.sleep(0.05)
        for k in range(len(ODD)):
            item = httpx.get(url + "/api/next", params={"reviewer": "ann"}, timeout=30).json()["item"]
            shown.append(item["candidates"][0]["text"])
            decision = {1: "edit", 2: "reject"}.get(k, "accept")
            body = {"reviewer": "ann", "item": item["id"], "decision": decision,
                    **({"text": edited} if decision == "edit" else {})}
            assert httpx.post(url + "/api/judgements", json=body, timeout=30).status_code == 200
    finally:
        server.should_exit = True
        thread.join(30)
        app.state.log.close()
    assert shown == ODD
    curated = tmp_path / "curated.jsonl"
    code, text = run("export", review, "--log", log, "-o", curated)
    assert code == 0, text
    got = [json.loads(line)["text"] for line in curated.read_text(encoding="utf-8").split("\n") if line]
    assert got == ["an original \u2028 row", ODD[0], edited, ODD[3]]
