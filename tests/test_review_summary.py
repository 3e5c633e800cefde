"""``gpt2lab review summary``'s numbers on hand-made logs, against values computed by hand or by the
reference libraries (scikit-learn, krippendorff); the log's crash tolerance."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import pytest

from gpt2lab.review import JudgementLog, read_log
from gpt2lab.review.stats import bradley_terry, krippendorff_alpha, t_interval, wilson_interval
from gpt2lab.review.summary import summarize

krippendorff = pytest.importorskip("krippendorff")
sklearn_metrics = pytest.importorskip("sklearn.metrics")


def pair(reviewer, item, left, right, choice):
    winner = {"A": left, "B": right}.get(choice)
    return {"reviewer": reviewer, "item": item, "mode": "pairwise", "sources": [left, right], "choice": choice,
            "winner": winner, "flags": [], "comment": ""}


def rating(reviewer, item, source, **scores):
    return {"reviewer": reviewer, "item": item, "mode": "ratings", "source": source, "scores": scores}


def test_wilson_interval_by_hand():
    # 7 of 10, z = 1.959964: centre (0.7 + z^2/20) / (1 + z^2/10) = 0.644493, half-width
    # z * sqrt(0.021 + z^2/400) / (1 + z^2/10) = 0.247715 -> 0.396778 to 0.892209 (textbook: 0.397 to 0.892)
    low, high = wilson_interval(7, 10)
    assert low == pytest.approx(0.396778, abs=2e-6) and high == pytest.approx(0.892209, abs=2e-6)
    assert wilson_interval(0, 5)[0] == 0.0 and wilson_interval(5, 5)[1] == 1.0
    assert all(math.isnan(x) for x in wilson_interval(0, 0))


def test_t_interval_by_hand():
    # 1..5: mean 3, s = sqrt(2.5), t(0.975, 4) = 2.7764451 -> half-width 1.9632
    mean, low, high = t_interval([1, 2, 3, 4, 5])
    assert mean == 3 and low == pytest.approx(3 - 1.963243, abs=1e-5) and high == pytest.approx(3 + 1.963243, abs=1e-5)
    assert math.isnan(t_interval([4])[1])


def test_bradley_terry_recovers_known_strengths():
    # strengths 4:2:1 and 15 games per pair; wins exactly as expected: A-B 10:5, A-C 12:3, B-C 10:5.
    # These counts satisfy the likelihood equations at p = (4, 2, 1)/7, so that is the MLE.
    wins = {("A", "B"): 10, ("B", "A"): 5, ("A", "C"): 12, ("C", "A"): 3, ("B", "C"): 10, ("C", "B"): 5}
    bt = bradley_terry(wins)
    assert bt.converged and not bt.regularised
    assert bt.strengths == pytest.approx({"A": 4 / 7, "B": 2 / 7, "C": 1 / 7}, abs=1e-7)
    # two sources: the strength ratio is the win ratio
    two = bradley_terry({("x", "y"): 6, ("y", "x"): 2})
    assert two.strengths["x"] / two.strengths["y"] == pytest.approx(3.0, rel=1e-6)


def test_bradley_terry_regularises_an_unbeaten_source():
    bt = bradley_terry({("A", "B"): 3, ("B", "C"): 2, ("C", "B"): 1})  # A never lost: no finite MLE
    assert bt.regularised and bt.converged
    assert bt.strengths["A"] > bt.strengths["B"] > bt.strengths["C"]


def test_krippendorff_alpha_by_hand():
    # two reviewers, four items: X X / X Y / Y Y / Y Y. Coincidences o_XX=2, o_XY=o_YX=1, o_YY=4,
    # n_X=3, n_Y=5, n=8: alpha = 1 - (n-1) * 2 / (2*3*5) = 8/15
    assert krippendorff_alpha([[0, 0, 1, 1], [0, 1, 1, 1]], "nominal") == pytest.approx(8 / 15)


def test_pairwise_summary_by_hand():
    # sources p and q, 10 judgements by alice: p wins 5, q wins 2, 2 ties, 1 both-bad
    recs = []
    for i, choice in enumerate(["A"] * 3 + ["B"] * 2 + ["B"] * 2 + ["A"] * 0 + ["tie"] * 2 + ["both-bad"]):
        left, right = ("p", "q") if i < 3 or i >= 7 else ("q", "p")
        recs.append(pair("alice", f"i{i}", left, right, choice))
    # i0-2: p wins (A, p left); i3-4: q on the left, B -> p wins; i5-6: B with p on the right -> p wins?
    # (left q, right p, B) -> p wins; so p wins 7, ties 2, both-bad 1
    s = summarize(recs)
    by = {r["source"]: r for r in s["pairwise"]["sources"]}
    assert by["p"]["wins"] == 7 and by["q"]["losses"] == 7 and by["p"]["ties"] == 2 and by["p"]["both_bad"] == 1
    assert by["p"]["win_rate"] == pytest.approx(8.5 / 10) and by["q"]["win_rate"] == pytest.approx(1.5 / 10)
    low, high = wilson_interval(8.5, 10)
    assert (by["p"]["ci_low"], by["p"]["ci_high"]) == pytest.approx((low, high))
    assert s["pairwise"]["bradley_terry"] is None  # two sources: the win rate says it all


def test_latest_judgement_of_an_item_counts():
    recs = [pair("alice", "i1", "p", "q", "A"), {**pair("alice", "i1", "p", "q", "B"), "comment": "changed my mind"}]
    s = summarize(recs)
    assert s["comments"] == [{"reviewer": "alice", "item": "i1", "comment": "changed my mind"}]
    assert s["judgements"] == 2 and s["counted"] == 1
    assert {r["source"]: r["wins"] for r in s["pairwise"]["sources"]} == {"p": 0, "q": 1}


def test_three_sources_bradley_terry_in_summary():
    recs = []
    for (a, b), (wa, wb) in {("A", "B"): (10, 5), ("A", "C"): (12, 3), ("B", "C"): (10, 5)}.items():
        for k in range(wa + wb):
            recs.append(pair("r", f"{a}{b}{k}", a, b, "A" if k < wa else "B"))
    s = summarize(recs)
    assert s["pairwise"]["bradley_terry"]["strengths"] == pytest.approx({"A": 4 / 7, "B": 2 / 7, "C": 1 / 7},
                                                                          abs=1e-7)
    assert [r["source"] for r in s["pairwise"]["sources"]] == ["A", "B", "C"]


def test_agreement_kappa_and_alpha_against_libraries():
    # two reviewers on four items: labels (by winner source) X X / X Y / Y Y / Y Y -> kappa 0.5 by hand
    a = ["p", "p", "q", "q"]
    b = ["p", "q", "q", "q"]
    recs = [pair("ann", f"i{k}", "p", "q", "A" if v == "p" else "B") for k, v in enumerate(a)]
    # bob sees the sides swapped on odd items: agreement is about sources, not positions
    recs += [pair("bob", f"i{k}", *(("q", "p") if k % 2 else ("p", "q")),
                  ("A" if v == ("q" if k % 2 else "p") else "B")) for k, v in enumerate(b)]
    s = summarize(recs)
    (agree,) = [x for x in s["agreement"] if x["what"] == "pairwise choice"]
    assert agree["items"] == 4 and agree["reviewers"] == ["ann", "bob"]
    assert agree["cohen_kappa"] == pytest.approx(0.5)
    assert agree["cohen_kappa"] == pytest.approx(sklearn_metrics.cohen_kappa_score(a, b))
    assert agree["krippendorff_alpha"] == pytest.approx(8 / 15)


def test_ratings_means_and_ordinal_alpha_three_reviewers():
    scores = {"ann": [1, 2, 3, 4, 5], "bob": [2, 2, 3, 5, 5], "cy": [1, 3, 3, 4, None]}
    recs = [rating(r, f"i{k}", "p" if k % 2 else "q", fluency=v, coherence=3) for r, vals in scores.items()
            for k, v in enumerate(vals) if v is not None]
    s = summarize(recs)
    rows = {(r["source"], r["criterion"]): r for r in s["ratings"]["rows"]}
    p_fluency = [v for vals in scores.values() for k, v in enumerate(vals) if k % 2 and v is not None]
    mean, low, high = t_interval(p_fluency)
    assert rows[("p", "fluency")]["n"] == len(p_fluency) == 6
    assert (rows[("p", "fluency")]["mean"], rows[("p", "fluency")]["ci_low"]) == pytest.approx((mean, low))
    assert rows[("q", "coherence")]["mean"] == 3 and rows[("q", "coherence")]["ci_low"] == pytest.approx(3)
    (flu,) = [x for x in s["agreement"] if x["what"] == "rating: fluency"]
    assert flu["cohen_kappa"] is None and flu["reviewers"] == ["ann", "bob", "cy"]  # kappa is for two
    table = [[float("nan") if v is None else v for v in scores[r]] for r in ("ann", "bob", "cy")]
    assert flu["krippendorff_alpha"] == pytest.approx(
        krippendorff.alpha(reliability_data=table, level_of_measurement="ordinal"))
    (coh,) = [x for x in s["agreement"] if x["what"] == "rating: coherence"]
    assert coh["krippendorff_alpha"] is None  # everyone gave 3: agreement is undefined, not an error


def test_log_tolerates_a_torn_last_line_and_repairs_it_before_appending(tmp_path):
    path = tmp_path / "log.jsonl"
    first = pair("a", "i1", "p", "q", "A")
    path.write_text(json.dumps(first) + "\n" + '{"reviewer": "a", "item": "i2", "mo', encoding="utf-8")
    assert read_log(path) == [first]
    log = JudgementLog(path)
    second = pair("a", "i2", "p", "q", "B")
    log.append(second)
    log.close()
    assert read_log(path) == [first, second]
    assert path.read_text(encoding="utf-8").count("\n") == 2
    path.write_text(json.dumps(first) + "\nnot json\n" + json.dumps(second) + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"log.jsonl:2"):
        read_log(path)


def _cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "gpt2lab", "review", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


def test_summary_cli_json_table_and_report(tmp_path):
    recs = []
    for (a, b), (wa, wb) in {("A", "B"): (10, 5), ("A", "C"): (12, 3), ("B", "C"): (10, 5)}.items():
        for k in range(wa + wb):
            recs.append(pair("r", f"{a}{b}{k}", a, b, "A" if k < wa else "B"))
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps(r) + "\n" for r in recs), encoding="utf-8")
    done = _cli("summary", str(log), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["pairwise"]["bradley_terry"]["strengths"]["A"] == pytest.approx(4 / 7, abs=1e-6)
    done = _cli("summary", str(log), "--out", str(tmp_path / "rep"))
    assert done.returncode == 0, done.stderr
    assert "Bradley-Terry" in done.stdout and "Wilson" in done.stdout and "0.571" in done.stdout
    page = (tmp_path / "rep" / "report.html").read_text(encoding="utf-8")
    assert "data:image/png;base64," in page and "0.571" in page
    assert (tmp_path / "rep" / "plot.png").stat().st_size > 5000
    bad = _cli("summary", str(tmp_path / "missing.jsonl"))
    assert bad.returncode == 2 and bad.stderr.startswith("gpt2lab: error:") and "not found" in bad.stderr


def test_summary_without_the_review_extra_is_one_line(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from gpt2lab.cli.main import app

    log = tmp_path / "log.jsonl"
    log.write_text(json.dumps(pair("a", "i1", "p", "q", "A")) + "\n", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "krippendorff", None)  # what an environment without it looks like
    result = CliRunner().invoke(app, ["review", "summary", str(log)])
    assert result.exit_code == 2
    assert result.output == "gpt2lab: error: gpt2lab review summary needs krippendorff: pip install " \
                            "'gpt2lab[review]'\n"


def test_a_file_that_is_not_a_judgement_log_is_refused_naming_the_line(tmp_path):
    """A review file given as the log (an easy slip: `summary pairs.jsonl`) or a hand-edited log with a record
    missing its fields is an error naming file:line, not a summary of nonsense (or a server appending to it)."""
    from gpt2lab.review.reviewset import build, write_review_set

    review = write_review_set(build({"a": [("p", "x")], "b": [("p", "y")]}), tmp_path / "pairs.jsonl")
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: .*review file"):
        read_log(review)
    with pytest.raises(ValueError, match=r"pairs.jsonl:1: .*review file"):
        JudgementLog(review)
    before = review.read_bytes()
    bad = tmp_path / "log.jsonl"
    good = pair("a", "i1", "p", "q", "A")
    for broken in ({**good, "sources": ["p"]}, {**good, "choice": "C"}, {"a": 1},
                   {**rating("a", "i1", "s", fluency=3), "scores": {"fluency": "high"}},
                   {"reviewer": "a", "item": "i1", "mode": "curation", "decision": "edit", "row": 1}):
        bad.write_text(json.dumps(good) + "\n" + json.dumps(broken) + "\n", encoding="utf-8")
        with pytest.raises(ValueError, match=r"log.jsonl:2: not a review log record"):
            read_log(bad)
    done = _cli("summary", str(review))
    assert done.returncode == 2 and done.stderr.startswith("gpt2lab: error:") and "pairs.jsonl:1" in done.stderr
    assert review.read_bytes() == before


def test_agreement_of_random_choices_over_three_sources_is_near_zero():
    """Two reviewers choosing at random on items pairing three sources agree by chance only: kappa and alpha ~0
    (coding the winner by its name pooled the three names over items whose pairs offer two, giving ~0.25)."""
    import random

    rng = random.Random(0)
    pairs = [("a", "b"), ("a", "c"), ("b", "c")]
    recs = [pair(who, f"i{k}", *pairs[k % 3], rng.choice("AB")) for k in range(900) for who in ("ann", "bob")]
    (agree,) = [x for x in summarize(recs)["agreement"] if x["what"] == "pairwise choice"]
    assert abs(agree["cohen_kappa"]) < 0.08 and abs(agree["krippendorff_alpha"]) < 0.08, agree
    # full agreement is still 1
    recs = [pair(who, f"i{k}", *pairs[k % 3], "AB"[k % 2]) for k in range(30) for who in ("ann", "bob")]
    (agree,) = [x for x in summarize(recs)["agreement"] if x["what"] == "pairwise choice"]
    assert agree["cohen_kappa"] == pytest.approx(1) and agree["krippendorff_alpha"] == pytest.approx(1)
