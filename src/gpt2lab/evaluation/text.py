"""Text metrics: BLEU, chrF and ROUGE against references; diversity and repetition of generations.

Reference-based scores come straight from their libraries (``sacrebleu``, ``rouge-score``) so they
equal what those report. Words are split by script (:mod:`.words`: sacrebleu's tokenizers, ``13a`` --
whitespace -- for text with spaces between words, ``zh``, ``ja-mecab`` or ``char`` for scripts without;
``tokenize="auto"`` chooses from the text, and :func:`text_metrics` reports its choice). The
reference-free measures count those words:

- distinct-n: unique n-grams / all n-grams, pooled over the texts (Li et al., 2016);
- self-BLEU: each text's sentence BLEU (sacrebleu) against all the other texts, averaged (Zhu et
  al., 2018); high means the texts resemble each other;
- repeated-4-gram rate: per text, the fraction of its 4-grams that repeat an earlier one
  (1 - unique/total, Welleck et al., 2019's seq-rep-4), averaged over texts with at least one 4-gram.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..readers import format_of, iter_jsonl, iter_lines
from .common import ModelLike, as_generator, progress_bar
from .scoring import DEFAULT_BATCH_TOKENS, Window, perplexity_of, score_windows, sliding_windows
from .words import AUTO, DEFAULT, RougeTokenizer, needs_unicode_rouge, resolve, words

if TYPE_CHECKING:
    from ..generation import Generator

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
_TEXT_KEYS = ("prediction", "text", "completion", "output", "generation")
_REF_KEYS = ("references", "reference", "target", "text")


def _ngrams(words: Sequence[str], n: int) -> list[tuple[str, ...]]:
    return [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]


def distinct_n(texts: Sequence[str], n: int, tokenize: str = AUTO) -> float | None:
    """Unique n-grams / all n-grams over all texts (words as ``tokenize`` splits them: see :mod:`.words`);
    None without any n-gram."""
    name = resolve(tokenize, texts)
    grams = [g for t in texts for g in _ngrams(words(t, name), n)]
    return len(set(grams)) / len(grams) if grams else None


def repeated_ngram_rate(texts: Sequence[str], n: int = 4, tokenize: str = AUTO) -> float | None:
    """Mean over texts of the fraction of n-grams that repeat an earlier n-gram of the same text."""
    name = resolve(tokenize, texts)
    rates = []
    for t in texts:
        grams = _ngrams(words(t, name), n)
        if grams:
            rates.append(1 - len(set(grams)) / len(grams))
    return sum(rates) / len(rates) if rates else None


def self_bleu(texts: Sequence[str], tokenize: str = AUTO) -> float | None:
    """Mean sentence BLEU (0-100) of each text against all the others; None for fewer than 2 texts."""
    import sacrebleu

    if len(texts) < 2:
        return None
    name = resolve(tokenize, texts)
    scores = [sacrebleu.sentence_bleu(t, [o for j, o in enumerate(texts) if j != i], tokenize=name).score
              for i, t in enumerate(texts)]
    return sum(scores) / len(scores)


def mean_length(texts: Sequence[str], tokenize: str = AUTO) -> float | None:
    """Mean number of words (whitespace-separated, or as ``tokenize`` splits them)."""
    name = resolve(tokenize, texts)
    return sum(len(words(t, name)) for t in texts) / len(texts) if texts else None


def _check_refs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[str]]:
    refs = [[r] if isinstance(r, str) else list(r) for r in references]
    if len(refs) != len(predictions):
        raise ValueError(f"got {len(predictions)} predictions but {len(refs)} references; they pair up line by line")
    if any(not r for r in refs):
        raise ValueError("every prediction needs at least one reference")
    return refs


def bleu(predictions: Sequence[str], references: Sequence[str | Sequence[str]], tokenize: str = AUTO) -> float:
    """Corpus BLEU (0-100, sacrebleu defaults but the tokenizer: ``tokenize``, chosen from the text by
    default, see :mod:`.words`); ``references[i]``: one string or a list for prediction i."""
    import sacrebleu

    refs = _check_refs(predictions, references)
    name = resolve(tokenize, [*predictions, *(r for ref in refs for r in ref)])
    width = max(len(r) for r in refs)
    # sacrebleu wants one stream per reference slot; None marks a missing reference
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    return sacrebleu.corpus_bleu(list(predictions), streams, tokenize=name).score


def chrf(predictions: Sequence[str], references: Sequence[str | Sequence[str]]) -> float:
    """Corpus chrF (0-100, sacrebleu defaults)."""
    import sacrebleu

    refs = _check_refs(predictions, references)
    width = max(len(r) for r in refs)
    streams = [[r[k] if k < len(r) else None for r in refs] for k in range(width)]
    return sacrebleu.corpus_chrf(list(predictions), streams).score


def rouge(predictions: Sequence[str], references: Sequence[str | Sequence[str]],
          use_stemmer: bool = False, tokenize: str = AUTO) -> dict[str, float]:
    """Mean ROUGE-1/2/L F-measure (0-1) over the pairs, from ``rouge_score``; the best reference counts.

    ASCII text with ``13a`` words gets rouge-score's own tokenizer; other text (Cyrillic, accented
    letters, Chinese, ...), which that tokenizer drops, gets :class:`~.words.RougeTokenizer` with the
    words of ``tokenize`` (chosen from the text by default)."""
    from rouge_score import rouge_scorer

    refs = _check_refs(predictions, references)
    texts = [*predictions, *(r for ref in refs for r in ref)]
    name = resolve(tokenize, texts)
    tokenizer = RougeTokenizer(name, use_stemmer) if name != DEFAULT or needs_unicode_rouge(texts) else None
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer, tokenizer=tokenizer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for pred, ref in zip(predictions, refs):
        scores = scorer.score(ref[0], pred) if len(ref) == 1 else scorer.score_multi(ref, pred)
        for key in ROUGE_TYPES:
            totals[key] += scores[key].fmeasure
    return {key: value / len(predictions) for key, value in totals.items()}


def text_perplexity(texts: Sequence[str], model: ModelLike = None, *, contexts: Sequence[str] | None = None,
                    batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = False,
                    device: str = "auto") -> dict[str, Any]:
    """Perplexity of texts under a scoring model, pooled over all their tokens.

    Without ``contexts`` each text follows the end-of-text token, so its first token is scored too
    (the usual way to score short texts with GPT-2); with ``contexts[i]`` (a prompt) text i is scored
    given it. Texts longer than the model's context are scored with sliding windows (stride half the
    context). Returns ``perplexity``, ``tokens``, ``nll`` and per-text ``nlls``/``counts``.
    """
    gen = as_generator(model, device)
    bos = [] if gen.eos_token_id is None else [gen.eos_token_id]
    encoded = gen.tokenizer.encode_batch(list(texts))
    prefixes = gen.tokenizer.encode_batch(list(contexts)) if contexts is not None else [bos] * len(encoded)
    if len(prefixes) != len(encoded):
        raise ValueError(f"got {len(texts)} texts but {len(prefixes)} contexts")
    out = score_continuations(gen, prefixes, encoded, batch_tokens=batch_tokens, progress=progress)
    out["model"] = gen.name
    return out


def score_continuations(gen: Generator, prefixes: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]],
                        *, batch_tokens: int = DEFAULT_BATCH_TOKENS, progress: bool = False) -> dict[str, Any]:
    """NLL of token ids ``continuations[i]`` given ``prefixes[i]``, batched; pooled perplexity too.

    Sequences longer than the model's context are scored with sliding windows (stride half the context).
    """
    docs = [list(p) + list(c) for p, c in zip(prefixes, continuations)]
    starts = [max(1, len(p)) for p in prefixes]  # without any prefix the first token has no context
    block = gen.config.n_positions
    windows = [Window(d, *w) for d, ids in enumerate(docs)
               for w in sliding_windows(len(ids), block, max(1, block // 2), score_from=starts[d])]
    with progress_bar(sum(w.end - w.first for w in windows), "scoring", progress) as advance:
        nlls, counts = score_windows(gen.model, docs, windows, batch_tokens=batch_tokens, on_progress=advance)
    nll, tokens = sum(nlls), sum(counts)
    return {"perplexity": perplexity_of(nll, tokens), "tokens": tokens, "nll": nll, "nlls": nlls, "counts": counts}


def diversity_metrics(texts: Sequence[str], tokenize: str = AUTO) -> dict[str, float | None]:
    """The reference-free measures of a set of generations (words split by ``tokenize``, see :mod:`.words`)."""
    name = resolve(tokenize, texts)
    return {"distinct_1": distinct_n(texts, 1, name), "distinct_2": distinct_n(texts, 2, name),
            "distinct_3": distinct_n(texts, 3, name), "self_bleu": self_bleu(texts, name),
            "repeated_4gram_rate": repeated_ngram_rate(texts, 4, name), "mean_length": mean_length(texts, name)}


def text_metrics(predictions: Sequence[str], references: Sequence[str | Sequence[str]] | None = None, *,
                 model: ModelLike | bool = False, use_stemmer: bool = False, progress: bool = False,
                 device: str = "auto", tokenize: str = AUTO) -> dict[str, Any]:
    """All text metrics of ``predictions`` in one dict.

    With ``references``: ``bleu``, ``chrf`` (0-100) and ``rouge1``/``rouge2``/``rougeL`` (0-1).
    Always: distinct-1/2/3, ``self_bleu``, ``repeated_4gram_rate``, ``mean_length`` (words). With a
    scoring ``model`` (a Generator or reference; ``None`` means the default model, ``False`` none):
    ``perplexity`` of the predictions under it. ``tokenize``: how words are split (sacrebleu's names,
    see :mod:`.words`; ``auto`` chooses from the predictions and references), reported as ``tokenize``.
    ``ValueError`` names a bad ``tokenize``.
    """
    predictions = list(predictions)
    if not predictions:
        raise ValueError("predictions is empty")
    refs = None if references is None else _check_refs(predictions, references)
    name = resolve(tokenize, [*predictions, *(r for ref in refs or () for r in ref)])
    out: dict[str, Any] = {"count": len(predictions), "tokenize": name}
    if refs is not None:
        out["bleu"] = bleu(predictions, refs, name)
        out["chrf"] = chrf(predictions, refs)
        out.update(rouge(predictions, refs, use_stemmer=use_stemmer, tokenize=name))
    out.update(diversity_metrics(predictions, name))
    if model is not False:
        scored = text_perplexity(predictions, model, progress=progress, device=device)
        out.update(perplexity=scored["perplexity"], perplexity_tokens=scored["tokens"], model=scored["model"])
    return out


def _as_refs(value: Any, where: str) -> list[str]:
    value = [value] if isinstance(value, str) else value
    if not (isinstance(value, list) and value and all(isinstance(v, str) for v in value)):
        raise ValueError(f"{where}: references must be a string or a non-empty list of strings")
    return value


def read_predictions(path: str | Path) -> tuple[list[str], list[list[str]] | None]:
    """Predictions from a text file (one per line) or JSON Lines (``.jsonl``).

    A JSONL line is a string, or an object with the text under one of ``prediction``, ``text``,
    ``completion``, ``output``, ``generation``, optionally with its ``references`` (a string or a
    list); those are returned second (None when the lines carry none).
    """
    path = Path(path)
    if format_of(path) != "jsonl":
        return [line for _, line in iter_lines(path)], None
    texts: list[str] = []
    refs: list[list[str]] = []
    for number, item in iter_jsonl(path):
        where = f"{path}:{number}"
        if isinstance(item, str):
            texts.append(item)
            continue
        key = next((k for k in _TEXT_KEYS if isinstance(item, dict) and k in item), None)
        if key is None or not isinstance(item[key], str):
            raise ValueError(f"{where}: expected a JSON string or an object with a string under one of "
                             f"{', '.join(_TEXT_KEYS)}")
        texts.append(item[key])
        for ref_key in ("references", "reference"):
            if ref_key in item:
                refs.append(_as_refs(item[ref_key], where))
                break
    if refs and len(refs) != len(texts):
        raise ValueError(f"{path}: {len(refs)} of {len(texts)} lines carry references; give all or none")
    return texts, refs or None


def read_references(path: str | Path) -> list[list[str]]:
    """References from a text file (one per line) or JSON Lines (a string, a list of strings, or an
    object with ``references``/``reference``/``target``/``text``)."""
    path = Path(path)
    if format_of(path) != "jsonl":
        return [[line] for _, line in iter_lines(path)]
    refs = []
    for number, item in iter_jsonl(path):
        where = f"{path}:{number}"
        if isinstance(item, dict):
            key = next((k for k in _REF_KEYS if k in item), None)
            if key is None:
                raise ValueError(f"{where}: expected an object with one of {', '.join(_REF_KEYS)}")
            item = item[key]
        refs.append(_as_refs(item, where))
    return refs
