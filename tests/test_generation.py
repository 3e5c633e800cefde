"""Generation: parity with transformers, batching = solo, seeds, stopping, streaming, length limits."""

from __future__ import annotations

import pytest
import torch

import gpt2lab
from gpt2lab.checkpoints import load_model
from gpt2lab.generation import Engine, Generator
from gpt2lab.generation.stopping import StopTextStream
from gpt2lab.sampling import SamplingParams
from gpt2lab.tokenizer import Tokenizer

from .conftest import SHAPES, make_hf_checkpoint

PROMPTS = ["Hello world", "A much longer prompt about cats, dogs and the weather in Paris", "x",
           "Once upon a time"]


pytestmark = pytest.mark.usefixtures("one_thread")


def _hf_greedy(ref, ids: list[int], new: int, **kw) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = ref.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=new, do_sample=False,
                           pad_token_id=ref.config.eos_token_id, **kw)
    return out[0, len(ids):].tolist()


def _engine_run(engine: Engine, requests: list[tuple[list[int], SamplingParams]]) -> list[list[int]]:
    ids = [engine.add_request(p, sp) for p, sp in requests]
    got: dict[str, list[int]] = {i: [] for i in ids}
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.token_ids
    return [got[i] for i in ids]


@pytest.mark.parametrize("shape", ["tiny", "oddvocab", "wide"])
def test_greedy_batch_matches_transformers_solo(tmp_path, shape):
    """A ragged batch through the engine gives, per prompt, exactly HF's greedy tokens for that prompt alone."""
    from transformers import GPT2LMHeadModel

    ckpt = make_hf_checkpoint(tmp_path, seed=7, with_tokenizer=False, **SHAPES[shape])
    model = load_model(ckpt)
    ref = GPT2LMHeadModel.from_pretrained(ckpt).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (5, 17, 1, 30)]
    engine = Engine(model, Tokenizer.gpt2(), max_batch=3)  # 4 requests, 3 rows: one joins mid-flight
    params = SamplingParams(temperature=0, max_new_tokens=24)
    got = _engine_run(engine, [(p, params) for p in prompts])
    for p, tokens in zip(prompts, got):
        assert tokens == _hf_greedy(ref, p, 24)
    assert engine.num_running == 0 and engine.num_waiting == 0


def test_batch_equals_solo_greedy_and_seeded(gen):
    for kw in (dict(temperature=0), dict(temperature=0.9, seed=123)):
        batch = gen.generate(PROMPTS, max_new_tokens=12, **kw)
        for prompt, completion in zip(PROMPTS, batch):
            solo = gen.generate(prompt, max_new_tokens=12, **kw)[0]
            assert completion.token_ids == solo.token_ids and completion.text == solo.text
            assert completion.prompt == prompt and completion.finish_reason == "length"


def test_prefill_in_groups_changes_nothing(gen, monkeypatch):
    """Admissions are prefilled in groups bounded by padded tokens; grouping must not change any output."""
    import gpt2lab.generation.engine as engine_module

    prompts = ["a " * 60, "hello", "b " * 30, "x y"]
    whole = gen.generate(prompts, max_new_tokens=6, temperature=0.9, seed=2, n=2)
    monkeypatch.setattr(engine_module, "_PREFILL_TOKENS", 64)
    assert [c.token_ids for c in gen.generate(prompts, max_new_tokens=6, temperature=0.9, seed=2, n=2)] == \
        [c.token_ids for c in whole]


def test_seed_per_prompt(gen):
    assert gen.generate(["B", "A"], seed=5)[1].text == gen.generate("A", seed=5)[0].text
    assert gen.generate("A", seed=5)[0].token_ids != gen.generate("A", seed=6)[0].token_ids


def test_n_samples_are_distinct_and_reproducible(gen):
    first = gen.generate(["Hi", "Bye"], n=3, seed=9, max_new_tokens=8)
    assert [(c.prompt, c.index) for c in first] == [("Hi", 0), ("Hi", 1), ("Hi", 2), ("Bye", 0), ("Bye", 1),
                                                     ("Bye", 2)]
    assert len({tuple(c.token_ids) for c in first[:3]}) == 3
    assert [c.token_ids for c in gen.generate(["Hi", "Bye"], n=3, seed=9, max_new_tokens=8)] == \
        [c.token_ids for c in first]
    # greedy samples of one prompt share its prefilled cache row: all equal the solo greedy output
    greedy = gen.generate(["Hi", "Bye"], n=3, temperature=0, max_new_tokens=8)
    assert [c.token_ids for c in greedy] == [gen.generate(p, temperature=0, max_new_tokens=8)[0].token_ids
                                             for p in ("Hi", "Bye") for _ in range(3)]
    # sample 0 of n is the request seeded alone
    assert first[0].token_ids == gen.generate("Hi", seed=9, max_new_tokens=8)[0].token_ids


def test_continuous_batching_admits_and_aborts(gen):
    """Requests with different settings share rows, join mid-flight or are aborted: each output is its solo one."""
    settings = [SamplingParams(temperature=0.7, seed=3, max_new_tokens=10),
                SamplingParams(temperature=0, max_new_tokens=7, repetition_penalty=1.3),
                SamplingParams(temperature=1.0, top_k=20, top_p=0.9, seed=4, max_new_tokens=12, stop=["zz"]),
                SamplingParams(temperature=0.9, seed=5, max_new_tokens=9, no_repeat_ngram_size=2, min_p=0.01)]
    params = dict(zip(PROMPTS, settings))
    solo = {p: gen.generate(p, params[p])[0].token_ids for p in PROMPTS}
    engine = gen.engine(max_batch=2)
    doomed = engine.add_request(gen.encode_prompt("doomed"), settings[0].with_(max_new_tokens=50))
    for p in PROMPTS[:3]:
        engine.add_request(gen.encode_prompt(p), params[p], request_id=p)
    got: dict[str, list[int]] = {p: [] for p in PROMPTS}
    steps = 0
    while engine.has_unfinished():
        for out in engine.step():
            assert out.request_id != doomed or steps < 4
            if out.request_id in got:
                got[out.request_id] += out.token_ids
        steps += 1
        if steps == 4:
            assert engine.num_running == 2  # doomed is running in row 0
            engine.abort(doomed)
            engine.add_request(gen.encode_prompt(PROMPTS[3]), params[PROMPTS[3]], request_id=PROMPTS[3])
        assert engine.num_running <= 2
    assert got == solo


def test_stop_strings_across_token_boundaries(gen):
    kw = dict(temperature=1.0, seed=4, max_new_tokens=12)
    full = gen.generate("Hello world", **kw)[0]
    pieces = [gen.tokenizer.decode([t]) for t in full.token_ids]
    # a stop string made of the tail of token i and the head of token i + 1, and a later, longer one
    i = next(i for i in range(2, 8) if len(pieces[i]) >= 3 and len(pieces[i + 1]) >= 3)
    boundary = pieces[i][-2:] + pieces[i + 1][:2]
    later = pieces[i + 2][1:] + pieces[i + 3]
    cut = full.text.index(boundary)
    assert cut == len("".join(pieces[:i])) + len(pieces[i]) - 2, "stop string must first occur at the boundary"
    for stop in ([boundary], [later, boundary]):
        c = gen.generate("Hello world", stop=stop, **kw)[0]
        assert c.text == full.text[:cut] and c.finish_reason == "stop"
        assert c.token_ids == full.token_ids[:i + 2]  # up to the token that completed the stop string
        deltas = list(gen.stream("Hello world", stop=stop, **kw))
        assert "".join(deltas) == c.text
    # a stop string that never completes is released in full at the end
    c = gen.generate("Hello world", stop=[full.text[-3:] + "zzz"], **kw)[0]
    assert c.text == full.text and c.finish_reason == "length"


def test_stop_text_stream_holds_back_prefixes():
    tok = Tokenizer.gpt2()
    ids = tok.encode("The end is near. The end!")
    stream = StopTextStream(tok, ["end!", "near!!"])
    out = []
    for t in ids:
        delta, stopped = stream.push(t)
        out.append(delta)
        # emitted text never ends with a proper prefix of a stop string
        assert not any(s.startswith(stream.text[-k:]) for s in ("end!", "near!!") for k in range(1, 4)
                       if stream.text[-k:])
        if stopped:
            break
    assert "".join(out) == stream.text == "The end is near. The "


def test_streaming_equals_generate_with_emoji_and_cjk(gen):
    tok = gen.tokenizer
    text = "Emoji 🎉🦄 and 日本語の文章, ünïcödé."
    stream = StopTextStream(tok)
    deltas = [stream.push(t)[0] for t in tok.encode(text)] + [stream.flush()]
    assert "".join(deltas) == text and all("\ufffd" not in d for d in deltas)
    for prompt in ("🎉🦄", "日本語の文章"):
        kw = dict(temperature=1.0, seed=11, max_new_tokens=40)
        assert "".join(gen.stream(prompt, **kw)) == gen.generate(prompt, **kw)[0].text


def test_eos_and_stop_token_ids(gen):
    full = gen.generate("Once upon a time", temperature=0, max_new_tokens=10)[0]
    stop_tok = full.token_ids[3]
    first = full.token_ids.index(stop_tok)
    c = gen.generate("Once upon a time", temperature=0, max_new_tokens=10, stop_token_ids=[stop_tok])[0]
    assert c.finish_reason == "stop" and c.token_ids == full.token_ids[:first + 1]
    assert c.text == gen.tokenizer.decode(full.token_ids[:first])
    engine = Engine(gen.model, gen.tokenizer, eos_token_id=stop_tok)
    assert _engine_run(engine, [(gen.encode_prompt("Once upon a time"),
                                 SamplingParams(temperature=0, max_new_tokens=10))])[0] == c.token_ids
    assert _engine_run(engine, [(gen.encode_prompt("Once upon a time"),
                                 SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True))])[0] == \
        full.token_ids


def test_length_limits_and_context(gen):
    ids = gen.encode_prompt("Hello world")  # 2 tokens
    assert len(gen.generate("Hello world", max_length=7)[0].token_ids) == 5
    assert gen.generate("Hello world", max_new_tokens=0)[0].token_ids == []
    with pytest.raises(ValueError, match="max_length"):
        gen.generate("Hello world", max_length=1)
    long_prompt = " ".join(["word"] * 120)  # 120 tokens; tiny model context is 128
    assert len(gen.tokenizer.encode(long_prompt)) == 120
    with pytest.raises(ValueError, match=r"120 tokens.*140.*n_positions=128"):
        gen.generate(long_prompt, max_new_tokens=20)
    with pytest.raises(ValueError, match="n_positions=128"):
        gen.generate("Hello", max_new_tokens=200, truncate_prompt=True)
    truncated = gen.generate(long_prompt, max_new_tokens=20, truncate_prompt=True, temperature=0)[0]
    kept = gen.tokenizer.encode(long_prompt)[-108:]
    engine = gen.engine()
    assert truncated.token_ids == _engine_run(engine, [(kept, SamplingParams(temperature=0, max_new_tokens=20))])[0]
    assert len(ids) == 2 and gen.generate("", max_new_tokens=3)[0].token_ids  # empty prompt starts from EOS


def test_logprobs_and_score(gen):
    c = gen.generate("Hello world", temperature=0, max_new_tokens=6, logprobs=3)[0]
    assert len(c.logprobs) == 6
    prompt = gen.encode_prompt("Hello world")
    scored = gen.score(prompt + c.token_ids, top_n=3)
    assert len(scored) == len(prompt) + 6 - 1
    for lp, ref in zip(c.logprobs, scored[len(prompt) - 1:]):
        assert lp.token_id == ref.token_id and lp.token == gen.tokenizer.id_to_token(lp.token_id)
        assert abs(lp.logprob - ref.logprob) < 1e-4
        assert len(lp.top) == 3 and lp.top[0][0] == lp.token_id  # greedy picks the top token
        assert [t for t, _, _ in lp.top] == [t for t, _, _ in ref.top]
    assert gen.generate("Hello world", max_new_tokens=2)[0].logprobs is None


def test_bad_values_raise(gen):
    with pytest.raises(ValueError, match="temperature"):
        gen.generate("Hi", temperature=-1)
    with pytest.raises(TypeError, match="unknown generation parameter"):
        gen.generate("Hi", temprature=1)
    with pytest.raises(ValueError, match="n and num_beams"):
        list(gen.stream("Hi", n=2))


def test_generate_text(tiny_checkpoint):
    gen = gpt2lab.load(tiny_checkpoint)
    text = gen.generate_text("Hello", max_length=10, seed=1)
    assert text.startswith("Hello") and len(gen.tokenizer.encode(text)) >= 2
    assert gpt2lab.generate_text("Hello", max_length=10, seed=1, model=str(tiny_checkpoint)) == text


def test_padded_vocabulary_is_never_sampled():
    """Checkpoints with embedding rows past the tokenizer (vocab padded to 50304) never emit those ids."""
    from gpt2lab.model import GPT2, GPT2Config

    model = GPT2(GPT2Config(vocab_size=50304, n_layer=1, n_embd=32, n_head=2, n_positions=64))
    model.init_weights(0)
    with torch.no_grad():
        model.wte.weight[50257:] = 5.0  # the padding rows would win every argmax
    gen = Generator(model, Tokenizer.gpt2())
    for kw in (dict(temperature=0), dict(temperature=1.0, seed=0), dict(num_beams=2)):
        assert max(gen.generate("hi", max_new_tokens=5, **kw)[0].token_ids) < 50257


def test_cache_grows_while_sequences_run():
    """A request needing more rows and more slots than the cache has joins without disturbing running rows."""
    from gpt2lab.model import GPT2, GPT2Config

    model = GPT2(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=600))
    model.init_weights(1)
    tok = Tokenizer.gpt2()
    short = SamplingParams(temperature=0, max_new_tokens=12)
    long_prompt = list(range(1000, 1300))
    engine = Engine(model, tok, max_batch=4)
    engine.add_request([464, 3290], short, request_id="a")
    got: dict[str, list[int]] = {"a": [], "b": []}
    for _ in range(3):
        for out in engine.step():
            got[out.request_id] += out.token_ids
    assert (model.max_batch, model.max_seq) == (1, 256)
    engine.add_request(long_prompt, short, request_id="b")
    while engine.has_unfinished():
        for out in engine.step():
            got[out.request_id] += out.token_ids
    assert (model.max_batch, model.max_seq) == (2, 512)
    assert got["a"] == _engine_run(Engine(model, tok), [([464, 3290], short)])[0]
    assert got["b"] == _engine_run(Engine(model, tok), [(long_prompt, short)])[0]
