"""The server's serving classes without HTTP (vLLM's ``OpenAIServing*`` layout): a parsed request in, the
response object, the server-sent events or the ``APIError`` out, on a real engine thread and the tiny model."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

pytest.importorskip("fastapi")

from gpt2lab.server import protocol as p  # noqa: E402
from gpt2lab.server.state import ServerState  # noqa: E402

NAME = "tiny-served"
HELLO = [{"role": "user", "content": "Hello!"}]


def _start(state: ServerState) -> ServerState:
    state.scheduler.start()
    assert state.scheduler.ready.wait(120) and state.scheduler.load_error is None
    return state


@pytest.fixture(scope="module")
def run():
    """``run(coroutine)`` on one event loop for the whole module, as a server has one: the engine thread
    hands a request's outputs to the loop it came from, so that loop outlives the engine thread."""
    loop = asyncio.new_event_loop()
    yield loop.run_until_complete
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()


@pytest.fixture(scope="module")
def state(gen, run):
    """A started server, without HTTP, on this module's Generator: 2 running and 1 waiting sequence at most."""
    state = _start(ServerState.create(gen, max_batch=2, max_queue=1, model_name=NAME))
    yield state
    state.close()


def completion(run, state: ServerState, **fields):
    return run(state.completion.create_completion(p.CompletionRequest.model_validate(fields)))


def chat(run, state: ServerState, **fields):
    return run(state.chat.create_chat_completion(p.ChatCompletionRequest.model_validate(fields)))


def events(run, method, request) -> list[str]:
    """The server-sent events a streaming request gives, read to the end."""
    async def read() -> list[str]:
        stream = await method(request)
        assert not isinstance(stream, p.APIError), stream.body()
        return [event async for event in stream]

    return run(read())


def chunks(sse: list[str]) -> list[dict]:
    assert sse[-1] == "data: [DONE]\n\n"
    assert all(e.startswith("data: ") and e.endswith("\n\n") for e in sse)
    return [json.loads(e[len("data: "):]) for e in sse[:-1]]


def sample(state: ServerState, name: str, model: str = NAME, **labels: str) -> float:
    """A metric of the served model ``model`` (its ``model`` label, and ``labels``)."""
    return state.metrics.registry.get_sample_value(name, {"model": model, **labels}) or 0.0


# -- completions ---------------------------------------------------------------------------------------
def test_completion_request_in_response_object_out(state, run):
    out = completion(run, state, prompt="Hello world", max_tokens=5, temperature=0)
    assert isinstance(out, p.CompletionResponse)
    assert out.model == NAME and out.id.startswith("cmpl-")
    (choice,) = out.choices
    expected = run(state.scheduler.call(
        lambda g: g.generate("Hello world", max_new_tokens=5, temperature=0)[0]))
    assert (choice.index, choice.text, choice.finish_reason) == (0, expected.text, expected.finish_reason)
    done = len(expected.token_ids)
    assert out.usage == p.Usage(prompt_tokens=2, completion_tokens=done, total_tokens=2 + done)  # "Hello world": 2


def test_streamed_completion_is_the_whole_one_in_events(state, run):
    fields = dict(prompt=["The cat", "A dog"], max_tokens=6, seed=3, temperature=1.0, logprobs=1)
    whole = completion(run, state, **fields)
    request = p.CompletionRequest.model_validate({**fields, "stream": True, "stream_options": {"include_usage": True}})
    *steps, usage = chunks(events(run, state.completion.create_completion, request))
    assert usage["choices"] == [] and usage["usage"] == whole.usage.model_dump()
    for choice in whole.choices:
        mine = [c["choices"][0] for c in steps if c["choices"][0]["index"] == choice.index]
        assert "".join(c["text"] for c in mine) == choice.text
        assert [t for c in mine for t in c["logprobs"]["tokens"]] == choice.logprobs.tokens
        assert mine[-1]["finish_reason"] == choice.finish_reason
    assert {c["object"] for c in steps} == {"text_completion"}


@pytest.mark.parametrize("fields, param, code", [
    ({"prompt": "x", "temperature": -1}, "temperature", None),
    ({"prompt": "x", "suffix": "y"}, "suffix", None),
    ({"prompt": [50257]}, "prompt", None),
    ({"prompt": "x", "max_tokens": 200}, "max_tokens", "context_length_exceeded"),
    ({"prompt": "x", "n": 4}, "n", None),  # more sequences than max_batch + max_queue
    ({"prompt": "x", "stop": ["a"] * 17}, "stop", "limit_exceeded"),
])
def test_bad_request_in_error_object_out(state, fields, param, code, run):
    err = completion(run, state, **fields)
    assert isinstance(err, p.APIError) and err.status == 400
    assert err.body() == {"error": {"message": err.message, "type": "invalid_request_error", "param": param,
                                    "code": code}}


def test_unknown_model_is_404_model_not_found_in_openai_shape(state, run):
    for request in (completion, chat):
        err = request(run, state, model="gpt-4", **({"prompt": "x"} if request is completion else {"messages": HELLO}))
        assert isinstance(err, p.APIError) and err.status == 404, err
        assert err.body() == {"error": {"message": err.message, "type": "invalid_request_error", "param": "model",
                                        "code": "model_not_found"}}
        assert "'gpt-4'" in err.message and repr(NAME) in err.message  # what was asked, and what is served


def test_full_server_answers_429_with_retry_after(state, run):
    rejected = sample(state, "gpt2lab_rejected_requests_total")
    assert state.scheduler.reserve(state.scheduler.capacity)
    try:
        err = completion(run, state, prompt="x", max_tokens=2)
    finally:
        state.scheduler.release(state.scheduler.capacity)
    assert isinstance(err, p.APIError)
    assert (err.status, err.type, err.code) == (429, "rate_limit_error", "queue_full")
    assert err.headers == {"Retry-After": "1"}
    assert sample(state, "gpt2lab_rejected_requests_total") == rejected + 1
    assert isinstance(completion(run, state, prompt="x", max_tokens=2), p.CompletionResponse)  # room again


def test_request_timeout_is_408_and_gives_the_capacity_back(gen, state, run):
    # a deadline already past when the first output could come: the request ends at its first check
    late = _start(ServerState.create(gen, max_batch=2, max_queue=0, request_timeout=1e-6))
    try:
        err = completion(run, late, prompt="x", max_tokens=20)
        assert isinstance(err, p.APIError) and (err.status, err.code) == (408, "request_timeout")
        request = p.CompletionRequest(prompt="x", max_tokens=20, stream=True)
        sse = events(run, late.completion.create_completion, request)
        assert [c["error"]["code"] for c in chunks(sse)] == ["request_timeout"]  # one error event, then [DONE]

        def timeouts() -> float:
            return sample(late, "gpt2lab_aborted_requests_total", gen.name, reason="timeout")

        # the stream's request is closed by the loop once the events stopped, and the engine thread gives its
        # capacity back once it has seen the abort: both a moment later
        deadline = time.monotonic() + 30
        while (timeouts() != 2 or sample(late, "gpt2lab_in_flight_sequences", gen.name)) \
                and time.monotonic() < deadline:
            run(asyncio.sleep(0.05))
        assert timeouts() == 2 and sample(late, "gpt2lab_in_flight_sequences", gen.name) == 0
    finally:
        late.close()


# -- chat completions ------------------------------------------------------------------------------------
def test_chat_request_in_response_object_out(state, run):
    out = chat(run, state, messages=HELLO, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2)
    assert isinstance(out, p.ChatCompletionResponse)
    assert out.model == NAME and out.id.startswith("chatcmpl-")
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.finish_reason in ("stop", "length")
    assert len(choice.logprobs.content) == out.usage.completion_tokens > 0
    assert all(len(token.top_logprobs) >= 2 for token in choice.logprobs.content)


def test_streamed_chat_opens_with_the_role(state, run):
    request = p.ChatCompletionRequest.model_validate({"messages": HELLO, "max_tokens": 3, "n": 2, "stream": True})
    steps = chunks(events(run, state.chat.create_chat_completion, request))
    assert [c["choices"][0]["delta"] for c in steps[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert {c["object"] for c in steps} == {"chat.completion.chunk"}
    assert sorted(c["choices"][0]["index"] for c in steps if c["choices"][0]["finish_reason"]) == [0, 1]


@pytest.mark.parametrize("fields, param", [
    ({"messages": HELLO, "top_logprobs": 2}, "top_logprobs"),
    ({"messages": HELLO, "max_tokens": 3, "max_completion_tokens": 5000}, "max_completion_tokens"),
    ({"messages": HELLO, "functions": [{"name": "f"}]}, "functions"),
    ({"messages": HELLO, "tools": [{"type": "function"}]}, "tools"),
])
def test_bad_chat_request_in_error_object_out(state, fields, param, run):
    err = chat(run, state, **fields)
    assert isinstance(err, p.APIError) and (err.status, err.param) == (400, param)


# -- models, tokenizer, health ---------------------------------------------------------------------------
def test_models_list_and_retrieve(state, run):
    models = run(state.models.show_available_models())
    assert isinstance(models, p.ModelList)
    (card,) = models.data
    assert (card.id, card.max_model_len) == (NAME, 128)
    assert run(state.models.retrieve_model(NAME)) == card
    err = run(state.models.retrieve_model("gpt-4"))
    assert isinstance(err, p.APIError) and (err.status, err.code) == (404, "model_not_found")


def test_tokenize_and_detokenize(state, run):
    tokens = run(state.tokenization.create_tokenize(p.TokenizeRequest(prompt="Hello world")))
    assert tokens == p.TokenizeResponse(tokens=[15496, 995], count=2, max_model_len=128)
    text = run(state.tokenization.create_detokenize(p.DetokenizeRequest(tokens=[15496, 995])))
    assert text == p.DetokenizeResponse(prompt="Hello world")
    err = run(state.tokenization.create_detokenize(p.DetokenizeRequest(tokens=[1, 70000])))
    assert isinstance(err, p.APIError) and (err.status, err.param) == (400, "tokens")


def test_health_and_models_while_loading_then_serving(gen, state, run):
    loading = ServerState.create(gen)  # never started: its model is not loaded
    report = loading.health.check_health()
    assert (report.status_code, report.headers) == (503, {"Retry-After": "1"})
    assert report.body == {"status": "loading", "models": {gen.name: {"status": "loading"}}}
    err = run(loading.models.show_available_models())
    assert isinstance(err, p.APIError) and (err.status, err.code, err.headers) == (503, "model_loading",
                                                                                  {"Retry-After": "1"})
    report = state.health.check_health()
    assert report.status_code == 200
    assert report.body == {"status": "ok", "model": NAME, "engine_failures": 0, "request_failures": 0,
                           "models": {NAME: {"status": "ok", "engine_failures": 0, "request_failures": 0,
                                             "adapters": []}}}


@pytest.mark.parametrize("kwargs, name", [({"max_batch": 0}, "max_batch"), ({"max_batch": True}, "max_batch"),
                                          ({"max_queue": -1}, "max_queue"),
                                          ({"request_timeout": 0}, "request_timeout")])
def test_bad_server_arguments_name_themselves(gen, kwargs, name):
    with pytest.raises(ValueError, match=f"^{name} must be"):
        ServerState.create(gen, **kwargs)


@pytest.mark.parametrize("field, value", [("max_batch", 0), ("max_batch", 1025), ("max_batch", 10**8),
                                          ("max_batch", True), ("max_queue", -1), ("max_queue", 10**9)])
def test_batch_and_queue_sizes_are_bounded_and_named(gen, field, value):
    """Every running row holds a full-length KV-cache row: an unbounded --max-batch let a burst of clients take
    all memory (10**8 was accepted)."""
    with pytest.raises(ValueError, match=rf"{field} must be an integer in \[\d+, \d+\], got {value!r}"):
        ServerState.create(gen, **{field: value})


def test_serve_names_an_out_of_range_max_batch_in_one_line(tiny_checkpoint):
    import subprocess
    import sys

    from .server_helpers import _env

    out = subprocess.run([sys.executable, "-m", "gpt2lab", "serve", "--model", str(tiny_checkpoint), "--max-batch",
                          "5000"], capture_output=True, text=True, env=_env(), timeout=120)
    assert out.returncode != 0
    assert "--max-batch must be an integer in [1, 1024], got 5000" in out.stderr, out.stderr
    assert "Traceback" not in out.stderr
