"""A checkpoint's chat template is untrusted code, on a real ``gpt2lab serve``: it renders in worker processes
(never on the event loop or the engine thread), so a slow one harms no other client's stream and is stopped
at the request timeout; a broken one is the server's 500 naming the template, not a 400 blaming the
messages; and a template that cannot lay out a plain conversation keeps the server from starting."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from gpt2lab.generation.chat_template import DEFAULT_CHAT_TEMPLATE

from .server_helpers import _env, free_port, get, launch, launch_in_thread, wait_healthy

psutil = pytest.importorskip("psutil")

# the transcript, with a part that runs for as long as it is let when the last message says "slow", and one
# that builds a huge value when it says "big": a template that is fine on the probe conversation
HOSTILE = ("{%- if messages[-1]['content'] == 'slow' -%}{%- for i in range(100000) -%}{%- for j in range(100000) -%}"
           "{%- endfor -%}{%- endfor -%}{%- endif -%}\n"
           "{%- if messages[-1]['content'] == 'big' -%}{{- 'x' * 100000000 -}}{%- endif -%}\n" + DEFAULT_CHAT_TEMPLATE)
SANDBOX_S = 10  # jinja_sandbox.RenderLimits.timeout_s: a render's own time bound
SHORT_S = 3  # the request timeout of a second server: shorter than SANDBOX_S, so the slow render meets it first
STREAM = {"prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "logit_bias": {"50256": -100},
          "stream": True}


def _with_template(tiny_checkpoint: Path, folder: Path, template: str) -> Path:
    out = shutil.copytree(tiny_checkpoint, folder)
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_checkpoint):
    """A real ``gpt2lab serve`` of a model with the hostile template (the request timeout longer than a render
    may take), and, in this process, a server of it with a request timeout shorter than that."""
    model = _with_template(tiny_checkpoint, tmp_path_factory.mktemp("hostile") / "model", HOSTILE)
    logs = tmp_path_factory.mktemp("hostile-logs")
    launch("hostile-template", model, logs, "--request-timeout", "60")
    launch_in_thread("hostile-template-short", model, logs, request_timeout=SHORT_S)
    return get("hostile-template")


@pytest.fixture(scope="module")
def hostile_short(hostile):
    return get("hostile-template-short")


def _stream(url: str) -> tuple[str, list[float]]:
    """The streamed text and the arrival time of each event."""
    text, times = "", []
    with httpx.stream("POST", f"{url}/v1/completions", json=STREAM, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                event = json.loads(line[6:])
                assert "choices" in event, event
                text += event["choices"][0]["text"]
                times.append(time.monotonic())
    return text, times


def _cpu_seconds_of(process) -> dict:
    """The CPU seconds each child process of ``process`` (a server's chat render workers) has used so far."""
    out = {}
    for child in process.children(recursive=True):
        try:
            times = child.cpu_times()
        except psutil.NoSuchProcess:
            continue
        out[child] = times.user + times.system
    return out


def _cpu_seconds(server) -> dict:
    return _cpu_seconds_of(psutil.Process(server.process.pid))


def test_a_slow_template_harms_no_other_stream_and_is_stopped(hostile):
    """A render that computes until its bound runs in a worker process while another client streams: the
    stream's text and timing unharmed, a 500 naming the template back, the render stopped."""
    url = hostile.url
    alone, alone_times = _stream(url)
    assert len(alone_times) > 30
    chat = {"messages": [{"role": "user", "content": "slow"}], "max_tokens": 4}
    answer: dict = {}

    def ask() -> None:
        start = time.monotonic()
        answer["response"] = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
        answer["seconds"] = time.monotonic() - start

    before = _cpu_seconds(hostile)
    thread = threading.Thread(target=ask)
    thread.start()
    time.sleep(1.5)  # the render is running
    grown = _cpu_seconds(hostile)
    busy = [p for p, seconds in grown.items() if seconds - before.get(p, 0.0) > 0.2]
    assert busy, ("the slow template renders in a worker process", before, grown)
    streamed, times = _stream(url)  # meanwhile, another client streams
    thread.join(60)
    assert streamed == alone  # its text unharmed
    gaps, alone_gaps = [b - a for a, b in zip(times, times[1:])], [b - a for a, b in zip(alone_times, alone_times[1:])]
    # its timing unharmed: a render on a thread of the server held the GIL between every step of the engine
    # (5x: the worker still takes a core of a busy machine; the GIL would cost far more)
    assert sum(gaps) / len(gaps) < 5 * sum(alone_gaps) / len(alone_gaps) + 0.01, (gaps, alone_gaps)
    assert max(gaps) < 2.0, max(gaps)
    # a bounded error: the render's own time bound, the template named; the render stopped (its worker idle)
    r = answer["response"]
    error = r.json()["error"]
    assert r.status_code == 500 and error["code"] == "chat_template_error", r.text
    assert "chat_template.jinja" in error["message"] and f"{SANDBOX_S} s" in error["message"]
    assert answer["seconds"] < SANDBOX_S + 10
    time.sleep(0.5)
    idle = _cpu_seconds(hostile)
    time.sleep(1.0)
    assert all(_cpu_seconds(hostile).get(p, 0.0) - idle.get(p, 0.0) < 0.2 for p in busy)
    ok = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                          "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200, ok.text


def test_the_request_timeout_covers_rendering(hostile_short):
    """A render still running at the request timeout is a 408, and stopped there: its process is killed (a
    fresh one takes its place), and the next conversation is served."""
    url = hostile_short.url
    before = _cpu_seconds_of(psutil.Process())
    start = time.monotonic()
    r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "slow"}],
                                                        "max_tokens": 4}, timeout=60)
    seconds = time.monotonic() - start
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout", r.text
    assert "rendered" in r.json()["error"]["message"]
    assert SHORT_S - 0.5 < seconds < SANDBOX_S, seconds  # stopped at the request timeout, not the render's bound
    after = _cpu_seconds_of(psutil.Process())
    gone = [p for p in before if p not in after or not p.is_running() or p.status() == psutil.STATUS_ZOMBIE]
    assert gone, "the worker that ran the render was killed"
    ok = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                          "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200, ok.text
    assert hostile_short.metric("gpt2lab_aborted_requests_total", reason="timeout") >= 1


def test_a_template_fault_is_a_server_error_naming_the_template(hostile):
    r = httpx.post(f"{hostile.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "big"}],
                                                                "max_tokens": 4}, timeout=60)
    error = r.json()["error"]
    assert r.status_code == 500 and error["type"] == "server_error" and error["code"] == "chat_template_error", r.text
    assert "chat_template.jinja" in error["message"] and error["param"] is None
    # the messages' own fault stays a 400 naming them
    r = httpx.post(f"{hostile.url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "x " * 200}],
                                                                "max_tokens": 100}, timeout=60)
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages", r.text


@pytest.mark.parametrize("template, words", [
    ("{% for %}", "chat_template.jinja"),  # not Jinja
    ("{{ raise_exception('no conversations here') }}", "no conversations here"),  # refuses a plain conversation
    ("{%- for m in messages -%}{%- for i in range(10**9) -%}{%- endfor -%}{%- endfor -%}", "chat_template.jinja"),
])
def test_a_template_that_cannot_lay_out_a_conversation_keeps_serve_from_starting(tiny_checkpoint, tmp_path,
                                                                                 template, words):
    model = _with_template(tiny_checkpoint, tmp_path / "model", template)
    r = subprocess.run([sys.executable, "-m", "gpt2lab", "serve", "--model", str(model), "--port", "0"],
                       capture_output=True, text=True, env=_env(), timeout=300)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith("gpt2lab: error: ") and r.stderr.count("\n") == 1 and words in r.stderr, r.stderr


def test_renders_queued_behind_slow_ones_hold_no_threads(hostile_short):
    """Many slow renders at once: 2 run in the workers and the others wait on the event loop, so a completion
    (tokenized on the server's thread pool, 40 threads) is answered before any of them times out; renders
    that each waited on a thread of the pool left none for it until their timeouts."""
    import asyncio

    url = hostile_short.url
    slow = {"messages": [{"role": "user", "content": "slow"}], "max_tokens": 4}

    async def main() -> tuple[list[float], float, int]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=100)) as client:
            async def chat() -> float:
                r = await client.post(f"{url}/v1/chat/completions", json=slow)
                assert r.status_code == 408, r.text
                return time.monotonic()

            chats = [asyncio.create_task(chat()) for _ in range(48)]
            await asyncio.sleep(0.5)  # they have all arrived and wait for a worker
            r = await client.post(f"{url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2})
            answered = time.monotonic()
            return await asyncio.gather(*chats), answered, r.status_code

    timed_out, answered, status = asyncio.run(main())
    assert status == 200
    assert answered < min(timed_out), (answered, sorted(timed_out)[:3])


def test_the_documented_script_without_a_main_guard_serves_chat(tmp_path):
    """docs/server.md's Python snippet, saved as a script as users write it (no ``if __name__ == "__main__":``):
    the chat render workers are spawned without re-running the script (each would build one more server and
    fail while bootstrapping, and the first server stayed "loading" for ever)."""
    port = free_port()
    script = tmp_path / "app.py"
    script.write_text("import gpt2lab\nfrom gpt2lab.server import create_app\nimport uvicorn\n\n"
                      "app = create_app(gpt2lab.load('shakespeare-gpt2'), max_batch=4, request_timeout=60)\n"
                      f"uvicorn.run(app, host='127.0.0.1', port={port})\n", encoding="utf-8")
    log = (tmp_path / "log").open("w")
    process = subprocess.Popen([sys.executable, str(script)], cwd=tmp_path, env=_env(), stdout=log,
                               stderr=subprocess.STDOUT)
    try:
        url = f"http://127.0.0.1:{port}"
        assert wait_healthy(url, process=process), (tmp_path / "log").read_text()
        r = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                           "max_tokens": 4}, timeout=60)
        assert r.status_code == 200, r.text
    finally:
        process.kill()
        process.wait(10)
        log.close()
    assert "bootstrapping phase" not in (tmp_path / "log").read_text()
