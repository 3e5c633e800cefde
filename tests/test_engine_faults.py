"""One request's fault ends only that request (issue 13, kind 1), in the library's batching engine.

Admission: every field checkable against the model is checked by ``Engine.add_request`` before any
work (``ValueError`` naming it). Defence in depth: a fault that slips past admission ends only the
sequence at fault (``finish_reason="error"``); the others of the batch give the tokens they give alone.
"""

from __future__ import annotations

import pytest
import torch

from gpt2lab.generation import Engine
from gpt2lab.model import GPT2, GPT2Config
from gpt2lab.sampling import SamplingParams
from gpt2lab.tokenizer import Tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def _run(engine: Engine, requests: list[tuple[list[int], SamplingParams]], after_add=None) -> dict:
    """Tokens and last output of each (request, sample); ``after_add(engine)`` runs once all are queued."""
    ids = [engine.add_request(p, sp, request_id=f"r{i}") for i, (p, sp) in enumerate(requests)]
    if after_add is not None:
        after_add(engine)
    got: dict = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens, _ = got.get((out.request_id, out.index), ([], None))
            got[(out.request_id, out.index)] = (tokens + out.token_ids, out)
    assert {key[0] for key in got} == set(ids)
    return got


@pytest.mark.parametrize("prompt, kwargs, field", [
    ([15496, 50257], {}, "prompt"),
    ([15496, -1], {}, "prompt"),
    ([15496], {"logit_bias": {50257: 5.0}}, "logit_bias"),
    ([15496], {"stop_token_ids": [10**9]}, "stop_token_ids"),
    ([15496] * 120, {"max_new_tokens": 20}, "prompt"),
    ([15496], {"max_length": 500}, "prompt"),
])
def test_admission_checks_name_the_field_before_any_work(gen, prompt, kwargs, field):
    engine = gen.engine(max_batch=4)
    with pytest.raises(ValueError) as info:
        engine.add_request(prompt, SamplingParams(**kwargs))
    assert str(info.value).startswith(field), info.value
    assert not engine.has_unfinished()
    with pytest.raises(ValueError, match=f"^{field}"):  # the same check, callable on its own
        engine.check_request(prompt, SamplingParams(**kwargs))


def test_bad_words_outside_a_small_vocabulary_are_refused_at_admission():
    """A model whose vocabulary is smaller than its tokenizer's: a bad word encoding to an id past it."""
    model = GPT2(GPT2Config(vocab_size=1000, n_layer=1, n_embd=32, n_head=2, n_positions=64))
    model.init_weights(0)
    engine = Engine(model, Tokenizer.gpt2(), max_batch=2)
    with pytest.raises(ValueError, match="^bad_words holds 'elephant'"):
        engine.add_request([10, 11], SamplingParams(bad_words=["elephant"]))
    assert not engine.has_unfinished()


def _seeded(seed: int, **kw) -> SamplingParams:
    return SamplingParams(max_new_tokens=12, temperature=1.0, top_k=40, seed=seed, **kw)


def test_a_fault_inside_the_step_ends_only_its_request(gen):
    """A request whose params go bad after admission (the caller mutates them) fails alone; the batch
    goes on and every other sequence gives exactly the tokens it gives alone."""
    good = [([15496, 995], _seeded(1)), ([464, 3797], _seeded(2, n=2)), ([40], SamplingParams(max_new_tokens=12,
                                                                                               temperature=0))]
    alone = {}
    for i, (prompt, params) in enumerate(good):
        for (_rid, index), (tokens, _) in _run(gen.engine(max_batch=1), [(prompt, params)]).items():
            alone[(f"r{i}", index)] = tokens
    bad_params = _seeded(9)

    def corrupt(engine: Engine) -> None:
        bad_params.logit_bias[50257 + 7] = 3.0  # past the vocabulary: the logits pipeline raises on it

    got = _run(gen.engine(max_batch=8), [good[0], (([1212], bad_params)), good[1], good[2]], after_add=corrupt)
    tokens, last = got[("r1", 0)]
    assert last.finished and last.finish_reason == "error" and "logit_bias" in last.error
    for key, want in alone.items():
        rid = f"r{int(key[0][1:]) + (key[0] != 'r0')}"  # the bad request sits at r1
        tokens, last = got[(rid, key[1])]
        assert tokens == want, key
        assert last.finish_reason in ("stop", "length") and last.error is None


@pytest.mark.parametrize("banned", [SamplingParams(max_new_tokens=6, temperature=0),
                                    SamplingParams(max_new_tokens=6, top_k=5, seed=3, logprobs=2)])
def test_a_request_that_bans_every_token_ends_alone_greedy_or_sampled(gen, banned):
    """bad_words_ids that ban the whole vocabulary: the request ends with an error, never a banned token (a
    greedy one generated token 0 each step), and the batch's other rows give the tokens they give alone."""
    banned.bad_words_ids = [[t] for t in range(gen.config.vocab_size)]
    others = [([15496, 995], _seeded(1)), ([40], SamplingParams(max_new_tokens=6, temperature=0, logprobs=1))]
    alone = [_run(gen.engine(max_batch=1), [r])[("r0", 0)][0] for r in others]
    got = _run(gen.engine(max_batch=4), [others[0], ([464, 3797], banned), others[1]])
    tokens, last = got[("r1", 0)]
    assert tokens == [] and last.finish_reason == "error" and "every token masked" in last.error
    assert [got[("r0", 0)][0], got[("r2", 0)][0]] == alone
    with pytest.raises(RuntimeError, match="every token masked"):
        gen.generate("Hello", banned)


def test_a_fault_in_a_prefill_ends_only_that_prompt(gen):
    """A prompt that breaks the model's forward (an id past the embedding, put there after admission):
    the prefill is retried one prompt at a time and only that prompt ends with an error."""
    good = ([15496, 995], _seeded(4))
    want = _run(gen.engine(max_batch=1), [good])[("r0", 0)][0]

    def corrupt(engine: Engine) -> None:
        engine._waiting[1].prompt_ids.append(10**6)  # noqa: SLF001 - simulates a fault admission missed

    got = _run(gen.engine(max_batch=4), [good, ([1212, 318], _seeded(5))], after_add=corrupt)
    assert got[("r1", 0)][1].finish_reason == "error"
    assert got[("r0", 0)][0] == want


def test_generate_raises_when_its_request_faults(gen):
    params = _seeded(3)
    params.logit_bias[10**6] = 1.0  # bypasses SamplingParams' own check (a dict mutated in place)
    with pytest.raises((ValueError, RuntimeError), match="logit_bias"):
        gen.generate("Hi", params)


def test_sample_draws_nothing_when_it_raises():
    """A sampling call that fails consumes no random numbers: a row retried alone draws as it would have."""
    from gpt2lab.sampling import sample

    g = torch.Generator().manual_seed(5)
    bad = torch.full((2, 10), float("-inf"))
    bad[0, 3] = 0.0
    params = [SamplingParams(seed=5), SamplingParams(seed=6)]
    with pytest.raises(ValueError):
        sample(bad, params, [g, None])
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(5).get_state())
    with pytest.raises(ValueError, match="every token masked"):  # the fully masked row is a greedy one
        sample(bad, [SamplingParams(seed=5), SamplingParams(temperature=0)], [g, None])
    assert torch.equal(g.get_state(), torch.Generator().manual_seed(5).get_state())
