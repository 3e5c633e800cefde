"""Structured outputs over HTTP: a real ``gpt2lab serve`` and the real ``openai`` client (response_format json_schema,
the client's ``parse`` with a pydantic model), vLLM's structured_outputs and guided_* fields, and bad or hostile
specs answered 400 while other streams go on."""

from __future__ import annotations

import json
import re
import threading

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("llguidance")
jsonschema = pytest.importorskip("jsonschema")
pydantic = pytest.importorskip("pydantic")

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 10},
                                           "mood": {"enum": ["happy", "sad"]},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "mood", "age"], "additionalProperties": False}
FORMAT = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
MESSAGES = [{"role": "user", "content": "Describe someone."}]


def _post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.url}{path}", json=body, timeout=120)


def _error(r: httpx.Response) -> dict:
    assert r.status_code == 400, r.text
    return r.json()["error"]


def test_chat_response_format_json_schema_stream_equals_non_stream(client, model):
    kwargs = dict(model=model, messages=MESSAGES, response_format=FORMAT, temperature=0.9, seed=3, n=2,
                  max_tokens=80)
    whole = client.chat.completions.create(**kwargs)
    texts = [c.message.content for c in whole.choices]
    for text, choice in zip(texts, whole.choices):
        jsonschema.validate(json.loads(text), SCHEMA)
        assert choice.finish_reason == "stop"
    streamed = ["", ""]
    for chunk in client.chat.completions.create(**kwargs, stream=True):
        for c in chunk.choices:
            streamed[c.index] += c.delta.content or ""
    assert streamed == texts


def test_openai_parse_with_a_pydantic_model(client, model):
    class Person(pydantic.BaseModel):
        name: str = pydantic.Field(max_length=10)
        happy: bool
        age: int = pydantic.Field(ge=0, le=99)

    parse = client.chat.completions.parse if hasattr(client.chat.completions, "parse") else \
        client.beta.chat.completions.parse
    reply = parse(model=model, messages=MESSAGES, response_format=Person, temperature=0, max_tokens=80)
    person = reply.choices[0].message.parsed
    assert isinstance(person, Person) and 0 <= person.age <= 99


def test_json_object_on_completions_and_chat(server):
    for path, base in (("/v1/completions", {"prompt": "JSON:"}), ("/v1/chat/completions", {"messages": MESSAGES})):
        r = _post(server, path, {**base, "response_format": {"type": "json_object"}, "max_tokens": 30,
                                 "temperature": 0})
        assert r.status_code == 200, r.text
        choice = r.json()["choices"][0]
        text = choice["text"] if "text" in choice else choice["message"]["content"]
        assert text.startswith("{")


@pytest.mark.parametrize("fields, pattern", [
    ({"structured_outputs": {"choice": ["left", "right"]}}, r"left|right"),
    ({"structured_outputs": {"regex": "[0-9]{2}-[a-z]{2}"}}, r"[0-9]{2}-[a-z]{2}"),
    ({"guided_choice": ["up", "down"]}, r"up|down"),
    ({"guided_regex": "(ab){1,3}"}, r"(ab){1,3}"),
    ({"guided_grammar": 'root ::= "x" [0-9]', "guided_decoding_backend": "guidance"}, r"x[0-9]"),
    ({"guided_json": json.dumps(SCHEMA), "guided_whitespace_pattern": "[ ]?"}, None),
])
def test_vllm_fields_on_completions(server, fields, pattern):
    r = _post(server, "/v1/completions", {"prompt": "Go:", "max_tokens": 60, "temperature": 1.0, "seed": 5, "n": 3,
                                          **fields})
    assert r.status_code == 200, r.text
    for choice in r.json()["choices"]:
        if pattern is None:
            jsonschema.validate(json.loads(choice["text"]), SCHEMA)
        else:
            assert re.fullmatch(pattern, choice["text"]), choice


@pytest.mark.parametrize("fields, param, words", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format", "objekt"),
    ({"structured_outputs": {"regex": "(ab"}}, "structured_outputs", "regex"),
    ({"structured_outputs": {"regx": "a"}}, "structured_outputs", "regx"),
    ({"guided_regex": "(ab"}, "guided_regex", "unclosed"),
    ({"guided_json": {"type": "array", "items": {"type": "objekt"}}}, "guided_json", "objekt"),
    ({"guided_choice": []}, "guided_choice", "choice"),
    ({"response_format": {"type": "json_object"}, "guided_regex": "a"}, "guided_regex", "one structured output"),
    ({"guided_regex": "a", "guided_choice": ["a"]}, "guided_choice", "not guided_regex and guided_choice"),
    ({"guided_whitespace_pattern": " "}, "guided_whitespace_pattern", "guided_json"),
    ({"response_format": {"type": "json_object"}, "use_beam_search": True, "n": 2}, "response_format", "beam"),
])
def test_bad_specs_are_400_naming_the_field(server, fields, param, words):
    error = _error(_post(server, "/v1/chat/completions", {"messages": MESSAGES, **fields}))
    assert error["param"] == param and words in error["message"], error


def test_huge_or_pathological_schemas_are_400_while_other_streams_go_on(server):
    chunks: list[str] = []
    first = threading.Event()

    def stream() -> None:
        body = {"prompt": "Once", "max_tokens": 100, "ignore_eos": True, "stream": True, "temperature": 1.0, "seed": 1}
        with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(line)
                    first.set()

    reader = threading.Thread(target=stream)
    reader.start()
    assert first.wait(60)
    huge = {"type": "object", "properties": {f"field_{i:05d}": {"type": "string", "description": "x" * 20}
                                             for i in range(4000)}}
    assert len(json.dumps(huge)) > 200_000
    deep = json.loads('{"type": "object", "properties": {"a": ' * 100 + '{"type": "string"}' + "}}" * 100)
    for schema, code in ((huge, "limit_exceeded"), (deep, None)):
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        error = _error(_post(server, "/v1/chat/completions", {"messages": MESSAGES, "response_format": fmt}))
        assert error["param"] == "response_format" and error["code"] == code, error
    reader.join(120)
    assert chunks[-1] == "data: [DONE]"
    reasons = [c["finish_reason"] for e in map(json.loads, (c[6:] for c in chunks[:-1])) for c in e["choices"]]
    assert reasons[-1] == "length"  # the stream went on to its 100 tokens


def test_a_compile_over_the_time_limit_is_a_400_and_the_server_goes_on(gen):
    # the server's own limit set to 0 s: every grammar not yet compiled is over it (the real compile, on its
    # worker thread, is abandoned by the request); the server answers the next request as usual
    import socket

    import uvicorn

    from gpt2lab.server import create_app
    from gpt2lab.server.limits import Limits

    from .server_helpers import free_port, wait_healthy

    limits = Limits(structured_compile_s=0.0)
    sock = socket.socket()
    sock.bind(("127.0.0.1", free_port()))
    sock.listen(16)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    server = uvicorn.Server(uvicorn.Config(create_app(gen, limits=limits), log_level="critical"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    thread.start()
    try:
        assert wait_healthy(url, 60)
        schema = {"type": "object", "properties": {"never_compiled_before": {"type": "integer"}}}
        fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
        error = _error(httpx.post(f"{url}/v1/completions", json={"prompt": "x", "response_format": fmt}, timeout=60))
        assert error["param"] == "response_format" and error["code"] == "limit_exceeded", error
        assert "took more than this server's limit of 0 s" in error["message"], error
        plain = httpx.post(f"{url}/v1/completions", json={"prompt": "x", "max_tokens": 2}, timeout=60)
        assert plain.status_code == 200
    finally:
        server.should_exit = True
        thread.join(60)
        sock.close()


def test_slow_compiles_wait_on_their_own_pool_and_a_flood_is_429(server):
    """Distinct slow specs at once (a flood of regexes that each compile for a while): they used the thread
    pool that tokenizes every request, so a plain /tokenize waited behind them for seconds and valid specs ran
    out of time. Now they run COMPILE_THREADS at a time on their own pool, at most MAX_COMPILES pending (429
    past that), and a plain request meanwhile is answered."""
    from concurrent.futures import ThreadPoolExecutor

    from gpt2lab.server.structured import MAX_COMPILES

    def ask(n: int) -> httpx.Response:
        body = {"prompt": "x", "max_tokens": 1, "structured_outputs": {"regex": f"(e{{1000}}){{{100 + n}}}"}}
        return httpx.post(f"{server.url}/v1/completions", json=body, timeout=120)

    with ThreadPoolExecutor(MAX_COMPILES + 8) as pool:
        flood = [pool.submit(ask, n) for n in range(MAX_COMPILES + 8)]
        plain = httpx.post(f"{server.url}/tokenize", json={"prompt": "hello"}, timeout=120)
        answers = [f.result() for f in flood]
    assert plain.status_code == 200
    statuses = [r.status_code for r in answers]
    assert all(s in (200, 400, 429) for s in statuses), [r.text for r in answers if r.status_code >= 500]
    busy = [r.json()["error"] for r in answers if r.status_code == 429]
    assert busy and all(e["code"] == "server_busy" for e in busy), statuses
