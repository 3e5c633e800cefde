"""No client can hurt another (issue 13, kinds 1-3 on the server), with real ``gpt2lab serve`` processes.

- a request that cannot run (a token id outside the vocabulary, in any field) is a 400 naming the
  field, and a stream running meanwhile completes with the text it gives alone;
- invalid Unicode in any text field is a 400 naming it;
- a 10 MB prompt is refused (413) and an over-long one (400) while ``/health`` answers within a second
  and a running stream goes on; limits on stop strings, logit_bias, messages are 400s naming them;
- a fault no request caused (a broken model) ends what is in flight, and the server stays up and
  says so in ``/health`` and the metrics; half-open connections and slow bodies are closed;
- a busy port fails in one line before the model loads.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("fastapi")

from .server_helpers import (  # noqa: E402
    HealthPoller,
    Server,
    _env,
    free_port,
    get,
    metric_value,
    server_fixture,
    wait_healthy,
)

pytestmark = pytest.mark.slow

LONG = {"max_tokens": 100, "temperature": 1.0, "seed": 7, "logit_bias": {"50256": -100}}  # no early end


server = server_fixture("robust")


def _post(url: str, body: dict, path: str = "/v1/completions", timeout: float = 120) -> httpx.Response:
    # json.dumps escapes lone surrogates as \ud800 (httpx's own encoder would refuse them)
    return httpx.post(url + path, content=json.dumps(body).encode(), timeout=timeout,
                      headers={"content-type": "application/json"})


class _Stream:
    """A streaming completion read on a thread; ``started`` once its first token arrived."""

    def __init__(self, url: str, body: dict) -> None:
        self.url, self.body = url, {**body, "stream": True}
        self.started = threading.Event()
        self.text, self.events, self.error = "", [], None
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with httpx.stream("POST", self.url + "/v1/completions", json=self.body, timeout=120) as r:
                for line in r.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    self.events.append(line[6:])
                    if line[6:] != "[DONE]":
                        chunk = json.loads(line[6:])
                        if "error" in chunk:
                            self.error = chunk["error"]
                        else:
                            self.text += chunk["choices"][0]["text"]
                    self.started.set()
        except Exception as exc:  # noqa: BLE001 - reported by the test
            self.error = repr(exc)
        finally:
            self.started.set()

    def result(self) -> str:
        self.thread.join(120)
        assert not self.thread.is_alive()
        assert self.error is None, self.error
        assert self.events[-1] == "[DONE]"
        return self.text


def _alone(url: str, body: dict) -> str:
    r = _post(url, {**body, "stream": False}, timeout=120)
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]["text"]


# -- kind 1: one request's fault ends only that request ---------------------------------------------
BAD_REQUESTS = [
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "logit_bias": {"50257": 5}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2,
                              "logit_bias": {"50257": 5}}, "logit_bias"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "logit_bias": {"99999999999": -5}}, "logit_bias"),
    ("/v1/completions", {"prompt": [15496, 50257], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": [[15496], [50300]], "max_tokens": 2}, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "max_tokens": 2, "temperature": 5e-324, "n": 200}, "n"),
]


def test_bad_requests_are_400_while_a_stream_completes_unchanged(server):
    body = {"prompt": "Once upon a time", **LONG}
    alone = _alone(server.url, body)
    stream = _Stream(server.url, body)
    assert stream.started.wait(60)
    for path, bad, param in BAD_REQUESTS:
        r = _post(server.url, bad, path)
        assert r.status_code == 400, (bad, r.text)
        assert r.json()["error"]["param"] == param, r.text
        assert r.json()["error"]["type"] == "invalid_request_error"
    assert stream.result() == alone
    health = httpx.get(server.url + "/health").json()
    assert health["status"] == "ok" and health["engine_failures"] == 0 and health["request_failures"] == 0


@pytest.mark.parametrize("extreme", [
    {"temperature": 5e-324}, {"temperature": 100.0}, {"repetition_penalty": 5e-324},
    {"repetition_penalty": 100.0, "presence_penalty": 2.0, "frequency_penalty": -2.0},
    {"temperature": 1e-45, "top_p": 5e-324, "min_p": 1.0, "typical_p": 5e-324, "top_k": 1},
    {"logit_bias": {"1": 100, "2": -100}, "temperature": 1e-40},
])
def test_extreme_values_in_range_are_served(server, extreme):
    """Inside its documented range every value computes (finitely), alone and combined: a 200."""
    for path, base in (("/v1/completions", {"prompt": "Hello"}),
                       ("/v1/chat/completions", {"messages": [{"role": "user", "content": "Hello"}]})):
        r = _post(server.url, {**base, "max_tokens": 4, "seed": 1, **extreme}, path)
        assert r.status_code == 200, r.text


@pytest.mark.parametrize("extreme", [
    # length ** length_penalty overflowed a float (OverflowError: a 500 generation_failed)
    {"prompt": "ROMEO:", "use_beam_search": True, "n": 2, "length_penalty": 1000, "max_tokens": 3},
    {"prompt": "ROMEO:", "use_beam_search": True, "n": 2, "length_penalty": -1e308, "max_tokens": 3},
    # a tiny penalty rounded to 0 turned a seen banned token's -inf into NaN (a 500)
    {"prompt": "a", "max_tokens": 3, "temperature": 0, "repetition_penalty": 1e-300, "bad_words": ["a"]},
    {"prompt": [50256], "max_tokens": 3, "temperature": 0, "repetition_penalty": 1e-300, "min_tokens": 1},
])
def test_extreme_beam_and_penalty_values_are_served(server, extreme):
    prompt = extreme["prompt"]
    chat = {k: v for k, v in extreme.items() if k != "prompt"}
    chat["messages"] = [{"role": "user", "content": prompt if isinstance(prompt, str) else "<|endoftext|>"}]
    for path, body in (("/v1/completions", extreme), ("/v1/chat/completions", chat)):
        r = _post(server.url, body, path)
        assert r.status_code == 200, (path, r.text)
        assert len(r.json()["choices"]) == extreme.get("n", 1)


# -- kind 3 (server side): text is Unicode ----------------------------------------------------------
@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "Hi \ud800 there"}, "prompt"),
    ("/v1/completions", {"prompt": ["fine", "\udfff"]}, "prompt"),
    ("/v1/completions", {"prompt": "Hi", "stop": ["\ud800"]}, "stop"),
    ("/v1/completions", {"prompt": "Hi", "model": "gpt2\ud83d"}, "model"),
    ("/v1/completions", {"prompt": "Hi", "user": "\udc00"}, "user"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {"\ud800": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a\ud800"}]}, "messages[0].content"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": "\ud800"}]}]},
     "messages[0].content[0].text"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "a", "name": "\ud800"}]},
     "messages[0].name"),
    ("/tokenize", {"prompt": "\ud800"}, "prompt"),
])
def test_lone_surrogates_are_400_naming_the_field(server, path, body, param):
    r = _post(server.url, body, path)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param, error
    assert "Unicode" in error["message"]


def test_error_bodies_quoting_invalid_unicode_are_still_json(server):
    r = _post(server.url, {"prompt": "Hi", "temprature\ud800": 1})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"


# -- kind 2: bounded work, the event loop never waits on the CPU -------------------------------------
def _send(url: str, path: str, content: bytes) -> httpx.Response:
    return httpx.post(url + path, content=content, timeout=120, headers={"content-type": "application/json"})


def test_huge_prompts_neither_stall_health_nor_a_running_stream(server, tmp_path):
    body = {"prompt": "It was a dark and stormy night", **LONG}
    alone = _alone(server.url, body)
    big = "hello " * 1_750_000  # 10.5 MB: over --max-body-mb 1
    under = "hello " * 170_000  # 1 MB minus a little: within the body limit, far over the context
    too_large = [("/v1/completions", json.dumps({"prompt": big}).encode()),
                 ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": big}]}).encode())]
    too_long = [("/v1/completions", json.dumps({"prompt": under}).encode(), "prompt"),
                ("/v1/completions", json.dumps({"prompt": [under[:200_000]] * 4}).encode(), "prompt"),
                ("/v1/chat/completions", json.dumps({"messages": [{"role": "user", "content": under}]}).encode(),
                 "messages[0].content")]
    tokenize = json.dumps({"prompt": under[:900_000]}).encode()
    poller = HealthPoller(server.url, tmp_path)
    stream = _Stream(server.url, body)
    try:
        assert stream.started.wait(60)
        for path, content in too_large:
            r = _send(server.url, path, content)
            assert r.status_code == 413, r.text[:300]
            assert r.json()["error"]["code"] == "request_too_large"
        for path, content, param in too_long:
            r = _send(server.url, path, content)
            assert r.status_code == 400, r.text[:300]
            assert r.json()["error"]["param"] == param
            assert r.json()["error"]["code"] == "context_length_exceeded"
        begin = time.monotonic()
        r = _send(server.url, "/tokenize", tokenize)  # 900k characters: seconds of CPU, off the event loop
        tokenized = (begin, time.monotonic())
        assert r.status_code == 200 and r.json()["count"] >= 150_000
        assert stream.result() == alone
    finally:
        samples = poller.samples()
    assert HealthPoller.within_a_second(samples), samples
    # While the server tokenized, its event loop went on answering /health (on the loop it would
    # answer none: the uploading and parsing before the tokenizing take a small part of the time).
    during = HealthPoller.answered_between(samples, *tokenized)
    assert during >= max(1, int(tokenized[1] - tokenized[0])), (during, tokenized)  # one a second at least


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {"prompt": "Hi", "stop": [f"s{i}" for i in range(17)]}, "stop"),
    ("/v1/completions", {"prompt": "Hi", "stop": "x" * 257}, "stop"),
    ("/v1/completions", {"prompt": "Hi", "logit_bias": {str(i): 1 for i in range(301)}}, "logit_bias"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}] * 1025}, "messages"),
    ("/v1/completions", {"prompt": ["x"] * 81}, "n"),  # prompts x n beyond the server's capacity
    ("/v1/completions", {"prompt": "x", "n": 100}, "n"),
    # best_of beyond n's range was a ValueError (500) from SamplingParams; beyond the capacity it named n
    ("/v1/completions", {"prompt": "a", "best_of": 129, "n": 2, "max_tokens": 1}, "best_of"),
    ("/v1/completions", {"prompt": "a", "best_of": 10**9, "n": 2, "max_tokens": 1}, "best_of"),
    ("/v1/completions", {"prompt": "a", "best_of": 100, "max_tokens": 1}, "best_of"),
])
def test_limits_are_400_naming_the_field(server, path, body, param):
    r = _post(server.url, body, path)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == param, r.text


def test_body_limit_without_content_length(server):
    """A chunked upload (no Content-Length) is counted as it arrives."""
    def chunks():
        for _ in range(40):
            yield b" " * 50_000
    r = httpx.post(server.url + "/v1/completions", content=chunks(), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_a_busy_port_fails_at_once_in_one_line(tiny_checkpoint):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = subprocess.run([sys.executable, "-m", "gpt2lab", "serve", "--model", str(tiny_checkpoint), "--port",
                            str(port)], capture_output=True, text=True, env=_env(), timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("gpt2lab: error: cannot listen on 127.0.0.1:") and "in use" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


# -- in-process server: a broken model, half-open connections -------------------------------------
@pytest.fixture(scope="module")
def local(gen):
    """``create_app`` on this module's own Generator (so the test can break its model), served by
    ``gpt2lab.server.http.serve`` with 1-second header and body timeouts, on a thread."""
    from gpt2lab.server import create_app
    from gpt2lab.server.http import serve
    from gpt2lab.server.limits import Limits

    limits = Limits(header_timeout_s=1.0, body_timeout_s=1.0)
    app = create_app(gen, limits=limits)
    sock = socket.socket()
    sock.bind(("127.0.0.1", free_port()))
    sock.listen(64)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    threading.Thread(target=serve, args=(app, sock), kwargs={"log_level": "critical", "limits": limits},
                     daemon=True).start()
    assert wait_healthy(url, 60), "the in-process server did not start"
    return url, gen


def _metric(url: str, name: str) -> float:
    return metric_value(httpx.get(url + "/metrics").text, name)


def test_a_broken_model_fails_what_runs_and_the_server_stays_up(local):
    import torch

    url, gen = local
    ok = {"prompt": "Hi", "max_tokens": 3, "temperature": 0}
    assert _post(url, ok).status_code == 200
    stream = _Stream(url, {"prompt": "Hi", "max_tokens": 120, "temperature": 0, "logit_bias": {"50256": -100}})
    assert stream.started.wait(60)
    weight = gen.model.ln_f.weight
    with torch.no_grad():  # a layer norm whose shape no longer matches: every forward raises
        gen.model.ln_f.weight = torch.nn.Parameter(torch.ones(3))
    try:
        stream.thread.join(60)
        assert stream.error is not None and stream.events[-1] == "[DONE]"
        health = httpx.get(url + "/health").json()
        assert health["status"] == "degraded" and health["engine_failures"] >= 1, health
        assert "last_engine_error" in health
        assert _metric(url, "gpt2lab_engine_failures_total") >= 1
        r = _post(url, ok)  # a new request while broken: a server error for it, the server answers
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
    finally:
        gen.model.ln_f.weight = weight
    r = _post(url, ok)
    assert r.status_code == 200
    assert httpx.get(url + "/health").json()["status"] == "ok"


def test_half_open_connections_and_slow_bodies_are_closed(local):
    url, _ = local
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:  # never finishes its headers
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        start = time.monotonic()
        assert s.recv(1024) == b""  # closed by the server
        assert time.monotonic() - start < 20
    with socket.create_connection((host, int(port)), timeout=30) as s:  # headers, then a body that stalls
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 100\r\n\r\n{\"prompt\":")
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 408"), reply
    with socket.create_connection((host, int(port)), timeout=30) as s:  # declares more than the limit, stalls:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                  b"Content-Length: 99999999999\r\n\r\n{\"prompt\":")  # too large whatever comes: 413, not 408
        reply = s.recv(4096)
        assert reply.startswith(b"HTTP/1.1 413"), reply
        assert b"request_too_large" in reply
    with ThreadPoolExecutor(4) as pool:  # and the server still serves
        codes = list(pool.map(lambda _: _post(url, {"prompt": "x", "max_tokens": 2}).status_code, range(4)))
    assert codes == [200] * 4


# -- a request whose own settings leave nothing to sample -------------------------------------------
@pytest.fixture(scope="module")
def byte_server(tmp_path_factory) -> Server:
    """A 257-token model (the 256 bytes and <|endoftext|>) and its byte-level tokenizer: 256 stop_token_ids
    (the request limit) with min_tokens, which holds back EOS too, ban every token."""
    import tokenizers

    from .conftest import make_hf_checkpoint
    from .server_helpers import launch_in_thread

    folder = tmp_path_factory.mktemp("bytes")
    make_hf_checkpoint(folder, seed=5, n_layer=1, n_head=2, n_embd=32, n_positions=64, vocab_size=257,
                       bos_token_id=256, eos_token_id=256)
    vocab = {ch: i for i, ch in enumerate(sorted(tokenizers.pre_tokenizers.ByteLevel.alphabet()))}
    (folder / "vocab.json").write_text(json.dumps({**vocab, "<|endoftext|>": 256}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")
    launch_in_thread("bytes", folder, tmp_path_factory.mktemp("bytes-logs"))
    return get("bytes")


def test_a_request_that_bans_every_token_is_a_400_and_hurts_no_other(byte_server):
    """It was a 500 server_error (generation_failed); greedy ones took token 0, a banned one, each step."""
    url = byte_server.url
    body = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 1.0, "top_k": 20, "seed": 7,
            "logit_bias": {"256": -100}}
    alone = _alone(url, body)
    stream = _Stream(url, body)
    assert stream.started.wait(60)
    ban = {"prompt": "Hi", "max_tokens": 5, "min_tokens": 2, "stop_token_ids": list(range(256))}
    for extra in ({"temperature": 0}, {"seed": 1, "top_k": 5, "logprobs": 2}, {"temperature": 0, "n": 2}):
        r = _post(url, {**ban, **extra})
        assert r.status_code == 400, r.text
        assert r.json()["error"]["type"] == "invalid_request_error", r.text
        assert "every token masked" in r.json()["error"]["message"]
        banned = _Stream(url, {**ban, **extra})
        banned.thread.join(60)
        assert banned.text == "" and banned.events[-1] == "[DONE]"
        assert banned.error["type"] == "invalid_request_error", banned.error
    assert stream.result() == alone
    assert _post(url, {"prompt": "Hi", "max_tokens": 3, "temperature": 0}).status_code == 200
    health = httpx.get(url + "/health").json()
    assert health["status"] == "ok" and health["engine_failures"] == 0


def test_a_client_request_id_is_logged_on_one_escaped_line(caplog):
    """vLLM's ``request_id`` is the client's text, and the failure line logged it raw: a newline started a
    fake log line and an OSC sequence retitled the terminal tailing the log."""
    import asyncio

    from gpt2lab.server.metrics import ServerMetrics
    from gpt2lab.server.scheduler import Scheduler, _Stream

    class Runner:
        def abort(self, request_id: str) -> None:
            pass

    scheduler = Scheduler(None, max_batch=1, max_queue=1, metrics=ServerMetrics())
    scheduler.runner = Runner()
    loop = asyncio.new_event_loop()
    try:
        rid = "cmpl-x\n gpt2lab: FAKE\x1b]0;PWNED\x07-0"
        stream = _Stream(loop, asyncio.Queue(), [rid], 1)
        scheduler._streams[rid] = stream
        with caplog.at_level("ERROR", logger="gpt2lab.server"):
            scheduler._fail_request(stream, "ValueError: bad\nline\x1b[2J")
    finally:
        loop.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 1 and "\n" not in lines[0] and "\x1b" not in lines[0] and "\x07" not in lines[0], lines
    assert "cmpl-x\\u000a gpt2lab: FAKE\\u001b]0;PWNED\\u0007" in lines[0] and "bad\\u000aline" in lines[0]
