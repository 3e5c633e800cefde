"""vLLM's sampling parameters in the library: min_tokens, include_stop_str_in_output, skip_special_tokens,
truncate_prompt_tokens, prompt_logprobs, top_k=-1; logprobs that end with the text; beam search inside the
batching engine."""

from __future__ import annotations

import pytest
import torch

from gpt2lab.generation.stopping import SequenceText, StopTextStream
from gpt2lab.sampling import SamplingParams

EOS = 50256
pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: a second thread costs more than it gives


def test_params_validation_and_vllm_top_k():
    assert SamplingParams(top_k=-1).top_k == 0
    for kwargs, name in [({"top_k": -2}, "top_k"), ({"min_tokens": -1}, "min_tokens"),
                         ({"min_tokens": 5, "max_new_tokens": 4}, "min_tokens"),
                         ({"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
                         ({"prompt_logprobs": 21}, "prompt_logprobs"),
                         ({"skip_special_tokens": "no"}, "skip_special_tokens"),
                         ({"include_stop_str_in_output": 1}, "include_stop_str_in_output")]:
        with pytest.raises(ValueError, match=name):
            SamplingParams(**kwargs)


def test_min_new_tokens_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from gpt2lab.sampling import MinTokens

    scores = torch.randn(2, 50)
    ids = torch.tensor([[1, 2, 3, 4], [5, 6, 7, 8]])
    ours = MinTokens([3, 3], [[7], [7]])(scores, ids.tolist(), [2, 2])
    theirs = transformers.MinNewTokensLengthLogitsProcessor(prompt_length_to_skip=2, min_new_tokens=3,
                                                            eos_token_id=7)(ids, scores.clone())
    assert torch.equal(ours, theirs)
    assert torch.equal(MinTokens([2, 0], [[7], [7]])(scores, ids.tolist(), [2, 2]), scores)  # 2 new: done


def test_stop_text_stream_include_stop_and_min_tokens(gen):
    tok = gen.tokenizer
    ids = tok.encode("Hello world. Goodbye world.")
    stream = StopTextStream(tok, ["world"], include_stop=True)
    text = "".join(stream.push(t)[0] for t in ids)
    assert text == "Hello world" and stream.stopped
    # before min_tokens, a stop string passes; the first completed afterwards stops
    seq = SequenceText(tok, SamplingParams(stop=["world"], min_tokens=3), EOS)
    out, reason = "", None
    for t in ids:
        delta, _, reason = seq.push(t)
        out += delta
        if reason:
            break
    assert out == "Hello world. Goodbye " and reason == "stop"


def test_sequence_text_drops_logprobs_after_the_cut(gen):
    tok = gen.tokenizer
    ids = tok.encode(" one two three four")  # " one", " two", " three", " four"
    lps = gen.score([EOS, *ids])
    seq = SequenceText(tok, SamplingParams(stop=["o th"]), EOS)  # starts inside " two", ends inside " three"
    text, kept = "", []
    for t, lp in zip(ids, lps):
        delta, released, reason = seq.push(t, lp)
        text, kept = text + delta, kept + released
        if reason:
            break
    assert text == " one tw"
    assert [e.token for e in kept] == [" one", " two"]  # " three" starts after the cut: dropped


def test_end_controls_in_generate(gen):
    eos_first = dict(temperature=0, max_new_tokens=6, logit_bias={EOS: 100})
    assert gen.generate("Hi", **eos_first)[0].token_ids == [EOS]
    c = gen.generate("Hi", **eos_first, min_tokens=2)[0]
    assert len(c.token_ids) == 3 and c.token_ids[-1] == EOS and EOS not in c.token_ids[:2]
    assert gen.generate("Hi", **eos_first, ignore_eos=True)[0].text == ""
    assert gen.generate("Hi", **eos_first, ignore_eos=True, skip_special_tokens=False)[0].text == "<|endoftext|>" * 6
    assert gen.generate("Hi", **eos_first, include_stop_str_in_output=True,
                        skip_special_tokens=False)[0].text == "<|endoftext|>"


def test_truncate_prompt_tokens_and_prompt_logprobs(gen):
    prompt = "one two three four five six"
    ids = gen.tokenizer.encode(prompt)
    c = gen.generate(prompt, temperature=0, max_new_tokens=4, truncate_prompt_tokens=3, prompt_logprobs=1)[0]
    tail = gen.tokenizer.decode(ids[-3:])
    assert c.text == gen.generate(tail, temperature=0, max_new_tokens=4)[0].text
    expected = gen.score(ids[-3:], top_n=1)
    assert [e.token_id for e in c.prompt_logprobs] == ids[-2:]
    assert [e.logprob for e in c.prompt_logprobs] == pytest.approx([e.logprob for e in expected], abs=1e-5)
    assert [e.rank for e in c.prompt_logprobs] == [e.rank for e in expected]
    assert all(e.rank >= 1 and e.top[0][2] >= e.logprob for e in c.prompt_logprobs)
    # -1: the model's context; the whole (short) prompt stays
    assert gen.generate(prompt, temperature=0, max_new_tokens=4, truncate_prompt_tokens=-1)[0].text == \
        gen.generate(prompt, temperature=0, max_new_tokens=4)[0].text


def test_a_beam_request_joining_the_batch_keeps_running_rows(gen):
    long = SamplingParams(temperature=0, max_new_tokens=30, logit_bias={EOS: -100}, logprobs=0)
    alone = gen.generate("Meanwhile", params=long)[0]
    beam = SamplingParams(num_beams=3, n=3, max_new_tokens=8)
    expected = [c.text for c in gen.generate("It was a dark night", params=beam)]

    engine = gen.engine(max_batch=4)
    engine.add_request(gen.encode_prompt("Meanwhile"), long, request_id="long")
    texts: dict[tuple[str, int], str] = {}
    logprobs = []
    steps = 0
    while engine.has_unfinished():
        if steps == 5:  # mid-generation: the beams take rows beside the running request and decode with it
            engine.add_request(gen.encode_prompt("It was a dark night"), beam, request_id="beam")
        for out in engine.step():
            texts[(out.request_id, out.index)] = texts.get((out.request_id, out.index), "") + out.text
            logprobs += out.logprobs if out.request_id == "long" else []
        steps += 1
    assert texts[("long", 0)] == alone.text
    assert [e.logprob for e in logprobs] == pytest.approx([e.logprob for e in alone.logprobs], abs=1e-5)
    assert [texts[("beam", i)] for i in range(3)] == expected


def test_prompt_logprobs_come_from_the_prefill_for_every_kind_of_request(gen):
    """Prompt logprobs are computed by the request's own prefill (they were a separate forward inside
    add_request, on the engine thread, stalling every running stream): the same values as ``score``, for each
    sample of n, for beams, with the prompt's prefix already cached, and beside requests that do not ask."""
    from gpt2lab.generation.prefix_cache import PrefixCache

    prompt = "It was the best of times, it was the worst of times, it was the age of wisdom"
    ids = gen.tokenizer.encode(prompt)
    expected = gen.score(ids, top_n=2)
    saved = gen.prefix_cache
    gen.prefix_cache = PrefixCache(16 << 20, block_size=4)
    try:
        gen.generate(prompt, max_new_tokens=2, seed=0)  # the prompt's prefix is now cached
        runner = gen.runner()
        engine = runner.engine
        before, forwards = engine.prefill_tokens, []
        hook = gen.model.register_forward_pre_hook(lambda module, args: forwards.append(1))  # PyTorch forwards
        try:
            runner.add(ids, SamplingParams(max_new_tokens=3, seed=1, n=2, prompt_logprobs=2), request_id="n2")
        finally:
            hook.remove()
        assert engine.prefill_tokens == before and forwards == []  # adding it did no model work
        runner.add(ids, SamplingParams(max_new_tokens=3, num_beams=2, prompt_logprobs=2), request_id="beams")
        runner.add(ids, SamplingParams(max_new_tokens=3, seed=1), request_id="plain")
        runner.run()
        for rid, count in (("n2", 2), ("beams", 1)):
            completions = runner.completions(rid)
            assert len(completions) >= count
            for c in completions:
                assert [e.token_id for e in c.prompt_logprobs] == ids[1:]
                assert [e.logprob for e in c.prompt_logprobs] == pytest.approx([e.logprob for e in expected], abs=1e-4)
                assert [e.rank for e in c.prompt_logprobs] == [e.rank for e in expected]
                assert [[t[0] for t in e.top] for e in c.prompt_logprobs] == [[t[0] for t in e.top] for e in expected]
        (plain,) = runner.completions("plain")
        assert plain.prompt_logprobs is None
        # the plain request's tokens are what it gives alone (the other prefill kept all logits, it did not)
        assert plain.token_ids == gen.generate(prompt, max_new_tokens=3, seed=1)[0].token_ids
    finally:
        gen.prefix_cache = saved
