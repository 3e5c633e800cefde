"""What clients of OpenAI, vLLM and llama.cpp depend on, against a real ``gpt2lab serve``.

1. Requests those servers accept are accepted, with their meaning: OpenAI's schema field by field (the
   ``openai`` package's ``types/completion_create_params.py`` and ``types/chat/``: nullability, ranges,
   the smallest message sets) and vLLM's extra request options.
2. The model-independent cases of the peers' own server suites, written anew for gpt2lab (each names its
   upstream file and case). Upstream cases that need a trained model (they match the text of a
   particular checkpoint) are kept for what they check of the API's shape; cases that need a feature
   gpt2lab lacks are listed at the end as not applicable, with the reason.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

openai = pytest.importorskip("openai")

EOS = 50256
HELLO = 18435  # " Hello"
USER = [{"role": "user", "content": "Hello there!"}]


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def _events(server, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{server.url}{path}", json={**body, "stream": True}, timeout=120) as r:
        assert r.status_code == 200, r.read()
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(line[6:]) for line in lines[:-1]]


# == 1. OpenAI's schema and vLLM's options ===============================================================
def test_completion_prompt_null_is_a_new_document(server):
    """completion_create_params: ``prompt: Required[Union[str, ..., None]]``: "if a prompt is not specified
    the model will generate as if from the beginning of a new document"."""
    none = _post(server, "/v1/completions", {"prompt": None, "max_tokens": 4, "temperature": 0})
    empty = _post(server, "/v1/completions", {"prompt": "", "max_tokens": 4, "temperature": 0})
    assert none.status_code == 200, none.text
    assert none.json()["choices"][0]["text"] == empty.json()["choices"][0]["text"]
    assert none.json()["usage"]["prompt_tokens"] == 1  # <|endoftext|>
    assert _post(server, "/v1/completions", {"prompt": "x", "suffix": "", "max_tokens": 1}).status_code == 200


def test_int64_seeds_are_taken(server, model, client):
    """OpenAI's ``seed`` is any integer (int64); vLLM bounds it by torch.long (its test_long_seed)."""
    a = client.completions.create(model=model, prompt="Once", max_tokens=6, seed=-7, temperature=1.0)
    b = client.completions.create(model=model, prompt="Once", max_tokens=6, seed=-7, temperature=1.0)
    c = client.completions.create(model=model, prompt="Once", max_tokens=6, seed=7, temperature=1.0)
    assert a.choices[0].text == b.choices[0].text and len({a.choices[0].text, c.choices[0].text}) == 2
    for seed in (-2**63, 2**63 - 1):
        assert client.completions.create(model=model, prompt="x", max_tokens=1, seed=seed).choices
    for seed in (-2**63 - 1, 2**63):
        with pytest.raises(openai.BadRequestError, match="seed"):
            client.completions.create(model=model, prompt="x", max_tokens=1, seed=seed)


def test_best_of_returns_the_n_best(server, model, client):
    """``best_of``: "Generates best_of completions server-side and returns the best (the one with the highest
    log probability per token)"; not streamable; best_of >= n."""
    def mean(lp) -> float:
        return sum(lp.token_logprobs) / len(lp.token_logprobs)

    everyone = client.completions.create(model=model, prompt="The sea", max_tokens=6, n=5, seed=3, logprobs=0,
                                         temperature=1.0)
    best = client.completions.create(model=model, prompt="The sea", max_tokens=6, n=2, best_of=5, seed=3,
                                     logprobs=0, temperature=1.0)
    ranked = sorted(everyone.choices, key=lambda c: -mean(c.logprobs))
    assert [c.text for c in best.choices] == [c.text for c in ranked[:2]]
    assert [c.index for c in best.choices] == [0, 1]
    assert best.usage.completion_tokens == everyone.usage.completion_tokens  # every candidate was generated
    quiet = client.completions.create(model=model, prompt="The sea", max_tokens=6, n=2, best_of=5, seed=3,
                                      temperature=1.0)
    assert [c.text for c in quiet.choices] == [c.text for c in ranked[:2]] and quiet.choices[0].logprobs is None
    for bad in (dict(n=3, best_of=2), dict(best_of=3, stream=True)):
        with pytest.raises(openai.BadRequestError, match="best_of"):
            client.completions.create(model=model, prompt="x", max_tokens=2, **bad)


def test_chat_minimum_message_sets(server, model, client):
    """OpenAI answers any non-empty list of messages: a system message alone, a conversation ending with the
    assistant, the older ``function`` role (a tool result by name), content parts with their optional keys."""
    alone = client.chat.completions.create(model=model, messages=[{"role": "system", "content": "Be brief."}],
                                           max_tokens=4, temperature=0)
    assert alone.choices[0].finish_reason in ("stop", "length") and alone.usage.prompt_tokens > 3
    ending = client.chat.completions.create(model=model, max_tokens=4, temperature=0, messages=[
        *USER, {"role": "assistant", "content": "Hi!"}])
    assert ending.choices[0].message.role == "assistant"
    function = _post(server, "/v1/chat/completions", {"max_tokens": 2, "temperature": 0, "messages": [
        *USER, {"role": "function", "name": "lookup", "content": "42"}]})
    tool = _post(server, "/v1/chat/completions", {"max_tokens": 2, "temperature": 0, "messages": [
        *USER, {"role": "tool", "tool_call_id": "c1", "content": "42"}]})
    assert function.status_code == 200 and function.json()["usage"] == tool.json()["usage"]
    parts = _post(server, "/v1/chat/completions", {"max_tokens": 2, "temperature": 0, "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hello there!",
                                      "prompt_cache_breakpoint": {"mode": "explicit"}}]}]})
    assert parts.status_code == 200 and parts.json()["usage"] == _post(server, "/v1/chat/completions", {
        "max_tokens": 2, "temperature": 0, "messages": USER}).json()["usage"]


def test_chat_fields_accepted_with_their_meaning(server, model, client):
    base = client.chat.completions.create(model=model, messages=USER, max_tokens=5, temperature=0)
    accepted = dict(audio=None, functions=[], function_call="none", prediction={"type": "content", "content": "x"},
                    reasoning_effort="low", verbosity="low", web_search_options=None, prompt_cache_retention="24h",
                    extra_body={"prompt_cache_options": {"mode": "implicit"}, "moderation": None,
                                "spaces_between_special_tokens": True, "add_special_tokens": False, "priority": 0})
    same = client.chat.completions.create(model=model, messages=USER, max_tokens=5, temperature=0, **accepted)
    assert same.choices[0].message.content == base.choices[0].message.content
    assert same.system_fingerprint == base.system_fingerprint and base.system_fingerprint.startswith("gpt2lab-")
    # both lengths: max_completion_tokens wins (vLLM)
    both = client.chat.completions.create(model=model, messages=USER, max_tokens=2, max_completion_tokens=5,
                                          temperature=0, extra_body={"ignore_eos": True})
    assert both.usage.completion_tokens == 5
    for name, value in (("audio", {"voice": "alloy", "format": "wav"}), ("functions", [{"name": "f"}]),
                        ("function_call", {"name": "f"}), ("web_search_options", {}), ("priority", 1),
                        ("chat_template", "{{ messages }}"), ("chat_template_kwargs", {"enable_thinking": True})):
        r = _post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 1, name: value})
        assert r.status_code == 400 and r.json()["error"]["param"] == name, (name, r.text)


def test_vllm_chat_echo_and_continuing_the_last_message(server, model, client):
    start = [*USER, {"role": "assistant", "content": "Well, I"}]
    cont = client.chat.completions.create(model=model, messages=start, max_tokens=4, temperature=0, extra_body={
        "continue_final_message": True, "add_generation_prompt": False, "logit_bias": {str(HELLO): 100}})
    assert cont.choices[0].message.content == " Hello Hello Hello Hello"  # the message goes on, its space kept
    echoed = client.chat.completions.create(model=model, messages=start, max_tokens=4, temperature=0, extra_body={
        "continue_final_message": True, "add_generation_prompt": False, "echo": True,
        "logit_bias": {str(HELLO): 100}})
    assert echoed.choices[0].message.content == "Well, I Hello Hello Hello Hello"
    chunks = _events(server, "/v1/chat/completions", {"messages": start, "max_tokens": 4, "temperature": 0,
                                                      "continue_final_message": True, "add_generation_prompt": False,
                                                      "echo": True, "logit_bias": {str(HELLO): 100}})
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == echoed.choices[0].message.content
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": "Well, I"}
    r = _post(server, "/v1/chat/completions", {"messages": USER, "continue_final_message": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "continue_final_message"


def test_vllm_request_options(server, model, client):
    named = client.completions.create(model=model, prompt="Hi", max_tokens=2, extra_body={"request_id": "abc-1"})
    assert named.id == "cmpl-abc-1"
    chat = client.chat.completions.create(model=model, messages=USER, max_tokens=2, extra_body={"request_id": "q"})
    assert chat.id == "chatcmpl-q"
    ids = client.completions.create(model=model, prompt="Hi", max_tokens=3, logprobs=1, temperature=0,
                                    extra_body={"return_tokens_as_token_ids": True})
    plain = client.completions.create(model=model, prompt="Hi", max_tokens=3, logprobs=1, temperature=0)
    tokens = ids.choices[0].logprobs.tokens
    assert len(tokens) == len(plain.choices[0].logprobs.tokens) and all(t.startswith("token_id:") for t in tokens)
    decoded = httpx.post(f"{server.url}/detokenize", json={"tokens": [int(t.split(":")[1]) for t in tokens]})
    assert decoded.json()["prompt"] == plain.choices[0].text == ids.choices[0].text
    assert all(k.startswith("token_id:") for top in ids.choices[0].logprobs.top_logprobs for k in top)
    lp = client.chat.completions.create(model=model, messages=USER, max_tokens=3, logprobs=True, top_logprobs=2,
                                        temperature=0, extra_body={"return_tokens_as_token_ids": True})
    assert all(e.token.startswith("token_id:") and all(t.token.startswith("token_id:") for t in e.top_logprobs)
               for e in lp.choices[0].logprobs.content)


def test_vllm_continuous_usage_stats(server):
    """vLLM's test_completion_stream_options / test_chat_completion_stream_options: with include_usage and
    continuous_usage_stats every chunk carries the usage so far; the last one the total."""
    for path, body in (("/v1/completions", {"prompt": "Hi"}), ("/v1/chat/completions", {"messages": USER})):
        chunks = _events(server, path, {**body, "max_tokens": 4, "temperature": 0, "ignore_eos": True,
                                        "stream_options": {"include_usage": True, "continuous_usage_stats": True}})
        with_choices = [c for c in chunks if c["choices"]]
        assert all(c["usage"] is not None for c in with_choices), path
        done = [c["usage"]["completion_tokens"] for c in with_choices]
        assert done == sorted(done) and chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 4
        plain = _events(server, path, {**body, "max_tokens": 4, "temperature": 0,
                                       "stream_options": {"include_usage": True}})
        assert all(c.get("usage") is None for c in plain if c["choices"])


# == 2. The peers' server suites ============================================================================
# -- vLLM tests/entrypoints/openai/test_completion.py -----------------------------------------------------
def test_vllm_single_completion(server, model, client):  # test_single_completion
    out = client.completions.create(model=model, prompt="Hello, my name is", max_tokens=5, temperature=0.0,
                                    logit_bias={str(EOS): -100})
    assert out.id and len(out.choices) == 1 and out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 5 and out.usage.prompt_tokens == 5 and out.usage.total_tokens == 10
    ids = client.completions.create(model=model, prompt=[0, 0, 0, 0, 0], max_tokens=5, temperature=0.0)
    assert len(ids.choices[0].text) >= 1 and ids.choices[0].prompt_logprobs is None


def test_vllm_no_zero_and_some_logprobs(model, client):  # test_no_logprobs, test_zero_logprobs, test_some_logprobs
    assert client.completions.create(model=model, prompt="Hi", max_tokens=5, temperature=0.0).choices[0].logprobs \
        is None
    zero = client.completions.create(model=model, prompt="Hi", max_tokens=5, temperature=0.0, logprobs=0)
    lp = zero.choices[0].logprobs
    assert lp.token_logprobs is not None and lp.top_logprobs is not None and len(lp.top_logprobs[0]) == 1
    some = client.completions.create(model=model, prompt="Hi", max_tokens=5, temperature=0.0, logprobs=5)
    assert all(5 <= len(top) <= 6 for top in some.choices[0].logprobs.top_logprobs)


def test_vllm_too_many_completion_logprobs(model, client):  # test_too_many_completion_logprobs
    for stream in (False, True):
        with pytest.raises(openai.BadRequestError):
            client.completions.create(model=model, prompt="Hi", max_tokens=5, logprobs=21, stream=stream)
    assert len(client.completions.create(model=model, prompt="Hi", max_tokens=5, logprobs=20)
               .choices[0].logprobs.top_logprobs[0]) >= 20


def test_vllm_prompt_logprobs_completion(model, client):  # test_prompt_logprobs_completion
    for k in (0, 1, 5):
        out = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=2,
                                        extra_body={"prompt_logprobs": k})
        entries = out.choices[0].prompt_logprobs
        assert entries[0] is None and len(entries) == 4
        assert all(1 <= len(e) <= k + 1 for e in entries[1:])
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="x", max_tokens=1, extra_body={"prompt_logprobs": 21})


def test_vllm_completion_streaming(model, client):  # test_completion_streaming
    single = client.completions.create(model=model, prompt="What is an LLM?", max_tokens=5, temperature=0.0)
    chunks = list(client.completions.create(model=model, prompt="What is an LLM?", max_tokens=5, temperature=0.0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == single.choices[0].text
    assert chunks[-1].choices[0].finish_reason == single.choices[0].finish_reason


def test_vllm_parallel_sampling(model, client):  # test_parallel_no_streaming, test_parallel_streaming
    out = client.completions.create(model=model, prompt="What is an LLM?", max_tokens=16, n=3, temperature=1.0,
                                    seed=0)
    texts = [c.text for c in out.choices]
    assert len(texts) == 3 and len(set(texts)) > 1  # each sample its own
    streamed = [""] * 3
    for chunk in client.completions.create(model=model, prompt="What is an LLM?", max_tokens=16, n=3,
                                           temperature=1.0, seed=0, stream=True):
        streamed[chunk.choices[0].index] += chunk.choices[0].text
    assert streamed == texts


def test_vllm_completion_stream_options(model, client):  # test_completion_stream_options
    chunks = list(client.completions.create(model=model, prompt="Hi", max_tokens=5, temperature=0.0, stream=True,
                                            stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens == chunks[-1].usage.prompt_tokens + chunks[-1].usage.completion_tokens
    off = list(client.completions.create(model=model, prompt="Hi", max_tokens=5, stream=True,
                                         stream_options={"include_usage": False}))
    assert all(c.usage is None for c in off)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=model, prompt="Hi", max_tokens=5, stream=False,
                                  stream_options={"include_usage": True})


def test_vllm_batch_completions(model, client):  # test_batch_completions
    out = client.completions.create(model=model, prompt=["Hello, my name is"] * 2, max_tokens=5, temperature=0.0)
    assert len(out.choices) == 2 and out.choices[0].text == out.choices[1].text
    texts = ["", ""]
    for chunk in client.completions.create(model=model, prompt=["Hello, my name is"] * 2, max_tokens=5,
                                           temperature=0.0, stream=True):
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert texts == [out.choices[0].text] * 2


def test_vllm_logits_bias(model, client):  # test_logits_bias
    out = client.completions.create(model=model, prompt="Hello", max_tokens=5, temperature=0.0,
                                    logit_bias={str(HELLO): 100}, seed=42)
    assert out.choices[0].text == " Hello" * 5
    first = client.completions.create(model=model, prompt="Hello", max_tokens=1, temperature=0.0, logprobs=0,
                                      extra_body={"return_tokens_as_token_ids": True})
    first_id = int(first.choices[0].logprobs.tokens[0].split(":")[1])
    banned = client.completions.create(model=model, prompt="Hello", max_tokens=1, temperature=0.0, logprobs=0,
                                       logit_bias={str(first_id): -100},
                                       extra_body={"return_tokens_as_token_ids": True})
    assert banned.choices[0].logprobs.tokens[0] != f"token_id:{first_id}"


@pytest.mark.parametrize("logprobs", [None, 0, 1])
def test_vllm_echo_logprob_completion(model, client, logprobs):  # test_echo_logprob_completion
    prompt = "Hello, my name is"
    out = client.completions.create(model=model, prompt=prompt, max_tokens=5, echo=True, logprobs=logprobs)
    assert out.choices[0].text.startswith(prompt)
    if logprobs is None:
        assert out.choices[0].logprobs is None
    else:
        lp = out.choices[0].logprobs
        assert len(lp.token_logprobs) > 5 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
        assert all(len(top) <= logprobs + 1 for top in lp.top_logprobs[1:])
        assert len(lp.tokens) > 5


# -- vLLM tests/entrypoints/openai/test_chat.py ----------------------------------------------------------
def test_vllm_chat_logprobs(model, client):  # test_no_logprobs_chat, test_zero_logprobs_chat, test_some_logprobs_chat
    none = client.chat.completions.create(model=model, messages=USER, max_completion_tokens=5, temperature=0.0,
                                          logprobs=False)
    assert none.choices[0].logprobs is None
    zero = client.chat.completions.create(model=model, messages=USER, max_completion_tokens=5, temperature=0.0,
                                          logprobs=True, top_logprobs=0)
    assert zero.choices[0].logprobs.content and all(len(e.top_logprobs) == 0 for e in zero.choices[0].logprobs.content)
    some = client.chat.completions.create(model=model, messages=USER, max_completion_tokens=5, temperature=0.0,
                                          logprobs=True, top_logprobs=5)
    assert all(len(e.top_logprobs) == 5 for e in some.choices[0].logprobs.content)


def test_vllm_too_many_chat_logprobs(model, client):  # test_too_many_chat_logprobs
    for stream in (False, True):
        with pytest.raises((openai.BadRequestError, openai.APIError)):
            client.chat.completions.create(model=model, messages=USER, max_completion_tokens=5, logprobs=True,
                                           top_logprobs=21, stream=stream)
    ok = client.chat.completions.create(model=model, messages=USER, max_completion_tokens=5, logprobs=True,
                                        top_logprobs=20)
    assert all(len(e.top_logprobs) == 20 for e in ok.choices[0].logprobs.content)


def test_vllm_single_chat_session(model, client):  # test_single_chat_session
    messages = [{"role": "system", "content": "you are a helpful assistant"},
                {"role": "user", "content": "what is 1+1?"}]
    out = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=10, logprobs=True,
                                         top_logprobs=5, extra_body={"ignore_eos": True, "min_tokens": 10})
    choice = out.choices[0]
    assert out.id and len(out.choices) == 1 and choice.finish_reason == "length"
    assert out.usage.completion_tokens == 10
    assert choice.message.role == "assistant" and len(choice.logprobs.content[0].top_logprobs) == 5
    messages.append({"role": "assistant", "content": choice.message.content})
    messages.append({"role": "user", "content": "express your result in json"})
    again = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=10)
    assert again.choices[0].message.content is not None


def test_vllm_chat_streaming(model, client):  # test_chat_streaming
    messages = [{"role": "system", "content": "you are a helpful assistant"},
                {"role": "user", "content": "what is 1+1?"}]
    out = client.chat.completions.create(model=model, messages=messages, max_completion_tokens=10, temperature=0.0)
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_completion_tokens=10,
                                                 temperature=0.0, stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in chunks[1:])
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == out.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == out.choices[0].finish_reason


def test_vllm_chat_completion_stream_options(model, client):  # test_chat_completion_stream_options
    chunks = list(client.chat.completions.create(model=model, messages=USER, max_completion_tokens=5,
                                                 temperature=0.0, stream=True, stream_options={"include_usage": True}))
    assert all(c.usage is None for c in chunks[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=USER, max_completion_tokens=5, stream=False,
                                       stream_options={"include_usage": True})


def test_vllm_complex_message_content(model, client):  # test_complex_message_content
    parts = [{"type": "text", "text": "what is 1+1? please provide the result without any other text."}]
    out = client.chat.completions.create(model=model, messages=[{"role": "user", "content": parts}],
                                         max_completion_tokens=5, temperature=0.0)
    same = client.chat.completions.create(model=model, messages=[{"role": "user", "content": parts[0]["text"]}],
                                          max_completion_tokens=5, temperature=0.0)
    assert out.choices[0].message.content == same.choices[0].message.content


def test_vllm_long_seed(model, client):  # test_long_seed
    for seed in (-2**63 - 1, 2**63):
        with pytest.raises(openai.BadRequestError, match="seed"):
            client.chat.completions.create(model=model, messages=USER, max_completion_tokens=2, seed=seed)


def test_vllm_chat_without_a_model_name(server):  # test_http_chat_no_model_name_with_curl
    r = _post(server, "/v1/chat/completions", {"messages": USER, "max_tokens": 3})
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["role"] == "assistant"


# -- llama.cpp tools/server/tests/unit/test_completion.py -------------------------------------------------
def test_llamacpp_completion_with_openai_library(model, client):  # test_completion_with_openai_library
    out = client.completions.create(model=model, prompt="I believe the meaning of life is", max_tokens=8, seed=42,
                                    temperature=0.8, logit_bias={str(EOS): -100})
    assert out.system_fingerprint and out.choices[0].finish_reason == "length" and out.choices[0].text


def test_llamacpp_completion_stream_vs_non_stream(model, client):  # test_completion_stream_vs_non_stream
    args = dict(model=model, prompt="I believe the meaning of life is", max_tokens=8, seed=42, temperature=0.8)
    whole = client.completions.create(**args)
    parts = list(client.completions.create(**args, stream=True))
    assert "".join(p.choices[0].text for p in parts) == whole.choices[0].text
    assert [p.choices[0].finish_reason for p in parts if p.choices[0].finish_reason] == [whole.choices[0].finish_reason]


def test_llamacpp_seeds(model, client):  # test_consistent_result_same_seed, test_different_result_different_seed
    args = dict(model=model, prompt="I believe the meaning of life is", max_tokens=8, temperature=1.0)
    same = {client.completions.create(**args, seed=42).choices[0].text for _ in range(3)}
    assert len(same) == 1
    assert len({client.completions.create(**args, seed=s).choices[0].text for s in (1, 2, 3, 4)}) > 1


def test_llamacpp_consistent_result_different_batch_size(server, model):  # test_consistent_result_different_batch_size
    """The same seeded request gives the same text alone or among others in the batch."""
    body = {"prompt": "I believe the meaning of life is", "max_tokens": 8, "temperature": 1.0, "seed": 42}

    async def run(k: int) -> list[str]:
        async with httpx.AsyncClient(timeout=120) as c:
            rs = await asyncio.gather(*[c.post(f"{server.url}/v1/completions", json=body) for _ in range(k)])
        return [r.json()["choices"][0]["text"] for r in rs]

    alone = asyncio.run(run(1))
    assert asyncio.run(run(4)) == alone * 4


def test_llamacpp_completion_with_tokens_input(model, client, server):  # test_completion_with_tokens_input
    prompt = "I believe the meaning of life is"
    tokens = httpx.post(f"{server.url}/tokenize", json={"prompt": prompt}).json()["tokens"]
    as_text = client.completions.create(model=model, prompt=prompt, max_tokens=5, temperature=0)
    as_ids = client.completions.create(model=model, prompt=tokens, max_tokens=5, temperature=0)
    assert as_ids.choices[0].text == as_text.choices[0].text
    batch = client.completions.create(model=model, prompt=[tokens, tokens], max_tokens=5, temperature=0)
    assert [c.text for c in batch.choices] == [as_text.choices[0].text] * 2


def test_llamacpp_n_probs(model, client):  # test_n_probs (native n_probs: OpenAI's logprobs here)
    out = client.completions.create(model=model, prompt="I believe the meaning of life is", max_tokens=5,
                                    temperature=0, logprobs=10, logit_bias={str(EOS): -100})
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == 5
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and 10 <= len(top) <= 11 and all(v <= 0 for v in top.values()) and token in top


# -- llama.cpp tools/server/tests/unit/test_chat_completion.py -------------------------------------------
def test_llamacpp_chat_completion(model, client):  # test_chat_completion
    out = client.chat.completions.create(model=model, max_tokens=8, messages=[
        {"role": "system", "content": "Book"}, {"role": "user", "content": "What is the best book"}],
        extra_body={"ignore_eos": True, "min_tokens": 8})
    assert out.choices[0].finish_reason == "length" and out.usage.completion_tokens == 8
    assert out.choices[0].message.role == "assistant" and out.usage.prompt_tokens > 0


def test_llamacpp_chat_completion_stream(model, client):  # test_chat_completion_stream
    content, finishes = "", []
    chunks = list(client.chat.completions.create(model=model, max_tokens=8, stream=True, messages=[
        {"role": "system", "content": "Book"}, {"role": "user", "content": "What is the best book"}]))
    for i, chunk in enumerate(chunks):
        choice = chunk.choices[0]
        assert (choice.delta.role == "assistant") == (i == 0)  # the role only in the first chunk
        content += choice.delta.content or ""
        finishes.append(choice.finish_reason)
    assert [f for f in finishes if f] == [finishes[-1]] and finishes[-1] in ("stop", "length")
    assert chunks[-1].id == chunks[0].id


@pytest.mark.parametrize("messages", [
    "a string", [{"role": "system", "content": 123}], [{"content": "hello"}], [{"role": "system", "content": [{}]}],
    [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}], [],
])
def test_llamacpp_invalid_chat_completion_req(server, messages):  # test_invalid_chat_completion_req
    r = _post(server, "/v1/chat/completions", {"messages": messages})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text


def test_llamacpp_logprobs(model, client):  # test_logprobs
    out = client.chat.completions.create(model=model, temperature=0.0, max_tokens=5, logprobs=True, top_logprobs=10,
                                         messages=[{"role": "system", "content": "Book"},
                                                   {"role": "user", "content": "What is the best book"}])
    aggregated = ""
    for token in out.choices[0].logprobs.content:
        aggregated += token.token
        assert token.logprob <= 0.0 and token.bytes is not None and len(token.top_logprobs) > 0
    assert aggregated == out.choices[0].message.content


def test_llamacpp_logprobs_stream(model, client):  # test_logprobs_stream
    output, aggregated = "", ""
    for i, chunk in enumerate(client.chat.completions.create(
            model=model, temperature=0.0, max_tokens=5, logprobs=True, top_logprobs=10, stream=True,
            messages=[{"role": "system", "content": "Book"}, {"role": "user", "content": "What is the best book"}])):
        choice = chunk.choices[0]
        if i == 0:
            continue  # the role
        output += choice.delta.content or ""
        for token in choice.logprobs.content:
            aggregated += token.token
            assert token.logprob <= 0.0 and token.bytes is not None and len(token.top_logprobs) > 0
    assert aggregated == output


def test_llamacpp_logit_bias(model, client):  # test_logit_bias
    out = client.chat.completions.create(model=model, max_tokens=5, temperature=0, messages=USER,
                                         logit_bias={str(HELLO): 100})
    assert out.choices[0].message.content == "Hello Hello Hello Hello Hello"
    greedy = client.chat.completions.create(model=model, max_tokens=5, temperature=0, messages=USER, logprobs=True,
                                            extra_body={"return_tokens_as_token_ids": True})
    chosen = [e.token for e in greedy.choices[0].logprobs.content]
    banned = client.chat.completions.create(model=model, max_tokens=5, temperature=0, messages=USER, logprobs=True,
                                            logit_bias={t.split(":")[1]: -100 for t in chosen},
                                            extra_body={"return_tokens_as_token_ids": True})
    assert not set(chosen) & {e.token for e in banned.choices[0].logprobs.content}


def test_llamacpp_context_size_exceeded(server):  # test_context_size_exceeded
    r = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Book " * 200}],
                                               "max_tokens": 8})
    error = r.json()["error"]
    assert r.status_code == 400 and error["code"] == "context_length_exceeded" and "context" in error["message"]


# == Not applicable: the upstream cases not ported, and why =============================================
# - vLLM test_completion.py test_allowed_token_ids: allowed_token_ids is not a feature of gpt2lab's server.
#   test_guided_*, test_response_format_json*: structured outputs are tested in test_server_structured.py.
# - vLLM test_completion.py test_completion_with_prompt_embeds: prompt embeddings are not accepted.
# - vLLM test_completion.py / test_chat.py test_invocations: SageMaker's /invocations route does not exist.
# - vLLM test_chat.py test_custom_role: the roles are OpenAI's (system, developer, user, assistant, tool,
#   function); gpt2lab's layouts know no others, so another role is a 400 naming it.
# - vLLM test_chat.py test_extra_fields_allowed: an unknown field is a 400 naming it (a misspelt parameter
#   is never ignored), where vLLM logs a warning.
# - vLLM test_chat.py test_named_tool_use, test_required_tool_use: GPT-2 cannot call tools: a 400 naming the
#   field. test_response_format_*: structured outputs are tested in test_server_structured.py.
# - vLLM test_chat.py test_http_chat_no_model_name_with_openai: the openai client always sends a model name;
#   the request without one is ported above (test_vllm_chat_without_a_model_name).
# - llama.cpp test_completion.py test_completion (native /completion with n_predict), test_cache_vs_nocache_prompt,
#   test_nocache_long_input_prompt, test_completion_parallel_slots, test_n_probs_post_sampling,
#   test_cancel_request: llama.cpp's native endpoint, prompt cache, slots and n_probs options; their
#   OpenAI-endpoint equivalents are ported above.
# - llama.cpp test_completion.py test_completion_with_tokens_input's mixed prompt (token lists and strings in
#   one list): OpenAI's schema has lists of strings or lists of token lists, not both.
# - llama.cpp test_chat_completion.py test_chat_completion_with_openai_library (model="gpt-3.5-turbo"): another
#   model name is 400 model_not_found, as OpenAI and vLLM refuse it; llama.cpp serves any name.
# - llama.cpp test_chat_completion.py test_chat_template, test_apply_chat_template,
#   test_completion_with_response_format, test_chat_completion_with_timings_per_token, test_return_progress:
#   server-side --chat-template names, /apply-template, JSON schemas and llama.cpp's timings fields.
