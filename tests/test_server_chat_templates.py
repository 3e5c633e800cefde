"""A checkpoint's chat template is untrusted code, on a real ``gpt2lab serve``: it renders in worker processes
(never on the event loop or the engine thread), so a slow one harms no other client's stream and is stopped
at the request timeout; a broken one is the server's 500 naming the template, not a 400 blaming the
messages; and a template that cannot lay out a plain conversation keeps the server from starting."""

from __future__ import annotations

import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from gpt2lab.generation.chat_template import DEFAULT_CHAT_TEMPLATE

from .server_helpers import _env, get, launch

psutil = pytest.importorskip("psutil")

# the transcript, with a part that runs for as long as it is let when the last message says "slow", and one
# that builds a huge value when it says "big": a template that is fine on the probe conversation
HOSTILE = ("{%- if messages[-1]['content'] == 'slow' -%}{%- for i in range(100000) -%}{%- for j in range(100000) -%}"
           "{%- endfor -%}{%- endfor -%}{%- endif -%}\n"
           "{%- if messages[-1]['content'] == 'big' -%}{{- 'x' * 100000000 -}}{%- endif -%}\n" + DEFAULT_CHAT_TEMPLATE)
STREAM = {"prompt": "Once upon a time", "max_tokens": 120, "temperature": 0, "logit_bias": {"50256": -100},
          "stream": True}


def _with_template(tiny_checkpoint: Path, folder: Path, template: str) -> Path:
    out = shutil.copytree(tiny_checkpoint, folder)
    (out / "chat_template.jinja").write_text(template, encoding="utf-8")
    return out


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, tiny_checkpoint):
    model = _with_template(tiny_checkpoint, tmp_path_factory.mktemp("hostile") / "model", HOSTILE)
    launch("hostile-template", model, tmp_path_factory.mktemp("hostile-logs"), "--request-timeout", "4")
    return get("hostile-template")


def _stream(url: str) -> tuple[str, list[float]]:
    """The streamed text and the arrival time of each event."""
    text, times = "", []
    with httpx.stream("POST", f"{url}/v1/completions", json=STREAM, timeout=120) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                import json

                text += json.loads(line[6:])["choices"][0]["text"]
                times.append(time.monotonic())
    return text, times


def _render_workers(server) -> list:
    return [c for c in psutil.Process(server.process.pid).children(recursive=True)]


def test_a_slow_template_harms_no_other_stream_and_is_stopped(hostile):
    url = hostile.url
    alone, alone_times = _stream(url)
    assert len(alone_times) > 50
    chat = {"messages": [{"role": "user", "content": "slow"}], "max_tokens": 4}
    answer: dict = {}

    def ask() -> None:
        start = time.monotonic()
        answer["response"] = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
        answer["seconds"] = time.monotonic() - start

    thread = threading.Thread(target=ask)
    thread.start()
    time.sleep(0.5)  # the render is running
    busy = [p for p in _render_workers(hostile) if p.cpu_percent(interval=0.3) > 50]
    assert busy, "the slow template renders in a worker process"
    streamed, times = _stream(url)  # meanwhile, another client streams
    thread.join(60)
    assert streamed == alone  # its text unharmed
    gaps, alone_gaps = [b - a for a, b in zip(times, times[1:])], [b - a for a, b in zip(alone_times, alone_times[1:])]
    # its timing unharmed: a render on a thread of the server held the GIL between every step of the engine
    assert sum(gaps) / len(gaps) < 3 * sum(alone_gaps) / len(alone_gaps) + 0.01, (gaps, alone_gaps)
    assert max(gaps) < 1.0, max(gaps)
    # a bounded error, at the request timeout, and the render stopped: its process is gone, none computes
    r = answer["response"]
    assert r.status_code == 408 and r.json()["error"]["code"] == "request_timeout", r.text
    assert answer["seconds"] < 4 + 10
    assert all(not p.is_running() or p.status() == psutil.STATUS_ZOMBIE for p in busy)
    time.sleep(1.0)
    assert all(p.cpu_percent(interval=0.5) < 50 for p in _render_workers(hostile))
    # and the next conversation is served
    ok = httpx.post(f"{url}/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}],
                                                          "max_tokens": 3}, timeout=60)
    assert ok.status_code == 200, ok.text
    assert hostile.metric("gpt2lab_aborted_requests_total", reason="timeout") >= 1


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
