"""Sampling transforms against their ``transformers`` counterparts, the pipeline, and the sampler."""

from __future__ import annotations

import pytest
import torch
from transformers.generation import logits_process as hf

from gpt2lab.sampling import (
    BadWords,
    LogitBias,
    LogitsPipeline,
    MinP,
    NoRepeatNGram,
    PresenceFrequencyPenalty,
    RepetitionPenalty,
    SamplingParams,
    Temperature,
    TopK,
    TopP,
    TypicalP,
    bad_words_ids,
    sample,
)

V = 1000  # vocabulary of the random-logit tests


def randn(*shape: int, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed)) * scale


def with_ties(batch: int, seed: int = 0) -> torch.Tensor:
    """Logits rounded to one decimal: many equal values, including at every top-k boundary."""
    return (randn(batch, V, seed=seed) * 2).round() / 10


def same(a: torch.Tensor, b: torch.Tensor) -> None:
    """Bitwise equal, -inf included."""
    assert a.shape == b.shape
    assert torch.equal(torch.isinf(a), torch.isinf(b)), "different tokens masked"
    assert torch.equal(a, b)


# -- each transform against transformers ------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.3, 0.7, 1.5])
def test_temperature_matches_hf(temperature):
    x = randn(4, V)
    same(Temperature(temperature)(x), hf.TemperatureLogitsWarper(temperature)(None, x.clone()))


@pytest.mark.parametrize("k", [1, 3, 10, 50, V, V + 7])
@pytest.mark.parametrize("make", [lambda seed: randn(6, V, seed=seed), lambda seed: with_ties(6, seed=seed)],
                         ids=["random", "ties"])
def test_top_k_matches_hf(k, make):
    x = make(k)
    same(TopK(k)(x), hf.TopKLogitsWarper(k)(None, x.clone()))


def test_top_k_keeps_every_token_tied_with_the_kth():
    x = torch.tensor([[3.0, 2.0, 1.0, 2.0, 0.5, 2.0]])
    out = TopK(2)(x)
    assert torch.isfinite(out).tolist() == [[True, True, False, True, False, True]]
    same(out, hf.TopKLogitsWarper(2)(None, x.clone()))
    ties = with_ties(6)
    assert (torch.isfinite(TopK(10)(ties)).sum(-1) > 10).any(), "the tie data has no tie at the 10th value"


@pytest.mark.parametrize("p", [0.05, 0.3, 0.7, 0.9, 0.99])
def test_top_p_matches_hf(p):
    x = randn(6, V, seed=int(p * 100))
    same(TopP(p)(x), hf.TopPLogitsWarper(p)(None, x.clone()))


@pytest.mark.parametrize("scale", [1.0, 2.0, 5.0])
def test_top_p_matches_hf_on_gpt2_sized_vocab_per_row(scale):
    """Full vocabulary, one top_p per row: exercises both the sorted pass and the top-m shortcut."""
    ps = [0.3, 0.9, 0.95, 0.6]
    x = randn(4, 50257, seed=int(scale), scale=scale)
    out = TopP(ps)(x)
    for i, p in enumerate(ps):
        same(out[i:i + 1], hf.TopPLogitsWarper(p)(None, x[i:i + 1].clone()))


def test_top_p_keeps_the_token_that_crosses_the_threshold():
    x = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    out = TopP(0.7)(x)  # 0.5 < 0.7, 0.5 + 0.3 crosses it: both kept, the rest dropped
    assert torch.isfinite(out).tolist() == [[True, True, False, False]]
    same(out, hf.TopPLogitsWarper(0.7)(None, x.clone()))
    # a very small top_p still keeps the most likely token (min_tokens_to_keep=1)
    assert torch.isfinite(TopP(0.01)(x)).tolist() == [[True, False, False, False]]
    same(TopP(0.01)(x), hf.TopPLogitsWarper(0.01)(None, x.clone()))


@pytest.mark.parametrize("p", [0.01, 0.1, 0.5, 1.0])
def test_min_p_matches_hf(p):
    x = randn(6, V, seed=int(p * 100), scale=1.5)
    same(MinP(p)(x), hf.MinPLogitsWarper(p)(None, x.clone()))


@pytest.mark.parametrize("p", [0.2, 0.5, 0.9, 0.99])
def test_typical_p_matches_hf(p):
    x = randn(6, V, seed=int(p * 100))
    same(TypicalP(p)(x), hf.TypicalLogitsWarper(p)(None, x.clone()))


def test_min_tokens_to_keep_matches_hf():
    x = randn(4, V, seed=3)
    same(TopP(0.01, min_tokens_to_keep=5)(x), hf.TopPLogitsWarper(0.01, min_tokens_to_keep=5)(None, x.clone()))
    same(TopK(2, min_tokens_to_keep=4)(x), hf.TopKLogitsWarper(2, min_tokens_to_keep=4)(None, x.clone()))
    same(MinP(0.9, min_tokens_to_keep=3)(x), hf.MinPLogitsWarper(0.9, min_tokens_to_keep=3)(None, x.clone()))
    same(TypicalP(0.1, min_tokens_to_keep=7)(x), hf.TypicalLogitsWarper(0.1, min_tokens_to_keep=7)(None, x.clone()))


def history_batch(batch: int = 4, length: int = 40, vocab: int = 12, seed: int = 0) -> torch.Tensor:
    """Token ids from a small alphabet, so tokens and n-grams repeat."""
    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("penalty", [0.5, 1.2, 3.0])
def test_repetition_penalty_matches_hf(penalty):
    x, ids = randn(4, V), history_batch()
    histories = ids.tolist()
    ours = RepetitionPenalty(penalty)(x, histories, [5] * 4)  # prompt + generated: prompt_lens do not matter
    same(ours, hf.RepetitionPenaltyLogitsProcessor(penalty)(ids, x.clone()))
    assert (ours != x).any()


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_no_repeat_ngram_matches_hf(n):
    x, ids = randn(4, V), history_batch(length=30, vocab=6, seed=n)
    ours = NoRepeatNGram(n)(x, ids.tolist(), [0] * 4)
    same(ours, hf.NoRepeatNGramLogitsProcessor(n)(ids, x.clone()))
    assert torch.isinf(ours).any()


def test_no_repeat_ngram_short_history_bans_nothing():
    x = randn(1, V)
    same(NoRepeatNGram(3)(x, [[1, 2]], [2]), x)


def test_bad_words_match_hf():
    bad = [[5], [7, 8], [1, 2, 3], [9, 9]]
    ids = torch.tensor([[0, 0, 7], [4, 1, 2], [3, 2, 9], [1, 1, 2]])
    x = randn(4, V)
    ours = BadWords([bad] * 4, V)(x, ids.tolist(), [1] * 4)
    same(ours, hf.NoBadWordsLogitsProcessor(bad)(ids, x.clone()))
    assert torch.isinf(ours[0, [5, 8]]).all() and torch.isinf(ours[1, [3, 5]]).all()
    assert torch.isfinite(ours[0, 3]) and torch.isinf(ours[2, 9])


def test_logit_bias_matches_hf_sequence_bias():
    bias = {3: 2.5, 10: -7.0, 999: 0.25}
    x = randn(2, V)
    hf_bias = hf.SequenceBiasLogitsProcessor([[[t], b] for t, b in bias.items()])
    same(LogitBias([bias, bias], V)(x), hf_bias(torch.zeros(2, 1, dtype=torch.long), x.clone()))


def test_bad_words_strings_are_tokenized_with_and_without_a_space(tokenizer):
    tok = tokenizer
    ids = bad_words_ids(tok, ["hello world", "Paris"])
    assert tok.encode("hello world") in ids and tok.encode(" hello world") in ids
    assert tok.encode("Paris") in ids and tok.encode(" Paris") in ids
    pipe = LogitsPipeline([SamplingParams(temperature=0, bad_words=["Paris"])], tok.vocab_size, tok)
    out = pipe(randn(1, tok.vocab_size), [tok.encode("I went to")], [3])
    (paris,), (space_paris,) = tok.encode("Paris"), tok.encode(" Paris")  # one token each
    assert torch.isinf(out[0, [paris, space_paris]]).all() and torch.isfinite(out).sum() == tok.vocab_size - 2
    # " hello world" is two tokens: " world" is banned only right after " hello"
    world = tok.encode(" hello world")[-1]
    pipe = LogitsPipeline([SamplingParams(temperature=0, bad_words=["hello world"])] * 2, tok.vocab_size, tok)
    out = pipe(randn(2, tok.vocab_size), [tok.encode("say hello"), tok.encode("say goodbye")], [2, 2])
    assert torch.isinf(out[0, world]) and torch.isfinite(out[1, world])


# -- per-row parameters ---------------------------------------------------------------------------

# (our transform with per-row values, transformers' processor for one value, value meaning "off")
PER_ROW = [
    (Temperature, hf.TemperatureLogitsWarper, [0.5, 1.0, 2.0, 1.0], 1.0),
    (TopK, hf.TopKLogitsWarper, [5, 0, 40, 1], 0),
    (TopP, hf.TopPLogitsWarper, [0.9, 1.0, 0.3, 0.6], 1.0),
    (MinP, hf.MinPLogitsWarper, [0.2, 0.0, 0.05, 0.5], 0.0),
    (TypicalP, hf.TypicalLogitsWarper, [0.9, 1.0, 0.4, 0.7], 1.0),
    (RepetitionPenalty, hf.RepetitionPenaltyLogitsProcessor, [1.3, 1.0, 0.7, 2.0], 1.0),
    (NoRepeatNGram, hf.NoRepeatNGramLogitsProcessor, [2, 0, 1, 3], 0),
]


@pytest.mark.parametrize("ours, theirs, values, off", PER_ROW, ids=[p[0].__name__ for p in PER_ROW])
def test_per_row_values_match_hf_row_by_row(ours, theirs, values, off):
    x = with_ties(len(values), seed=1) * 10
    ids = history_batch(batch=len(values), length=30, vocab=8)
    out = ours(values)(x, ids.tolist(), [10] * len(values))
    for i, value in enumerate(values):
        if value == off:
            same(out[i], x[i])  # switched off: untouched
        else:
            same(out[i:i + 1], theirs(value)(ids[i:i + 1], x[i:i + 1].clone()))


def test_presence_and_frequency_penalties_count_generated_tokens_only():
    x = torch.zeros(2, 8)
    histories = [[1, 1, 2, 3, 3, 3, 4], [3, 5, 5]]  # prompts: [1, 1, 2] and [3]
    out = PresenceFrequencyPenalty([0.5, 0.0], [0.25, 1.0])(x, histories, [3, 1])
    assert out[0].tolist() == [0, 0, 0, -(0.5 + 3 * 0.25), -(0.5 + 0.25), 0, 0, 0]
    assert out[1].tolist() == [0, 0, 0, 0, 0, -2.0, 0, 0]  # the prompt's 3 is not counted
    # negative values reward tokens instead
    out = PresenceFrequencyPenalty(-1.0, 0.0)(x[:1], histories[:1], [3])
    assert out[0, 3] == 1.0 and out[0, 1] == 0.0


def test_presence_and_frequency_match_the_openai_formula_per_row():
    x, ids = randn(4, V, seed=6), history_batch(batch=4, length=30, vocab=20, seed=6)
    presence, frequency, prompt_lens = [0.4, 0.0, -1.0, 2.0], [0.1, 0.0, 0.5, -0.3], [5, 10, 0, 29]
    out = PresenceFrequencyPenalty(presence, frequency)(x, ids.tolist(), prompt_lens)
    for i in range(4):
        counts = torch.bincount(ids[i, prompt_lens[i]:], minlength=V).float()
        same(out[i], x[i] - (presence[i] * (counts > 0) + frequency[i] * counts))
    same(out[1], x[1])  # both off


STATEFUL = [lambda: RepetitionPenalty([1.5, 2.0]), lambda: PresenceFrequencyPenalty(0.3, [0.2, -0.4]),
            lambda: NoRepeatNGram([2, 3]), lambda: BadWords([[[3, 4], [1]], [[5, 6, 7]]], V)]


@pytest.mark.parametrize("make", STATEFUL, ids=["repetition", "presence", "ngram", "bad_words"])
def test_history_state_follows_growing_and_replaced_histories(make):
    """Counts kept from step to step equal counting from scratch, also when a slot gets a new request."""
    x = randn(2, V, seed=5)
    transform = make()
    ids = history_batch(batch=2, length=25, vocab=10, seed=9).tolist()
    for end in range(5, 26, 4):  # a few steps of a growing history
        histories = [h[:end] for h in ids]
        same(transform(x, histories, [3, 3]), make()(x, histories, [3, 3]))
    replaced = [ids[0], [7, 5, 6, 1]]  # slot 1 now holds a different, shorter request
    same(transform(x, replaced, [3, 1]), make()(x, replaced, [3, 1]))


# -- the pipeline -------------------------------------------------------------------------------------


def hf_chain(p: SamplingParams) -> hf.LogitsProcessorList:
    """transformers' processors for one row, in SamplingParams' documented order."""
    procs = []
    if p.logit_bias:
        procs.append(hf.SequenceBiasLogitsProcessor([[[t], float(b)] for t, b in p.logit_bias.items()]))
    if p.repetition_penalty != 1.0:
        procs.append(hf.RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.no_repeat_ngram_size:
        procs.append(hf.NoRepeatNGramLogitsProcessor(p.no_repeat_ngram_size))
    if not p.greedy:
        if p.temperature != 1.0:
            procs.append(hf.TemperatureLogitsWarper(p.temperature))
        if p.top_k:
            procs.append(hf.TopKLogitsWarper(p.top_k))
        if p.top_p < 1:
            procs.append(hf.TopPLogitsWarper(p.top_p))
        if p.min_p > 0:
            procs.append(hf.MinPLogitsWarper(p.min_p))
        if p.typical_p < 1:
            procs.append(hf.TypicalLogitsWarper(p.typical_p))
    return hf.LogitsProcessorList(procs)


MIXED = [
    SamplingParams(temperature=0.8, top_k=50, top_p=0.9),
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.3, top_k=20, min_p=0.05, repetition_penalty=1.2),
    SamplingParams(temperature=0, repetition_penalty=1.5, no_repeat_ngram_size=2, top_k=3),
    SamplingParams(top_k=100, typical_p=0.8, top_p=0.95),
    SamplingParams(temperature=0.7, logit_bias={5: 30.0, 6: -30.0}),
    SamplingParams(temperature=0, logit_bias={7: 50.0}),
]


@pytest.mark.parametrize("rows", [MIXED, [MIXED[0]] * 3, [MIXED[4], MIXED[0], MIXED[2]],
                                  [SamplingParams(top_p=0.8, min_p=0.02), MIXED[0]]],
                         ids=["mixed", "common", "all-top-k", "top-p-without-top-k"])
def test_pipeline_matches_hf_per_row(rows):
    x = with_ties(len(rows), seed=2) * 20
    ids = history_batch(batch=len(rows), length=20, vocab=V, seed=4)
    out = LogitsPipeline(rows, V)(x, ids.tolist(), [8] * len(rows))
    assert torch.equal(x, with_ties(len(rows), seed=2) * 20), "the input logits were modified"
    for i, p in enumerate(rows):
        same(out[i:i + 1], hf_chain(p)(ids[i:i + 1], x[i:i + 1].clone()))


def test_pipeline_matches_hf_on_gpt2_vocab():
    rows = [SamplingParams(temperature=0.8, top_k=50, top_p=0.9), SamplingParams(temperature=0.9, top_p=0.8),
            SamplingParams(top_k=40, min_p=0.05, repetition_penalty=1.3)]
    x = randn(3, 50257, seed=8, scale=2.5)
    ids = history_batch(batch=3, length=16, vocab=50257, seed=8)
    out = LogitsPipeline(rows, 50257)(x, ids.tolist(), [16] * 3)
    for i, p in enumerate(rows):
        same(out[i:i + 1], hf_chain(p)(ids[i:i + 1], x[i:i + 1].clone()))


def test_pipeline_skips_transforms_no_row_uses():
    pipe = LogitsPipeline([SamplingParams(), SamplingParams(temperature=0, top_p=0.5)], V)
    assert pipe.transforms == []
    x = randn(2, V)
    same(pipe(x, [[1], [2]], [1, 1]), x)
    names = [type(t).__name__ for t in LogitsPipeline(MIXED, V).transforms]
    assert names == ["LogitBias", "RepetitionPenalty", "NoRepeatNGram", "Temperature", "TopK", "TopP", "MinP",
                     "TypicalP"]


def test_pipeline_rejects_bad_input(tokenizer):
    with pytest.raises(ValueError, match="bad_words needs a tokenizer"):
        LogitsPipeline([SamplingParams(bad_words=["x"])], V)
    with pytest.raises(ValueError, match="logit_bias"):
        LogitsPipeline([SamplingParams(logit_bias={V: 1.0})], V)
    pipe = LogitsPipeline([SamplingParams()] * 2, V)
    with pytest.raises(ValueError, match="logits must have shape"):
        pipe(randn(3, V), [[1]] * 3, [1] * 3)
    with pytest.raises(ValueError, match="histories"):
        pipe(randn(2, V), [[1]], [1])


# -- transform argument validation ----------------------------------------------------------------


@pytest.mark.parametrize("make, name", [
    (lambda: TopK(-1), "top_k"), (lambda: TopK(2.5), "top_k"), (lambda: TopP(0.0), "top_p"),
    (lambda: TopP([0.5, 1.5]), "top_p"), (lambda: MinP(-0.1), "min_p"), (lambda: TypicalP(0), "typical_p"),
    (lambda: Temperature(0.0), "temperature"), (lambda: RepetitionPenalty(0), "repetition_penalty"),
    (lambda: NoRepeatNGram(-2), "no_repeat_ngram_size"), (lambda: TopP(0.5, min_tokens_to_keep=0), "min_tokens"),
    (lambda: PresenceFrequencyPenalty(float("nan")), "presence_penalty"),
    (lambda: BadWords([[[V]]], V), "bad_words"), (lambda: LogitBias([{-1: 1.0}], V), "logit_bias"),
    (lambda: TopK([]), "top_k"),
])
def test_transform_arguments_are_validated(make, name):
    with pytest.raises(ValueError, match=name):
        make()


def test_per_row_values_must_match_the_batch():
    with pytest.raises(ValueError, match="top_k: got 3 per-row values for a batch of 2"):
        TopK([1, 2, 3])(randn(2, V))


# -- the sampler ----------------------------------------------------------------------------------


def draws(logits_row: torch.Tensor, params: SamplingParams, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` independent samples for one row: the row repeated n times in one batch."""
    rows = [params] * n
    scores = LogitsPipeline(rows, logits_row.shape[-1])(logits_row.expand(n, -1), [[0]] * n, [1] * n)
    torch.manual_seed(seed)
    return sample(scores, rows, [None] * n)


def test_greedy_rows_take_the_argmax():
    x = randn(5, V, seed=11)
    params = [SamplingParams(temperature=0)] * 5
    assert torch.equal(sample(x, params, [None] * 5), x.argmax(-1))


def test_top_k_1_equals_greedy():
    x = randn(8, V, seed=12)
    params = [SamplingParams(temperature=1.5, top_k=1)] * 8
    scores = LogitsPipeline(params, V)(x, [[0]] * 8, [1] * 8)
    for seed in range(5):
        gens = [torch.Generator().manual_seed(seed * 10 + i) for i in range(8)]
        assert torch.equal(sample(scores, params, gens), x.argmax(-1))


def test_top_k_only_ever_draws_the_k_most_likely_tokens():
    x = randn(1, V, seed=13, scale=1.0)  # flat enough that all k tokens come up
    k = 7
    got = set(draws(x[0], SamplingParams(top_k=k), 4000).tolist())
    assert got == set(x[0].topk(k).indices.tolist())


def chi_square_pvalue(counts: torch.Tensor, expected: torch.Tensor) -> float:
    """Pearson's chi-square goodness-of-fit test (as scipy.stats.chisquare), without scipy."""
    stat = ((counts.double() - expected) ** 2 / expected).sum()
    dof = torch.tensor(counts.numel() - 1, dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, stat / 2))


def test_sampled_distribution_matches_softmax():
    x = randn(1, 30, seed=14, scale=1.0)
    temperature, n = 0.7, 20000
    counts = torch.bincount(draws(x[0], SamplingParams(temperature=temperature), n, seed=1), minlength=30)
    expected = torch.softmax(x[0].double() / temperature, -1) * n
    assert chi_square_pvalue(counts, expected) > 1e-3
    # and the test can fail: the same draws do not fit the untempered distribution
    assert chi_square_pvalue(counts, torch.softmax(x[0].double(), -1) * n) < 1e-6


def test_chi_square_helper_gives_textbook_critical_values():
    # 5% critical values of the chi-square distribution with 1 and 3 degrees of freedom
    d = (3.841459 / 2) ** 0.5  # statistic 2 * d**2
    assert chi_square_pvalue(torch.tensor([1 + d, 1 - d]), torch.tensor([1.0, 1.0])) == pytest.approx(0.05, abs=1e-6)
    expected = torch.full((4,), 100.0)
    counts = expected + torch.tensor([1.0, -1.0, 1.0, -1.0]) * (7.814728 * 100 / 4) ** 0.5
    assert chi_square_pvalue(counts, expected) == pytest.approx(0.05, abs=1e-6)


def test_masked_tokens_are_never_drawn():
    x = torch.zeros(1, 50)
    x[0, 10:] = float("-inf")
    got = draws(x[0], SamplingParams(), 2000)
    assert got.max() < 10 and len(set(got.tolist())) == 10


def test_seeded_row_does_not_depend_on_its_batch():
    """Same seed, same logits: same tokens alone or next to greedy, unseeded and differently filtered rows."""
    row = randn(1, V, seed=15, scale=1.0)
    params = SamplingParams(temperature=0.9, top_k=200, top_p=0.95, repetition_penalty=1.1, seed=7)

    def run(batch: torch.Tensor, rows: list[SamplingParams], position: int) -> list[int]:
        pipe = LogitsPipeline(rows, V)
        gens = [None if p.seed is None else torch.Generator().manual_seed(p.seed) for p in rows]
        histories = [[1, 2, 3] for _ in rows]
        for _ in range(20):
            tokens = sample(pipe(batch, histories, [3] * len(rows)), rows, gens)
            for h, t in zip(histories, tokens.tolist()):
                h.append(t)
        return histories[position][3:]

    alone = run(row, [params], 0)
    others = [SamplingParams(temperature=0), SamplingParams(top_k=5, seed=3), SamplingParams(top_p=0.5)]
    mixed = torch.cat([randn(1, V, seed=16), randn(1, V, seed=17), row, randn(1, V, seed=18, scale=9.0)])
    assert run(mixed, others[:2] + [params] + others[2:], 2) == alone
    assert len(set(alone)) > 5  # it really is sampling


def test_top_k_takes_an_empty_batch():
    """A batch of no rows: torch.topk gives no rows back; the C top-k's wrapper died of max([])."""
    for top_k in (3, [3]):
        assert TopK(top_k).apply_(torch.empty(0, 10)).shape == (0, 10)


def _hard_scores(i: int, rows: int, vocab: int) -> torch.Tensor:
    """Scores that make selection and sums tricky, by case: ties, -inf, +inf, one finite token, zeros of both
    signs, huge spreads (subnormal probabilities)."""
    gen = torch.Generator().manual_seed(i)
    s = torch.randn(rows, vocab, generator=gen)
    kind = i % 7
    if kind == 1:
        s = torch.randint(-3, 3, (rows, vocab), generator=gen).float()
    elif kind == 2:
        s[torch.rand(rows, vocab, generator=gen) < 0.6] = float("-inf")
        s[:, 0] = 0.0  # never every token
    elif kind == 3:
        s[torch.rand(rows, vocab, generator=gen) < 0.05] = float("inf")
    elif kind == 4:
        s.fill_(float("-inf"))
        s[:, vocab // 2] = 1.0
    elif kind == 5:
        s[:, ::3], s[:, 1::5] = 0.0, -0.0
    elif kind == 6:
        s *= 60
    return s


@pytest.mark.parametrize("vocab", [1, 9, 100, 50257])
def test_top_k_and_sample_give_the_same_results_through_the_kernels_and_torch(vocab):
    """The C top-k and inverse-CDF (contiguous fp32 rows) against the PyTorch code (the same scores, but a
    non-contiguous view, which the kernels refuse): the same scores, bit for bit, and the same tokens for the
    same seeds, with mixed per-row k (0, 1, beyond the vocabulary), greedy and seeded and unseeded rows."""
    for i in range(14 if vocab < 50257 else 7):
        scores = _hard_scores(i, 4, vocab)
        ks = [0, 1, vocab + 5, 1 + i % vocab]
        fast, slow = scores.clone(), scores.t().contiguous().t()
        assert fast.is_contiguous() and not slow.is_contiguous() or vocab == 1
        TopK(ks).apply_(fast)
        TopK(ks).apply_(slow)
        assert torch.equal(fast, slow) and torch.equal(fast.signbit(), slow.signbit())
        params = [SamplingParams(seed=7), SamplingParams(), SamplingParams(temperature=0), SamplingParams(seed=i)]
        picks = []
        for x in (fast, slow, scores.clone(), scores.t().contiguous().t()):
            torch.manual_seed(i)  # the unseeded row's draw
            gens = [torch.Generator().manual_seed(7), None, None, torch.Generator().manual_seed(i)]
            try:
                picks.append(sample(x, params, gens).tolist())
            except ValueError as exc:  # +inf scores: NaN probabilities, the same error either way
                picks.append(str(exc))
        assert picks[0] == picks[1] and picks[2] == picks[3], (i, picks)
        assert not isinstance(picks[2], str) or i % 7 == 3


def test_sample_rejects_rows_with_nothing_left():
    with pytest.raises(ValueError, match="every token masked"):
        sample(torch.full((1, 5), float("-inf")), [SamplingParams()], [None])


def test_greedy_rows_with_every_token_masked_are_rejected_not_given_token_0():
    """A greedy row whose every token is banned took argmax's 0 (a banned token) where a sampling row raised."""
    scores = torch.zeros(2, 5)
    scores[1] = float("-inf")
    for params in ([SamplingParams(temperature=0)] * 2, [SamplingParams(seed=1), SamplingParams(temperature=0)]):
        with pytest.raises(ValueError, match="every token masked"):
            sample(scores, params, [None, None])
    assert sample(scores[:1], [SamplingParams(temperature=0)], [None]).tolist() == [0]


def test_sample_rejects_nan_scores_instead_of_picking_a_token():
    """NaN logits (a NaN weight) made greedy rows return token 0 and sampled rows blame masking."""
    scores = torch.zeros(2, 5)
    scores[1, 3] = float("nan")
    for params in ([SamplingParams(temperature=0)] * 2, [SamplingParams(temperature=0), SamplingParams(seed=1)],
                   [SamplingParams(seed=1), SamplingParams(temperature=0)]):
        with pytest.raises(ValueError, match="scores are NaN"):
            sample(scores, params, [None, None])
    assert sample(scores[:1], [SamplingParams(temperature=0)], [None]).tolist() == [0]


# -- SamplingParams validation ------------------------------------------------------------------------


@pytest.mark.parametrize("name, value", [
    ("temperature", -0.1), ("temperature", float("nan")), ("temperature", 101), ("top_k", -2), ("top_k", 1.5),
    ("top_k", True), ("top_p", 0.0), ("top_p", 1.01), ("min_p", -0.01), ("min_p", 1.5), ("typical_p", 0),
    ("typical_p", 2), ("repetition_penalty", 0), ("repetition_penalty", -1.0), ("presence_penalty", 2.5),
    ("frequency_penalty", -3), ("no_repeat_ngram_size", -1), ("max_new_tokens", -1), ("max_length", 0),
    ("n", 0), ("num_beams", 0), ("seed", -2**63 - 1), ("logprobs", 21), ("stop", [""]), ("stop", 5),
    ("bad_words", [3]), ("stop_token_ids", [-1]), ("logit_bias", {"x": 1.0}), ("logit_bias", {-1: 1.0}),
    ("logit_bias", [1]), ("length_penalty", float("inf")),
])
def test_sampling_params_reject_bad_values(name, value):
    with pytest.raises(ValueError, match=name):
        SamplingParams(**{name: value})


def test_sampling_params_accept_json_style_logit_bias():
    assert SamplingParams(logit_bias={"50256": -100}).logit_bias == {50256: -100}
