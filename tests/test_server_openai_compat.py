"""OpenAI- and vLLM-client compatibility of ``gpt2lab serve``: real servers on loopback ports, driven by the
real ``openai`` client, LangChain's OpenAI wrappers and plain HTTP, checked against the library."""

from __future__ import annotations

import subprocess
import sys

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")

from .server_helpers import Server, _env, get, launch  # noqa: E402

pytestmark = pytest.mark.slow
EOS = 50256
APP_ORIGIN = "http://app.example:3000"


@pytest.fixture(scope="module")
def cors_server(tmp_path_factory, tiny_checkpoint, server) -> Server:
    launch("cors", tiny_checkpoint, tmp_path_factory.mktemp("cors-logs"), "--cors-allow-origin", APP_ORIGIN,
           "--cors-allow-origin", "https://other.example")
    return get("cors")


@pytest.fixture(scope="module")
def generator(tiny_checkpoint):
    from gpt2lab.generation import load
    from gpt2lab.model import optimize_for_inference

    gen = load(str(tiny_checkpoint))
    optimize_for_inference(gen.model)  # as the server does: the same arithmetic, so the same greedy tokens
    return gen


def _post(server: Server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def _error(r: httpx.Response) -> dict:
    assert r.status_code == 400, r.text
    return r.json()["error"]


# -- OpenAI request fields -------------------------------------------------------------------------
def test_openai_client_sends_back_model_dump_and_ignored_fields(model, client):
    ignored = dict(metadata={"team": "a"}, store=False, user="u1", service_tier="auto", parallel_tool_calls=False,
                   safety_identifier="s", prompt_cache_key="k", response_format={"type": "text"},
                   modalities=["text"], tool_choice="none", seed=3)
    first = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello!"}],
                                           max_tokens=6, temperature=0, **ignored)
    reply = first.choices[0].message.model_dump()
    assert {"refusal", "annotations", "audio", "function_call", "tool_calls"} <= set(reply)  # sent back as is
    messages = [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hello!"}, reply,
                {"role": "user", "content": "And then?", "name": "ann"}]
    again = client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0, **ignored)
    plain = client.chat.completions.create(model=model, max_tokens=6, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello!"},
        {"role": "assistant", "content": reply["content"]}, {"role": "user", "content": "And then?"}])
    # the ignored fields and the extra message keys change nothing; developer = system
    assert again.choices[0].message.content == plain.choices[0].message.content
    assert again.usage.prompt_tokens == plain.usage.prompt_tokens
    assert again.choices[0].message.refusal is None and again.choices[0].message.annotations == []
    # streaming with OpenAI's stream options, obfuscation included
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True,
                                                                              "include_obfuscation": False}))
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == again.choices[0].message.content
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == again.usage.completion_tokens


def test_tool_messages_are_laid_out(model, server, generator):
    from gpt2lab.generation import chat_format

    messages = [{"role": "user", "content": "What is 6 x 7?"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "mul", "arguments": "{}"}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": "42"}]
    r = _post(server, "/v1/chat/completions", {"model": model, "messages": messages, "max_tokens": 3,
                                               "prompt_logprobs": 0})
    assert r.status_code == 200, r.text
    style = chat_format.style_for_model(generator.name, generator.path)
    expected = chat_format.render(None, [chat_format.Turn("user", "What is 6 x 7?"), chat_format.Turn("assistant", ""),
                                         chat_format.Turn("user", "Tool result: 42")], style)
    ids = generator.tokenizer.encode(expected)
    body = r.json()
    assert body["usage"]["prompt_tokens"] == len(ids)
    # the prompt the model saw, token by token (vLLM's prompt_logprobs carry the token ids)
    assert [int(next(iter(e))) for e in body["prompt_logprobs"][1:]] == ids[1:]


@pytest.mark.parametrize("path, body, param, words", [
    ("/v1/chat/completions", {"response_format": {"type": "xml"}}, "response_format", "json_object"),
    ("/v1/chat/completions", {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "response_format", "json_schema"),
    ("/v1/chat/completions", {"stream_options": {"include_usage": True}}, "stream_options", "stream"),
    ("/v1/completions", {"stream_options": {"include_usage": True}, "stream": False}, "stream_options", "stream"),
    ("/v1/chat/completions", {"metadeta": {"a": "b"}}, "metadeta", "unknown"),
    ("/v1/chat/completions", {"stream_options": {"include_usage": True, "include_obfuscaton": True},
                              "stream": True}, "stream_options.include_obfuscaton", "unknown"),
    ("/v1/chat/completions", {"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools", "tools"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs", "[0, 20]"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": -1}, "top_logprobs", "[0, 20]"),
    ("/v1/chat/completions", {"max_completion_tokens": -1}, "max_completion_tokens", "max_completion_tokens"),
    ("/v1/completions", {"prompt_logprobs": 1, "stream": True}, "prompt_logprobs", "stream"),
    ("/v1/completions", {"min_tokens": 20, "max_tokens": 5}, "min_tokens", "max_new_tokens"),
    ("/v1/completions", {"truncate_prompt_tokens": 0}, "truncate_prompt_tokens", "-1"),
    ("/v1/completions", {"stop_token_ids": [60000]}, "stop_token_ids", "vocabulary"),
    ("/v1/completions", {"use_beam_search": True, "n": 100}, "n", "64"),
])
def test_unsupported_or_bad_fields_are_400_naming_them(server, path, body, param, words):
    base = {"prompt": "x"} if path == "/v1/completions" else {"messages": [{"role": "user", "content": "x"}]}
    error = _error(_post(server, path, {**base, **body}))
    assert error["param"] == param, error
    assert words in error["message"], error


def test_message_fields_errors_name_the_exact_place(server):
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y", "refusl": None}]
    assert _error(_post(server, "/v1/chat/completions", {"messages": messages}))["param"] == "messages[1].refusl"
    messages = [{"role": "user", "content": [{"type": "text", "txt": "x"}]}]
    assert _error(_post(server, "/v1/chat/completions", {"messages": messages}))["param"].startswith(
        "messages[0].content")


def test_models_retrieve(server, client, model):
    card = client.models.retrieve(model)
    assert card.id == model and card.object == "model"
    with pytest.raises(openai.NotFoundError) as info:
        client.models.retrieve("gpt-4o")
    error = info.value.body if "message" in info.value.body else info.value.body["error"]
    assert error["code"] == "model_not_found" and "gpt-4o" in error["message"]


# -- logprobs --------------------------------------------------------------------------------------
def test_top_logprobs_follow_each_apis_rule(model, client):
    """Legacy completions: the k most likely plus the sampled token (OpenAI: "up to logprobs+1"; vLLM's
    completions the same). Chat: exactly the k most likely (OpenAI's top_logprobs; vLLM's test_chat asserts
    exactly k), the sampled token or not; top_logprobs 0 gives []."""
    out = client.completions.create(model=model, prompt="Zebra", max_tokens=24, temperature=3.0, seed=4, logprobs=1)
    lp = out.choices[0].logprobs
    assert all(token in top and top[token] == chosen and len(top) <= 2
               for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs))
    assert any(len(top) == 2 for top in lp.top_logprobs)  # at temperature 3, some draws are not the top token
    zero = client.completions.create(model=model, prompt="Zebra", max_tokens=4, temperature=0, logprobs=0)
    assert all(list(top) == [t] for t, top in zip(zero.choices[0].logprobs.tokens,
                                                  zero.choices[0].logprobs.top_logprobs))
    for k in (1, 3):
        chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Zebra"}],
                                              max_tokens=24, temperature=3.0, seed=4, logprobs=True, top_logprobs=k)
        content = chat.choices[0].logprobs.content
        assert all(len(e.top_logprobs) == k for e in content)
        ranked = [[t.logprob for t in e.top_logprobs] for e in content]
        assert all(r == sorted(r, reverse=True) for r in ranked)
        # some sampled tokens are not among the k: they are not added to the list
        assert any(e.logprob < e.top_logprobs[-1].logprob for e in content), k
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Zebra"}], max_tokens=8,
                                          temperature=3.0, seed=4, logprobs=True, top_logprobs=0)
    assert chat.choices[0].logprobs.content and all(e.top_logprobs == [] for e in chat.choices[0].logprobs.content)


def test_logprobs_end_where_a_stop_string_cuts_the_text(model, client):
    full = client.completions.create(model=model, prompt="Once", max_tokens=24, temperature=0, logprobs=1,
                                     logit_bias={str(EOS): -100})
    text, tokens = full.choices[0].text, full.choices[0].logprobs.tokens
    assert "".join(tokens) == text and len(tokens) == 24
    # a stop string starting inside the 6th token's text
    start = sum(len(t) for t in tokens[:5]) + len(tokens[5]) // 2
    stop = text[start:start + 3]
    cut = text.index(stop)
    for stream in (False, True):
        out = client.completions.create(model=model, prompt="Once", max_tokens=24, temperature=0, logprobs=1,
                                        logit_bias={str(EOS): -100}, stop=[stop], stream=stream)
        choices = list(out) if stream else [out]
        got = "".join(c.choices[0].text for c in choices)
        offsets = [o for c in choices if c.choices[0].logprobs for o in c.choices[0].logprobs.text_offset]
        kept = [t for c in choices if c.choices[0].logprobs for t in c.choices[0].logprobs.tokens]
        assert got == text[:cut]
        assert all(o < cut for o in offsets) and kept == tokens[:len(kept)]  # nothing after the cut
        assert sum(map(len, kept)) >= cut and sum(map(len, kept[:-1])) < cut  # and nothing missing before it


# -- vLLM's extra parameters ---------------------------------------------------------------------------
def _complete(server: Server, **body) -> dict:
    r = _post(server, "/v1/completions", {"prompt": "The old house", "temperature": 0, **body})
    assert r.status_code == 200, r.text
    return r.json()


def test_vllm_end_controls(server, generator):
    eos_first = {"logit_bias": {str(EOS): 100}, "max_tokens": 10}  # EOS is the certain next token
    assert _complete(server, **eos_first)["usage"]["completion_tokens"] == 1
    out = _complete(server, **eos_first, min_tokens=3)
    assert out["usage"]["completion_tokens"] == 4 and out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["text"] == generator.generate("The old house", temperature=0, max_new_tokens=10,
                                                           logit_bias={EOS: 100}, min_tokens=3)[0].text
    ignored = _complete(server, **eos_first, ignore_eos=True)
    assert ignored["usage"]["completion_tokens"] == 10 and ignored["choices"][0]["finish_reason"] == "length"
    assert ignored["choices"][0]["text"] == ""  # skip_special_tokens defaults to true, as in vLLM
    kept = _complete(server, **eos_first, ignore_eos=True, skip_special_tokens=False)
    assert kept["choices"][0]["text"] == "<|endoftext|>" * 10
    with_eos = _complete(server, **eos_first, include_stop_str_in_output=True, skip_special_tokens=False)
    assert with_eos["choices"][0]["text"] == "<|endoftext|>"

    base = dict(max_tokens=12, logit_bias={str(EOS): -100})
    ids = generator.generate("The old house", temperature=0, max_new_tokens=12, logit_bias={EOS: -100})[0].token_ids
    stop_id = ids[4]
    out = _complete(server, **base, stop_token_ids=[stop_id])
    first = ids.index(stop_id)
    assert out["usage"]["completion_tokens"] == first + 1 and out["choices"][0]["finish_reason"] == "stop"
    assert out["choices"][0]["text"] == generator.tokenizer.decode(ids[:first])
    assert _complete(server, **base, stop_token_ids=[stop_id], include_stop_str_in_output=True)["choices"][0][
        "text"] == generator.tokenizer.decode(ids[:first + 1])
    text = generator.tokenizer.decode(ids)
    stop = text[5:8]
    out = _complete(server, **base, stop=[stop], include_stop_str_in_output=True)
    assert out["choices"][0]["text"] == text[:text.index(stop) + len(stop)]


def test_vllm_sampling_controls_match_the_library(server, generator):
    prompt = "The old house"
    word = generator.generate(prompt, temperature=0, max_new_tokens=1)[0].text.strip()
    assert word
    banned = _complete(server, max_tokens=8, bad_words=[word])["choices"][0]["text"]
    assert banned == generator.generate(prompt, temperature=0, max_new_tokens=8, bad_words=[word])[0].text
    assert not banned.strip().startswith(word)
    sampled = dict(max_tokens=8, temperature=1.0, seed=9)
    assert _complete(server, **sampled, top_k=-1)["choices"][0]["text"] == \
        _complete(server, **sampled, top_k=0)["choices"][0]["text"]
    for extra in ({"repetition_penalty": 1.5}, {"min_p": 0.2}):
        assert _complete(server, **sampled, **extra)["choices"][0]["text"] == \
            generator.generate(prompt, max_new_tokens=8, temperature=1.0, seed=9, **extra)[0].text, extra


def test_vllm_prompt_truncation_and_prompt_logprobs(server, generator):
    long_prompt = "one two three four five six seven eight"
    ids = generator.tokenizer.encode(long_prompt)
    out = _post(server, "/v1/completions", {"prompt": long_prompt, "max_tokens": 5, "temperature": 0,
                                            "truncate_prompt_tokens": 3, "echo": True}).json()
    tail = generator.tokenizer.decode(ids[-3:])
    assert out["usage"]["prompt_tokens"] == 3
    assert out["choices"][0]["text"] == tail + generator.generate(tail, temperature=0, max_new_tokens=5)[0].text
    out = _post(server, "/v1/completions", {"prompt": long_prompt, "max_tokens": 1, "prompt_logprobs": 2}).json()
    plp = out["choices"][0]["prompt_logprobs"]
    scored = generator.score(ids, top_n=2)
    assert plp[0] is None and len(plp) == len(ids)
    for entry, expected, token in zip(plp[1:], scored, ids[1:]):
        own = entry[str(token)]
        assert own["logprob"] == pytest.approx(expected.logprob, abs=1e-4) and own["rank"] == expected.rank
        assert own["decoded_token"] == generator.tokenizer.id_to_token(token)
        assert {int(k) for k in entry} == {token, *(i for i, _, _ in expected.top)}


def test_vllm_beam_search(server, generator):
    prompt = "It was a dark night"
    beams = _post(server, "/v1/completions", {"prompt": prompt, "max_tokens": 8, "use_beam_search": True, "n": 3,
                                              "length_penalty": 0.5, "logprobs": 1})
    assert beams.status_code == 200, beams.text
    expected = generator.generate(prompt, max_new_tokens=8, num_beams=3, n=3, length_penalty=0.5)
    choices = beams.json()["choices"]
    assert [c["text"] for c in choices] == [c.text for c in expected]  # all n beams, best first
    assert all("".join(c["logprobs"]["tokens"]) == c["text"] for c in choices)
    chat = _post(server, "/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 5,
                                                   "use_beam_search": True, "n": 2})
    assert chat.status_code == 200 and len(chat.json()["choices"]) == 2, chat.text


# -- CORS ------------------------------------------------------------------------------------------
def test_cors_is_opt_in(server, cors_server):
    preflight = {"Origin": APP_ORIGIN, "Access-Control-Request-Method": "POST",
                 "Access-Control-Request-Headers": "authorization, content-type"}
    r = httpx.options(f"{cors_server.url}/v1/chat/completions", headers=preflight)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == APP_ORIGIN
    assert "POST" in r.headers["access-control-allow-methods"]
    assert "authorization" in r.headers["access-control-allow-headers"].lower()
    ok = httpx.post(f"{cors_server.url}/v1/completions", json={"prompt": "x", "max_tokens": 1},
                    headers={"Origin": APP_ORIGIN})
    assert ok.status_code == 200 and ok.headers["access-control-allow-origin"] == APP_ORIGIN
    other = httpx.options(f"{cors_server.url}/v1/completions", headers={**preflight, "Origin": "http://evil.example"})
    assert "access-control-allow-origin" not in other.headers
    # off by default: no CORS headers, the preflight is not answered
    plain = httpx.options(f"{server.url}/v1/completions", headers=preflight)
    assert plain.status_code == 405 and "access-control-allow-origin" not in plain.headers


def test_cors_origin_is_checked_by_the_cli(tiny_checkpoint):
    r = subprocess.run([sys.executable, "-m", "gpt2lab", "serve", "--model", str(tiny_checkpoint),
                        "--cors-allow-origin", "app.example/path"], capture_output=True, text=True, env=_env(),
                       timeout=120)
    assert r.returncode == 2 and r.stderr.startswith("gpt2lab: error: --cors-allow-origin"), r.stderr


# -- LangChain -------------------------------------------------------------------------------------
def test_langchain_openai_wrappers(server, model, client):
    langchain_openai = pytest.importorskip("langchain_openai")
    base = dict(base_url=f"{server.url}/v1", api_key="unused", model=model, temperature=0, max_retries=0)
    llm = langchain_openai.OpenAI(**base, max_tokens=8)
    expected = client.completions.create(model=model, prompt="Once upon a time", max_tokens=8, temperature=0)
    assert llm.invoke("Once upon a time") == expected.choices[0].text
    assert "".join(llm.stream("Once upon a time")) == expected.choices[0].text

    chat = langchain_openai.ChatOpenAI(**base, max_completion_tokens=8)
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": "Hello there"}],
                                           max_tokens=8, temperature=0).choices[0].message.content
    message = chat.invoke("Hello there")
    assert message.content == reply
    assert "".join(chunk.content for chunk in chat.stream("Hello there")) == reply
    # a conversation with LangChain's own message types, the reply sent back as history
    from langchain_core.messages import HumanMessage, SystemMessage

    follow = chat.invoke([SystemMessage("Be brief."), HumanMessage("Hello there"), message, HumanMessage("Why?")])
    assert isinstance(follow.content, str)
