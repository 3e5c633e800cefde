"""Beam search: token-identical to transformers ``generate(num_beams=..., do_sample=False)``."""

from __future__ import annotations

import pytest
import torch

import gpt2lab
from gpt2lab.checkpoints import load_model
from gpt2lab.generation.beam import beam_search
from gpt2lab.sampling import SamplingParams
from gpt2lab.tokenizer import Tokenizer

from .conftest import SHAPES, make_hf_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


# (length_penalty, early_stopping, n, new tokens, eos: "frequent" = a token the model likes, so beams
# finish at different steps; None = the model's own EOS, which random weights almost never pick)
CASES = [(1.0, False, 1, 12, None), (1.0, False, 3, 10, "frequent"), (2.0, True, 2, 14, "frequent"),
         (0.5, False, 4, 9, "frequent"), (-1.0, True, 1, 11, "frequent")]


@pytest.mark.slow
@pytest.mark.parametrize("shape", ["tiny", "oddvocab", "wide"])
def test_beam_matches_transformers(tmp_path, shape):
    from transformers import GPT2LMHeadModel

    ckpt = make_hf_checkpoint(tmp_path, seed=11, with_tokenizer=False, **SHAPES[shape])
    model, ref = load_model(ckpt), GPT2LMHeadModel.from_pretrained(ckpt).eval()
    tok, vocab = Tokenizer.gpt2(), model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    cases = CASES if shape == "tiny" else CASES[1:3]  # every case once; the other shapes check the model side
    for case, (lp, es, n, new, eos_kind) in enumerate(cases):
        prompt = torch.randint(0, vocab, (3 + 5 * case,), generator=g).tolist()
        x = torch.tensor([prompt])
        mask = torch.ones_like(x)
        with torch.no_grad():
            eos = ref.config.eos_token_id
            if eos_kind == "frequent":
                eos = int(ref.generate(x, attention_mask=mask, max_new_tokens=2, do_sample=False,
                                       pad_token_id=0)[0, -1])
            out = ref.generate(x, attention_mask=mask, max_new_tokens=new, do_sample=False, num_beams=4,
                               num_return_sequences=n, length_penalty=lp, early_stopping=es, eos_token_id=eos,
                               pad_token_id=eos)
        expected = [row[len(prompt):].tolist() for row in out]
        got = beam_search(model, tok, prompt, SamplingParams(num_beams=4, n=n, max_new_tokens=new,
                                                             length_penalty=lp, early_stopping=es),
                          eos_token_id=eos)
        width = len(expected[0])
        assert [c.token_ids + [eos] * (width - len(c.token_ids)) for c in got] == expected, (shape, case)
        for c in got:
            assert c.finish_reason == ("stop" if c.token_ids[-1] == eos and eos_kind else "length")


def test_beam_with_processors_matches_transformers(tmp_path):
    from transformers import GPT2LMHeadModel

    ckpt = make_hf_checkpoint(tmp_path, seed=12, with_tokenizer=False, **SHAPES["tiny"])
    model, ref = load_model(ckpt), GPT2LMHeadModel.from_pretrained(ckpt).eval()
    prompt = [464, 3290, 318, 257, 3290, 286]
    x = torch.tensor([prompt])
    with torch.no_grad():
        out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=12, do_sample=False, num_beams=3,
                           repetition_penalty=1.5, no_repeat_ngram_size=2, pad_token_id=0)
    got = beam_search(model, Tokenizer.gpt2(), prompt,
                      SamplingParams(num_beams=3, max_new_tokens=12, repetition_penalty=1.5, no_repeat_ngram_size=2))
    assert got[0].token_ids == out[0, len(prompt):].tolist()


def test_generator_beam(tiny_checkpoint):
    gen = gpt2lab.load(tiny_checkpoint)
    both = gen.generate(["Hello world", "Once upon a time"], num_beams=4, n=2, max_new_tokens=8, logprobs=1)
    assert [(c.prompt, c.index) for c in both] == [("Hello world", 0), ("Hello world", 1),
                                                    ("Once upon a time", 0), ("Once upon a time", 1)]
    solo = gen.generate("Once upon a time", num_beams=4, n=2, max_new_tokens=8)
    assert [c.token_ids for c in both[2:]] == [c.token_ids for c in solo]
    assert both[0].token_ids != both[1].token_ids
    # logprobs are those of the model for the chosen tokens
    scored = gen.score(gen.encode_prompt("Hello world") + both[0].token_ids)
    assert len(both[0].logprobs) == len(scored) - 1
    assert all(abs(a.logprob - b.logprob) < 1e-4 for a, b in zip(both[0].logprobs, scored[1:]))
    # a stop string cuts the text
    stop = both[0].text[3:6]
    cut = gen.generate("Hello world", num_beams=4, max_new_tokens=8, stop=[stop])[0]
    assert cut.text == both[0].text[:both[0].text.index(stop)] and cut.finish_reason == "stop"


def test_any_finite_length_penalty_ranks_without_overflow(tiny_checkpoint):
    """``score / length ** length_penalty`` overflowed a float at length_penalty 1000 (OverflowError from
    ``2 ** 1000.0``): every finite value now ranks the beams (in log space), and the ranking keeps its
    meaning: a large positive penalty prefers long hypotheses, a large negative one short ones."""
    model, tok = load_model(tiny_checkpoint), Tokenizer.gpt2()
    prompt = tok.encode("ROMEO:")
    for lp in (1000.0, -1000.0, 1e308, -1e308, 5e-324):
        got = beam_search(model, tok, prompt, SamplingParams(num_beams=2, n=2, length_penalty=lp, max_new_tokens=3))
        assert len(got) == 2 and all(c.token_ids for c in got), lp
    from gpt2lab.generation.beam_scorer import _rank_keys

    scores = torch.tensor([-3.0, -1.0, 0.0, 2.0, -float("inf")])
    for lp in (1.0, 1000.0, -1e308):
        keys = _rank_keys(scores, 5, lp)
        assert keys.argsort().tolist() == [4, 0, 1, 2, 3], lp  # the order of the scores themselves
    long, short = _rank_keys(torch.tensor([-50.0]), 40, 1000.0), _rank_keys(torch.tensor([-1.0]), 2, 1000.0)
    assert bool(long > short) and bool(_rank_keys(torch.tensor([-50.0]), 40, -1000.0)
                                       < _rank_keys(torch.tensor([-1.0]), 2, -1000.0))


def test_a_beam_request_that_bans_every_token_fails_instead_of_returning_nothing(tiny_checkpoint):
    """Every token banned (one-token bad words, or two-token ones the prompt starts): an error, like
    greedy and sampled requests, where the beams ended with no tokens and finish_reason "length"."""
    gen = gpt2lab.load(tiny_checkpoint)
    everything = [[t] for t in range(gen.config.vocab_size)]
    with pytest.raises(RuntimeError, match="every token masked"):
        gen.generate("Hello world", num_beams=3, max_new_tokens=4, bad_words_ids=everything)
    # banned after the prompt's last token: every beam is stopped at the first step
    last = gen.encode_prompt("Hello world")[-1]
    with pytest.raises(RuntimeError, match="every token masked"):
        gen.generate("Hello world", num_beams=3, max_new_tokens=4, bad_words_ids=[[last, t] for t in
                                                                                range(gen.config.vocab_size)])


def _result(completions) -> list:
    return [(c.token_ids, c.text, c.finish_reason, [e.logprob for e in c.logprobs or []]) for c in completions]


def test_beams_are_rows_of_the_batch_beside_sampled_requests(gen):
    """Beam requests decode in the same steps as sampled ones (their beams are rows of the batch, moved when
    the rows before them finish) and each request gives what it gives alone: tokens, text and logprobs."""
    sampled = [(p, SamplingParams(temperature=1.0, top_k=20, seed=s, logprobs=2, ignore_eos=True,
                                  max_new_tokens=budget))
               for s, (p, budget) in enumerate([("The king", 3), ("A ship", 14), ("Night", 6), ("Why", 9)])]
    beams = [("Hello world", SamplingParams(num_beams=4, n=2, max_new_tokens=10, logprobs=1, length_penalty=0.5)),
             ("Once upon a time", SamplingParams(num_beams=3, max_new_tokens=12, no_repeat_ngram_size=2,
                                                 repetition_penalty=1.3, stop=["e"]))]
    requests = [sampled[0], beams[0], sampled[1], sampled[2], beams[1], sampled[3]]
    alone = [_result(gen.generate(p, params)) for p, params in requests]
    runner = gen.runner(max_batch=10)
    widths = []
    for i, (p, params) in enumerate(requests[:3]):
        runner.add(gen.encode_prompt(p), params, request_id=str(i))
    for out in runner.outputs():
        widths.append(runner.engine.num_running)
        if out.request_id == "0" and out.finished:  # the others join mid-flight, beams among them
            for i, (p, params) in enumerate(requests[3:], 3):
                runner.add(gen.encode_prompt(p), params, request_id=str(i))
    assert max(widths) >= 1 + 4 + 3  # sampled rows and both beam requests' rows decoded together
    assert [_result(runner.completions(str(i))) for i in range(len(requests))] == alone


def test_a_beam_request_that_fails_or_is_aborted_ends_alone(gen):
    everything = [[t] for t in range(gen.config.vocab_size)]
    sampled = SamplingParams(temperature=1.0, top_k=20, seed=3, logprobs=0, ignore_eos=True, max_new_tokens=12)
    beam = SamplingParams(num_beams=3, n=3, max_new_tokens=10)
    alone_sampled, alone_beam = _result(gen.generate("The sea", sampled)), _result(gen.generate("A ship", beam))
    runner = gen.runner(errors="return")
    runner.add(gen.encode_prompt("The sea"), sampled, request_id="sampled")
    runner.add(gen.encode_prompt("Hi"), beam.with_(bad_words_ids=everything), request_id="banned")
    runner.add(gen.encode_prompt("A ship"), beam, request_id="beam")
    runner.add(gen.encode_prompt("Hello"), beam, request_id="aborted")
    steps = 0
    while runner.has_unfinished():
        runner.step()
        steps += 1
        if steps == 4:
            runner.abort("aborted")
    assert "every token masked" in runner.error("banned")
    assert [c.token_ids for c in runner.completions("aborted")] == [[], [], []]
    assert _result(runner.completions("sampled")) == alone_sampled
    assert _result(runner.completions("beam")) == alone_beam
