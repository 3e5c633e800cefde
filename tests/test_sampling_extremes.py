"""Every value inside a sampling parameter's documented range computes finitely (issue 13, kind 1).

Property-based: ``hypothesis`` draws SamplingParams at the edges of their ranges (tiny positive and
huge values, alone and combined, several rows with different settings in one batch) and the
pipeline must give finite probabilities and a sampled token, never an exception or a NaN.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpt2lab.sampling import LogitsPipeline, SamplingParams, sample

VOCAB = 300
TINY = 5e-324  # the smallest positive float


def edge(low: float, high: float, *, low_open: bool = False, off: float | None = None) -> st.SearchStrategy:
    """A float of [low, high] (or (low, high]), most often at or near an end."""
    ends = [high, high * 0.999, 1.0 if low < 1 <= high else high]
    ends += [TINY, 1e-45, 1e-38, 1e-30, 1e-8] if low_open else [low, low + 1e-30]
    if off is not None:
        ends.append(off)
    inner = st.floats(low, high, allow_nan=False, allow_infinity=False,
                      exclude_min=low_open).filter(lambda v: not (low_open and v <= low))
    return st.one_of(st.sampled_from([v for v in ends if low <= v <= high and not (low_open and v == low)]), inner)


params_strategy = st.builds(
    SamplingParams,
    temperature=st.one_of(st.just(0.0), edge(0.0, 100.0, low_open=True)),
    top_k=st.sampled_from([0, 1, 2, VOCAB - 1, VOCAB, 10 * VOCAB]),
    top_p=edge(0.0, 1.0, low_open=True),
    min_p=edge(0.0, 1.0),
    typical_p=edge(0.0, 1.0, low_open=True),
    repetition_penalty=edge(0.0, 100.0, low_open=True),
    presence_penalty=edge(-2.0, 2.0),
    frequency_penalty=edge(-2.0, 2.0),
    no_repeat_ngram_size=st.sampled_from([0, 1, 2, 3]),
    logit_bias=st.dictionaries(st.integers(0, VOCAB - 1), edge(-100.0, 100.0), max_size=4),
    seed=st.integers(-2**63, 2**63 - 1),
)


@st.composite
def batches(draw) -> tuple[list[SamplingParams], torch.Tensor, list[list[int]]]:
    rows = draw(st.integers(1, 3))
    params = [draw(params_strategy) for _ in range(rows)]
    scale = draw(st.sampled_from([1e-3, 1.0, 30.0, 1e4]))
    seed = draw(st.integers(0, 1000))
    logits = torch.randn(rows, VOCAB, generator=torch.Generator().manual_seed(seed)) * scale
    histories = [draw(st.lists(st.integers(0, VOCAB - 1), min_size=1, max_size=40)) for _ in range(rows)]
    return params, logits, histories


def _check(params, logits, histories) -> None:
    pipeline = LogitsPipeline(params, VOCAB)
    prompt_lens = [max(1, len(h) // 2) for h in histories]
    # two steps, so the incremental history counts are exercised too
    for _step in range(2):
        scores = pipeline(logits, histories, prompt_lens)
        assert not torch.isnan(scores).any()
        assert not torch.isposinf(scores).any()
        probs = scores.softmax(dim=-1)
        assert torch.isfinite(probs).all()
        assert torch.allclose(probs.sum(dim=-1), torch.ones(len(params)), atol=1e-4)
        gens = [torch.Generator().manual_seed(p.seed) for p in params]
        tokens = sample(scores, params, gens)
        assert tokens.shape == (len(params),)
        for row, token in enumerate(tokens.tolist()):
            assert 0 <= token < VOCAB
            assert probs[row, token] > 0 or params[row].greedy  # a draw only picks what may be drawn
        histories = [h + [t] for h, t in zip(histories, tokens.tolist())]


@settings(max_examples=150, deadline=None, database=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(batches())
def test_every_value_in_range_samples_finitely(batch):
    _check(*batch)


@pytest.mark.parametrize("kwargs", [
    {"temperature": TINY}, {"temperature": 1e-45}, {"temperature": 1e-38}, {"temperature": 100.0},
    {"repetition_penalty": TINY}, {"repetition_penalty": 100.0},
    {"temperature": TINY, "repetition_penalty": TINY, "top_k": 1},
    {"temperature": TINY, "logit_bias": {1: 100.0, 2: -100.0}},
    {"temperature": TINY, "presence_penalty": 2.0, "frequency_penalty": -2.0},
    {"temperature": 0.0, "repetition_penalty": TINY},
    {"repetition_penalty": TINY, "typical_p": 0.5}, {"repetition_penalty": TINY, "min_p": 0.5},
    {"temperature": 1e-38, "typical_p": 0.3},
    {"temperature": TINY, "top_p": TINY, "min_p": 1.0, "typical_p": TINY},
])
def test_extremes_that_used_to_overflow(kwargs):
    logits = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0)) * 5
    _check([SamplingParams(seed=1, **kwargs)], logits, [[1, 2, 3, 4, 5, 1, 2, 3]])


def test_tiny_temperature_gives_the_limit_argmax():
    """As the temperature goes to 0 every draw is the most likely token (greedy's choice)."""
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(3)) * 5
    for t in (TINY, 1e-45, 1e-38, 1e-30):
        params = [SamplingParams(temperature=t, seed=s) for s in (1, 2)]
        scores = LogitsPipeline(params, VOCAB)(logits, [[0], [0]], [1, 1])
        tokens = sample(scores, params, [torch.Generator().manual_seed(s) for s in (1, 2)])
        assert tokens.tolist() == logits.argmax(dim=-1).tolist()


def test_tiny_repetition_penalty_gives_the_limit():
    """As the penalty goes to 0 a seen token with a positive logit outweighs every other: the largest."""
    logits = torch.full((1, VOCAB), -1.0)
    logits[0, 7], logits[0, 9], logits[0, 11] = 0.5, 0.25, 3.0  # 11 is the largest but never seen
    params = [SamplingParams(temperature=1.0, repetition_penalty=TINY, seed=0)]
    scores = LogitsPipeline(params, VOCAB)(logits, [[7, 9, 7]], [3])
    assert math.isfinite(float(scores[0, 7])) and scores[0, 7] > scores[0, 9] > scores[0, 11]
    assert float(scores.softmax(-1)[0, 7]) == pytest.approx(1.0)


@pytest.mark.parametrize("penalty", [1e-300, TINY, 1e-39])
def test_tiny_repetition_penalty_keeps_masked_seen_tokens_masked(penalty):
    """A seen token already at -inf (a bad word, EOS under min_tokens) or at exactly 0 gave NaN with a penalty
    that rounds to 0 in float32 (-inf * 0, 0 / 0): it stays -inf (and 0 stays the limit), and the step samples."""
    logits = torch.full((1, VOCAB), -1.0)
    logits[0, 5] = 0.0  # seen, exactly 0
    logits[0, 8] = 2.0  # seen, positive: the limit's winner
    for kwargs in ({"bad_words_ids": [[3]]}, {"min_tokens": 1, "stop_token_ids": [3]}):
        params = [SamplingParams(temperature=0.0, repetition_penalty=penalty, max_new_tokens=3, **kwargs)]
        scores = LogitsPipeline(params, VOCAB, eos_token_id=3)(logits, [[3, 5, 8]], [3])
        assert not bool(scores.isnan().any()), kwargs
        assert float(scores[0, 3]) == float("-inf") and int(scores.argmax()) == 8, kwargs
        assert int(sample(scores, params, [torch.Generator().manual_seed(0)])[0]) == 8
