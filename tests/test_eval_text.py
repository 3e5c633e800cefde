"""Text metrics: library scores equal direct calls; diversity measures on texts with known answers."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gpt2lab
from gpt2lab.evaluation import (
    bleu,
    chrf,
    distinct_n,
    read_predictions,
    read_references,
    repeated_ngram_rate,
    rouge,
    self_bleu,
    text_metrics,
    text_perplexity,
)

SRC = Path(__file__).resolve().parents[1] / "src"
PREDS = ["the cat sat on the mat", "a quick brown fox jumps over the dog", "hello there, general kenobi!"]
REFS = ["the cat is sitting on the mat", "the quick brown fox jumped over the lazy dog", "hello there!"]


def test_bleu_chrf_rouge_equal_direct_library_calls():
    import sacrebleu
    from rouge_score import rouge_scorer

    assert bleu(PREDS, REFS) == sacrebleu.corpus_bleu(PREDS, [REFS]).score
    assert chrf(PREDS, REFS) == sacrebleu.corpus_chrf(PREDS, [REFS]).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    direct = [scorer.score(r, p) for p, r in zip(PREDS, REFS)]
    got = rouge(PREDS, REFS)
    for key in ("rouge1", "rouge2", "rougeL"):
        assert got[key] == pytest.approx(sum(d[key].fmeasure for d in direct) / len(direct), abs=1e-12)
    assert 0 < got["rouge2"] < got["rouge1"] < 1


def test_multiple_references():
    import sacrebleu
    from rouge_score import rouge_scorer

    refs = [[REFS[0], "a cat sat on the mat"], [REFS[1]], [REFS[2], "hello there general"]]
    streams = [[r[0] for r in refs], [r[1] if len(r) > 1 else None for r in refs]]
    assert bleu(PREDS, refs) == sacrebleu.corpus_bleu(PREDS, streams).score
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"])
    expected = sum(scorer.score_multi(r, p)["rougeL"].fmeasure for p, r in zip(PREDS, refs)) / 3
    assert rouge(PREDS, refs)["rougeL"] == pytest.approx(expected)
    with pytest.raises(ValueError, match="3 predictions but 2 references"):
        bleu(PREDS, REFS[:2])


def test_distinct_n_known_answers():
    texts = ["a b a b", "a c"]
    # unigrams a b a b a c: 3 unique of 6; bigrams ab ba ab ac: 3 of 4; trigrams aba bab: 2 of 2
    assert distinct_n(texts, 1) == 0.5
    assert distinct_n(texts, 2) == 0.75
    assert distinct_n(texts, 3) == 1.0
    assert distinct_n(["same words", "same words"], 2) == 0.5
    assert distinct_n(["one"], 2) is None


def test_self_bleu_known_answers():
    assert self_bleu(["the cat sat on the mat"] * 3) == pytest.approx(100)
    assert self_bleu(["a b c d", "e f g h", "i j k l"]) == 0
    # each against the other: n-gram precisions 4/5, 3/4, 2/3, 1/2, equal lengths (no brevity penalty)
    assert self_bleu(["a b c d e", "a b c d x"]) == pytest.approx(100 * (4 / 5 * 3 / 4 * 2 / 3 * 1 / 2) ** 0.25)
    assert self_bleu(["alone"]) is None


def test_repeated_ngram_rate_known_answers():
    # 4-grams abcd bcda cdab dabc abcd: one of five repeats; "x y" has no 4-gram and does not count
    assert repeated_ngram_rate(["a b c d a b c d", "x y"]) == pytest.approx(0.2)
    assert repeated_ngram_rate(["a b c d e f", "a a a a a"]) == pytest.approx((0 + 1 / 2) / 2)
    assert repeated_ngram_rate(["short"]) is None


def test_text_perplexity_equals_logits(tiny_checkpoint):
    gen = gpt2lab.load(tiny_checkpoint)
    texts = ["Hello world, this is a test.", "Another line"]
    got = text_perplexity(texts, gen)
    nll, count = 0.0, 0
    for t in texts:
        ids = [gen.eos_token_id, *gen.tokenizer.encode(t)]
        logp = torch.log_softmax(gen.logits(ids).double(), -1)
        nll -= sum(logp[i - 1, ids[i]].item() for i in range(1, len(ids)))
        count += len(ids) - 1
    assert got["tokens"] == count
    assert got["perplexity"] == pytest.approx(math.exp(nll / count), rel=1e-5)
    # given a context, only the text's own tokens count
    ctx = text_perplexity([" world"], gen, contexts=["Hello"])
    ids = gen.tokenizer.encode("Hello world")
    assert ctx["tokens"] == 1
    expected = -torch.log_softmax(gen.logits(ids).double(), -1)[0, ids[1]].item()
    assert ctx["nll"] == pytest.approx(expected, rel=1e-5)


def test_text_metrics_bundle(tiny_checkpoint):
    m = text_metrics(PREDS, REFS, model=gpt2lab.load(tiny_checkpoint))
    assert m["bleu"] == bleu(PREDS, REFS) and m["distinct_2"] == distinct_n(PREDS, 2)
    assert m["mean_length"] == pytest.approx((6 + 8 + 4) / 3)
    assert m["perplexity"] > 1 and m["count"] == 3
    assert "bleu" not in text_metrics(PREDS) and "perplexity" not in text_metrics(PREDS)


def test_readers(tmp_path):
    txt = tmp_path / "p.txt"
    txt.write_text("first line\nsecond line\n", encoding="utf-8")
    assert read_predictions(txt) == (["first line", "second line"], None)
    jl = tmp_path / "p.jsonl"
    jl.write_text('{"prediction": "x y", "references": ["x z", "x y"]}\n\n{"text": "q", "reference": "r"}\n',
                  encoding="utf-8")
    assert read_predictions(jl) == (["x y", "q"], [["x z", "x y"], ["r"]])
    refs = tmp_path / "r.jsonl"
    refs.write_text('"one"\n["two", "deux"]\n{"target": "three"}\n', encoding="utf-8")
    assert read_references(refs) == [["one"], ["two", "deux"], ["three"]]
    broken = tmp_path / "b.jsonl"
    broken.write_text('{"text": "ok"}\n{"nope": 1}\n', encoding="utf-8")
    with pytest.raises(ValueError, match=r"b.jsonl:2: expected"):
        read_predictions(broken)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(SRC), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([sys.executable, "-m", "gpt2lab", *args], capture_output=True, text=True, env=env,
                          timeout=300)


@pytest.mark.slow
def test_cli_text_json_and_table(tmp_path):
    preds, refs = tmp_path / "p.txt", tmp_path / "r.txt"
    preds.write_text("\n".join(PREDS) + "\n", encoding="utf-8")
    refs.write_text("\n".join(REFS) + "\n", encoding="utf-8")
    done = _cli("eval", "text", "--predictions", str(preds), "--references", str(refs), "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["bleu"] == pytest.approx(bleu(PREDS, REFS))
    assert record["rougeL"] == pytest.approx(rouge(PREDS, REFS)["rougeL"])
    assert record["self_bleu"] == pytest.approx(self_bleu(PREDS))
    table = _cli("eval", "text", "-p", str(preds), "-r", str(refs))
    assert table.returncode == 0 and "chrf" in table.stdout
    refs.write_text("only one\n", encoding="utf-8")
    bad = _cli("eval", "text", "-p", str(preds), "-r", str(refs))
    assert bad.returncode == 2
    assert bad.stderr.strip() == ("gpt2lab: error: got 3 predictions but 1 references; "
                                  "they pair up line by line")


# -- text in other scripts: words are split by script ------------------------------------------------
SENTENCES = {  # (sentence, the tokenizer auto picks, its words)
    "zh": ("我喜欢吃苹果。", "zh", 7),
    "ru": ("Я люблю есть яблоки.", "13a", 4),
    "ja": ("私はりんごを食べるのが好きです。", "ja-mecab", 10),
    "th": ("ฉันชอบกินแอปเปิ้ล", "char", 17),
    "el": ("Μου αρέσει να τρώω μήλα.", "13a", 5),
}


@pytest.mark.parametrize("lang", sorted(SENTENCES))
def test_identical_sentences_score_full_marks_in_any_script(lang):
    """Identical Chinese sentences scored ROUGE 0 and BLEU 0, identical Russian and Japanese ROUGE 0, and
    distinct-n counted a Chinese sentence as one word."""
    sentence, expected, count = SENTENCES[lang]
    out = text_metrics([sentence], [sentence])
    assert out["tokenize"] == expected
    assert out["bleu"] == pytest.approx(100) and out["chrf"] == pytest.approx(100)
    assert out["rouge1"] == out["rouge2"] == out["rougeL"] == 1.0
    assert out["mean_length"] == count and out["distinct_1"] > 1 / count
    # a different sentence of the same script scores below that, above nothing shared
    other = text_metrics([sentence], [sentence[: len(sentence) // 2] + "。 " + sentence[len(sentence) // 2:]])
    assert 0 < other["rouge1"] <= 1 and other["bleu"] < 100


def test_words_follow_the_chosen_tokenizer():
    zh = ["我喜欢吃苹果", "我喜欢吃苹果我喜欢吃苹果"]
    assert distinct_n(zh, 1) == pytest.approx(6 / 18)  # characters, not one "word" per sentence
    assert repeated_ngram_rate(zh[1:], 4) == pytest.approx(3 / 9)  # 4-grams 7-9 repeat 1-3
    assert distinct_n(zh, 1, tokenize="13a") == pytest.approx(2 / 2)  # whitespace words, when asked for
    # an English text stays on whitespace words and rouge-score's own tokenizer: the same numbers as before
    assert text_metrics(PREDS, REFS)["tokenize"] == "13a"
    assert distinct_n(["a b a"], 1) == pytest.approx(2 / 3)
    mixed = text_metrics(["The café is good 很好"], ["The café is good 很好"])
    assert mixed["tokenize"] == "zh" and mixed["rougeL"] == 1.0
    assert rouge(["Кошка сидит"], ["кошка СИДИТ!"])["rouge1"] == 1.0  # case-folded, punctuation dropped
    with pytest.raises(ValueError, match="tokenize must be auto or one of"):
        text_metrics(PREDS, REFS, tokenize="flores200")


@pytest.mark.slow
def test_cli_text_says_which_tokenizer(tmp_path):
    preds = tmp_path / "zh.txt"
    preds.write_text("我喜欢吃苹果。\n我喜欢吃香蕉。\n", encoding="utf-8")
    done = _cli("eval", "text", "--predictions", str(preds), "--references", str(preds), "--json")
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["tokenize"] == "zh" and record["rougeL"] == 1.0 and record["bleu"] == pytest.approx(100)
    forced = json.loads(_cli("eval", "text", "-p", str(preds), "--tokenize", "char", "--json").stdout)
    assert forced["tokenize"] == "char"
    table = _cli("eval", "text", "-p", str(preds))
    assert table.returncode == 0 and "tokenize" in table.stdout and "zh" in table.stdout
    bad = _cli("eval", "text", "-p", str(preds), "--tokenize", "klingon")
    assert bad.returncode == 2 and bad.stderr.startswith("gpt2lab: error: --tokenize must be"), bad.stderr


def test_package_exposes_evaluate_lazily():
    import gpt2lab.evaluation

    assert gpt2lab.evaluate is gpt2lab.evaluation
    assert gpt2lab.evaluate.text_metrics is text_metrics
