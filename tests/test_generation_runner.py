"""The Runner: the one loop that submits requests to an Engine, steps it and collects what comes out."""

from __future__ import annotations

import pytest
import torch

from gpt2lab import runtime
from gpt2lab.errors import GenerationFailed
from gpt2lab.generation import Generator, Runner, max_batch_for
from gpt2lab.sampling import SamplingParams

pytestmark = pytest.mark.usefixtures("one_thread")  # gen: tests/conftest.py

PROMPTS = ["Hello world", "A much longer prompt about cats, dogs and the weather in Paris", "x"]


def _seeded(seed: int, **kw) -> SamplingParams:
    return SamplingParams(**{"temperature": 1.0, "top_k": 20, "seed": seed, "ignore_eos": True, "logprobs": 1,
                             "max_new_tokens": 6, **kw})


def _alone(gen: Generator, prompt: str, params: SamplingParams) -> list:
    return [(c.token_ids, c.text, [e.logprob for e in c.logprobs or []]) for c in gen.generate(prompt, params)]


def _seen(completions) -> list:
    return [(c.token_ids, c.text, [e.logprob for e in c.logprobs or []]) for c in completions]


def test_completions_come_in_index_order_whatever_finishes_first(gen):
    runner = gen.runner(max_batch=4)  # 3 requests x 2 samples: the last queues; they finish r1, r2, r0
    budgets = [9, 2, 5]
    for i, (prompt, budget) in enumerate(zip(PROMPTS, budgets)):
        runner.add(gen.encode_prompt(prompt), _seeded(i, n=2, max_new_tokens=budget), request_id=f"r{i}",
                   prompt=prompt)
    finished_order = []
    runner.run(lambda out: finished_order.append(out.request_id) if out.finished else None)
    assert finished_order == ["r1", "r1", "r2", "r2", "r0", "r0"]
    for i, (prompt, budget) in enumerate(zip(PROMPTS, budgets)):
        got = runner.completions(f"r{i}")
        assert [(c.prompt, c.index, len(c.token_ids)) for c in got] == [(prompt, 0, budget), (prompt, 1, budget)]
        assert _seen(got) == _alone(gen, prompt, _seeded(i, n=2, max_new_tokens=budget))


def test_streamed_deltas_join_to_the_completion(gen):
    runner = gen.runner()
    params = _seeded(3, n=2, max_new_tokens=12, stop=["e"], ignore_eos=False)
    rid = runner.add(gen.encode_prompt("The weather"), params)
    deltas: dict[int, list[str]] = {0: [], 1: []}
    tokens: dict[int, list[int]] = {0: [], 1: []}
    for out in runner.outputs():
        deltas[out.index].append(out.text)
        tokens[out.index] += out.token_ids
    got = runner.completions(rid)
    assert ["".join(deltas[i]) for i in (0, 1)] == [c.text for c in got]
    assert [tokens[i] for i in (0, 1)] == [c.token_ids for c in got]
    assert sum(len(d) > 0 for d in deltas[0]) > 1  # it streamed, in more than one piece
    assert [c.text for c in got] == [c.text for c in gen.generate("The weather", params)]


def test_a_failed_sequence_raises_or_is_returned_and_ends_only_its_request(gen):
    everything = [[t] for t in range(gen.config.vocab_size)]
    banned = SamplingParams(max_new_tokens=4, bad_words_ids=everything, temperature=0)
    good = _seeded(7, max_new_tokens=8)
    raising = gen.runner()
    raising.add(gen.encode_prompt("Hello"), good, request_id="good")
    raising.add(gen.encode_prompt("Hi"), banned, request_id="bad", source="prompt 1")
    with pytest.raises(GenerationFailed, match=r"^generation failed for prompt 1: ValueError: .*every token masked"):
        raising.run()

    returning = gen.runner(errors="return")
    returning.add(gen.encode_prompt("Hello"), good, request_id="good")
    returning.add(gen.encode_prompt("Hi"), banned.with_(n=2), request_id="bad")
    failed: dict[str, str] = {}
    while returning.has_unfinished():
        step = returning.step()
        failed.update(step.failed)
        assert all(out.error is None for out in step.outputs)  # a failed sequence is never an output
    assert list(failed) == ["bad"] and "every token masked" in failed["bad"]
    assert "every token masked" in returning.error("bad") and returning.error("good") is None
    assert [c.finish_reason for c in returning.completions("bad")] == ["error", "error"]
    assert _seen(returning.completions("good")) == _alone(gen, "Hello", good)


def test_abort_a_running_and_a_waiting_request(gen):
    runner = gen.runner(max_batch=2)
    params = _seeded(1, max_new_tokens=10)
    for name in ("a", "b", "waiting", "c"):
        runner.add(gen.encode_prompt("Once upon a time"), params.with_(seed=len(name)), request_id=name)
    seen: dict[str, int] = {}

    def on_output(out) -> None:
        seen[out.request_id] = seen.get(out.request_id, 0) + 1
        if out.request_id == "a" and seen["a"] == 3:
            runner.abort("a")  # running: its row goes to the next request
            runner.abort("waiting")  # never started
    runner.run(on_output)
    assert seen["a"] == 3 and "waiting" not in seen
    assert _seen(runner.completions("b")) == _alone(gen, "Once upon a time", params.with_(seed=1))
    assert _seen(runner.completions("c")) == _alone(gen, "Once upon a time", params.with_(seed=1))
    assert [(len(c.token_ids), c.finish_reason) for c in runner.completions("a")] == [(3, None)]
    runner.add(gen.encode_prompt("x"), params, request_id="a")  # an aborted request's id is free again


def test_requests_added_while_it_runs_give_what_they_give_alone(gen):
    runner = gen.runner(max_batch=3)
    first = _seeded(2, max_new_tokens=12)
    runner.add(gen.encode_prompt(PROMPTS[0]), first, request_id="first")
    added = []
    for out in runner.outputs():
        if len(added) < 2 and out.request_id == "first" and len(out.token_ids):
            name = f"later{len(added)}"
            runner.add(gen.encode_prompt(PROMPTS[1 + len(added)]), _seeded(5 + len(added)), request_id=name)
            added.append(name)
    assert added == ["later0", "later1"]
    assert _seen(runner.completions("first")) == _alone(gen, PROMPTS[0], first)
    for i, name in enumerate(added):
        assert _seen(runner.completions(name)) == _alone(gen, PROMPTS[1 + i], _seeded(5 + i))
    with pytest.raises(ValueError, match="max_new_tokens"):  # refused at once, naming the field; nothing queued
        runner.add(gen.encode_prompt("x"), SamplingParams(max_new_tokens=10_000))
    assert not runner.has_unfinished()


def test_a_request_id_cannot_be_reused_while_it_runs(gen):
    runner = gen.runner()
    runner.add(gen.encode_prompt("x"), _seeded(1), request_id="same")
    with pytest.raises(ValueError, match="request_id 'same' is already running"):
        runner.add(gen.encode_prompt("y"), _seeded(2), request_id="same")
    runner.run()
    runner.add(gen.encode_prompt("y"), _seeded(2), request_id="same")  # finished: the id is free again
    runner.run()
    assert _seen(runner.completions("same")) == _alone(gen, "y", _seeded(2))


def test_run_holds_unchanged_weights_and_outputs_only_per_step(gen):
    held = []
    runner = gen.runner()
    runner.add(gen.encode_prompt("x"), _seeded(1, max_new_tokens=3))
    # the runtime keeps the open unchanged_weights blocks of a model in its own state, outside the model
    runner.run(lambda out: held.append(runtime._state(gen.model).blocks > 0))
    assert held == [True, True, True]
    runner.add(gen.encode_prompt("x"), _seeded(1, max_new_tokens=3))
    assert [runtime._state(gen.model).blocks > 0 for _ in runner.outputs()] == [False, False, False]


def test_batch_size_is_chosen_from_the_device(gen):
    assert max_batch_for("cpu") == 16 and max_batch_for(torch.device("cpu")) == 16
    assert max_batch_for("cuda") == 128 and max_batch_for("cuda:1") == 128  # a device name; no GPU needed
    assert max_batch_for("cpu", at_least=40) == 40 and max_batch_for("cuda", at_least=40) == 128
    assert gen.engine().max_batch == max_batch_for(gen.device) == 16
    assert gen.runner().engine.max_batch == 16 and gen.runner(num_beams=24).engine.max_batch == 24
    assert gen.runner(max_batch=3).engine.max_batch == 3
    # a beam request is num_beams rows: more than the engine holds is refused, naming the field
    with pytest.raises(ValueError, match=r"^num_beams \(5\) is more than the 4 sequences"):
        gen.runner(max_batch=4).add(gen.encode_prompt("x"), SamplingParams(num_beams=5, max_new_tokens=3))
    assert len(gen.generate("x", num_beams=24, n=2, max_new_tokens=3)) == 2  # generate makes room for them
    with pytest.raises(ValueError, match="errors must be 'raise' or 'return'"):
        Runner(gen.engine(), errors="ignore")
