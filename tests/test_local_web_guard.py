"""Local web pages are not reachable from other web sites: ``gpt2lab serve`` and ``gpt2lab review serve``
answer only their own host names, take only JSON bodies and refuse cross-origin changes
(gpt2lab.http_guard.HostOriginGuard, the one mechanism both use).

Each attack is sent as a browser would send it after DNS rebinding (a foreign ``Host``), or from another
site's page (a foreign ``Origin``, a ``text/plain`` or untyped "simple" body), to real servers on ports.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import httpx
import pytest
from pydantic import BaseModel

pytest.importorskip("fastapi")

from gpt2lab.http_guard import HostOriginGuard, allowed_hosts, check_allowed_host  # noqa: E402

from .server_helpers import _env, free_port  # noqa: E402

COMPLETION = {"prompt": "Hello", "max_tokens": 2, "temperature": 0}


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _attacks(port: int) -> list[tuple[str, dict[str, str], bytes, str]]:
    """(what, headers, body, expected error code) of requests another site can make a browser send."""
    body = json.dumps(COMPLETION).encode()
    js = {"content-type": "application/json"}
    return [
        ("rebound name", {**js, "host": f"evil.example:{port}"}, body, "host_not_allowed"),
        ("rebound name, no port", {**js, "host": "evil.example"}, body, "host_not_allowed"),
        ("rebound name looking local", {**js, "host": f"127.0.0.1.evil.example:{port}"}, body, "host_not_allowed"),
        ("foreign origin", {**js, "origin": "http://evil.example"}, body, "origin_not_allowed"),
        ("another local port", {**js, "origin": f"http://127.0.0.1:{port + 1}"}, body, "origin_not_allowed"),
        ("https on our port", {**js, "origin": f"https://evil.example:{port}"}, body, "origin_not_allowed"),
        ("sandboxed frame", {**js, "origin": "null"}, body, "origin_not_allowed"),
        ("cross-site without Origin", {**js, "sec-fetch-site": "cross-site"}, body, "origin_not_allowed"),
        # "simple" requests (no preflight): a JSON text as text/plain, a form, a Blob with no type
        ("text/plain body", {"content-type": "text/plain;charset=UTF-8"}, body, "unsupported_media_type"),
        ("form body", {"content-type": "application/x-www-form-urlencoded"}, body, "unsupported_media_type"),
        ("untyped body", {}, body, "unsupported_media_type"),
    ]


def _refused(r: httpx.Response, code: str) -> None:
    assert r.status_code == (415 if code == "unsupported_media_type" else 403), r.text
    error = r.json()["error"]
    assert error["code"] == code and error["type"] == "invalid_request_error", error


# -- gpt2lab serve -------------------------------------------------------------------------------------
def test_serve_refuses_rebinding_cross_site_and_non_json_requests(server):
    port, url = _port(server.url), server.url
    before = server.metric("gpt2lab_prompt_tokens_total")
    for what, headers, body, code in _attacks(port):
        r = httpx.post(f"{url}/v1/completions", content=body, headers=headers, timeout=30)
        assert r.status_code in (403, 415), (what, r.status_code, r.text)
        _refused(r, code)
    # a rebound page cannot read anything either: the model list, health, the playground
    for path in ("/v1/models", "/health", "/", "/metrics", "/openapi.json"):
        r = httpx.get(url + path, headers={"host": f"evil.example:{port}"}, timeout=30)
        _refused(r, "host_not_allowed")
    assert server.metric("gpt2lab_prompt_tokens_total") == before  # nothing reached the engine
    # a method no route takes is a 405 (it was a 415 asking for a JSON body a DELETE does not have)
    for method in ("DELETE", "PUT"):
        r = httpx.request(method, f"{url}/v1/completions", timeout=30, headers={"content-type": "application/json"})
        assert r.status_code == 405, (method, r.status_code, r.text)
    r = httpx.request("DELETE", f"{url}/v1/completions", timeout=30)
    assert r.status_code == 405, r.text
    r = httpx.request("DELETE", f"{url}/v1/completions", content=b"x=1", timeout=30,  # a body: still JSON only
                      headers={"content-type": "application/x-www-form-urlencoded"})
    _refused(r, "unsupported_media_type")


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost", "LOCALHOST", "app.localhost", "[::1]", "127.0.0.2"])
def test_serve_answers_its_own_names_and_same_origin_pages(server, host):
    port = _port(server.url)
    headers = {"host": f"{host}:{port}", "content-type": "application/json; charset=utf-8",
               "origin": f"http://{host.lower()}:{port}", "sec-fetch-site": "same-origin"}
    r = httpx.post(f"{server.url}/v1/completions", json=COMPLETION, headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    # a GET from any page still answers (reading it is the browser's CORS decision), and non-browser
    # clients (no Origin) are served as before
    assert httpx.get(f"{server.url}/v1/models", headers={"origin": "http://evil.example"}).status_code == 200
    assert httpx.post(f"{server.url}/v1/completions", json=COMPLETION, timeout=60).status_code == 200
    assert httpx.post(f"{server.url}/v1/completions", json=COMPLETION, timeout=60,
                      headers={"content-type": "application/vnd.api+json"}).status_code == 200


def test_serve_allowed_host_option_and_its_errors(tiny_checkpoint, tmp_path):
    """``--allowed-host`` adds a name (a LAN name a client uses); the bound address is answered too."""
    from .server_helpers import get, launch

    launch("allowed-host", tiny_checkpoint, tmp_path, "--allowed-host", "gpt.lan", "--allowed-host", ".corp.example")
    server = get("allowed-host")
    port = _port(server.url)
    for host, status in [("gpt.lan", 200), ("GPT.lan", 200), ("a.corp.example", 200), ("corp.example", 200),
                         ("gpt.lan.evil.example", 403), ("xcorp.example", 403)]:
        r = httpx.post(f"{server.url}/v1/completions", json=COMPLETION, headers={"host": f"{host}:{port}"},
                       timeout=60)
        assert r.status_code == status, (host, r.text)
    for bad in ("gpt.lan:8000", "http://gpt.lan", "gpt.lan/x", ""):
        r = subprocess.run([sys.executable, "-m", "gpt2lab", "serve", "--model", str(tiny_checkpoint), "--port", "0",
                            "--allowed-host", bad], capture_output=True, text=True, env=_env(), timeout=120)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("gpt2lab: error: --allowed-host") and r.stderr.count("\n") == 1, r.stderr


# -- gpt2lab review serve ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def review_server(tmp_path_factory):
    """``gpt2lab review serve`` (the console command) on a free port, with ``--allowed-host review.lan``."""
    from gpt2lab.review.reviewset import build, write_review_set

    tmp = tmp_path_factory.mktemp("review-guard")
    review = write_review_set(build({"p": [("x", " one"), ("y", " two")], "q": [("x", " uno"), ("y", " dos")]},
                                    "pairwise", seed=1), tmp / "r.jsonl")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "gpt2lab", "review", "serve", str(review), "--port", str(port),
                             "--allowed-host", "review.lan"], stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            env=_env())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        yield url, tmp / "r.log.jsonl"
    finally:
        proc.terminate()
        proc.wait(30)


def test_review_serve_refuses_rebinding_cross_site_and_non_json_requests(review_server):
    url, log = review_server
    port = _port(url)
    item = httpx.get(url + "/api/next", params={"reviewer": "ann"}).json()["item"]["id"]
    judgement = json.dumps({"reviewer": "mallory", "item": item, "choice": "A"}).encode()
    for what, headers, _, code in _attacks(port):
        r = httpx.post(url + "/api/judgements", content=judgement, headers=headers, timeout=30)
        assert r.status_code in (403, 415), (what, r.status_code, r.text)
        _refused(r, code)
    for path in ("/api/next?reviewer=ann", "/api/info", "/"):  # the items cannot be read through a rebound name
        _refused(httpx.get(url + path, headers={"host": f"evil.example:{port}"}), "host_not_allowed")
    assert not log.exists() or "mallory" not in log.read_text(encoding="utf-8")  # nothing was logged
    # the page's own requests, and the added name, are served
    ok = httpx.post(url + "/api/judgements", content=judgement, timeout=30,
                    headers={"content-type": "application/json", "origin": url, "host": f"127.0.0.1:{port}"})
    assert ok.status_code == 200, ok.text
    assert httpx.get(url + "/api/info", headers={"host": f"review.lan:{port}"}).status_code == 200
    assert [json.loads(line)["reviewer"] for line in log.read_text(encoding="utf-8").splitlines()] == ["mallory"]


# -- the mechanism, whatever FastAPI does with non-JSON bodies --------------------------------------------
class _Judgement(BaseModel):  # at module level: FastAPI resolves the (string) annotation here
    reviewer: str


def test_the_guard_does_not_rely_on_fastapi_refusing_non_json_bodies():
    """FastAPI before its strict content types (``fastapi==0.110``, which pyproject allowed) read a body without
    a content type as JSON; ``strict_content_type=False`` gives those semantics. The app below accepts such a
    cross-site "simple" POST; behind the guard it is refused."""
    from fastapi import FastAPI

    logged: list[str] = []
    app = FastAPI(strict_content_type=False)

    @app.post("/judge")
    def judge(body: _Judgement) -> dict:
        logged.append(body.reviewer)
        return {"ok": True}

    async def run(asgi, headers: dict[str, str]) -> int:
        transport = httpx.ASGITransport(app=asgi)
        async with httpx.AsyncClient(transport=transport, base_url="http://127.0.0.1:8008") as client:
            r = await client.post("/judge", content=b'{"reviewer": "mallory"}', headers=headers)
            return r.status_code

    import asyncio

    untyped: dict[str, str] = {}  # httpx adds no content type to raw bytes: a Blob with no type
    assert asyncio.run(run(app, untyped)) == 200 and logged == ["mallory"]  # the old semantics: accepted
    guarded = HostOriginGuard(app, hosts=allowed_hosts("127.0.0.1"))
    assert asyncio.run(run(guarded, untyped)) == 415
    assert asyncio.run(run(guarded, {"content-type": "application/json", "origin": "http://evil.example"})) == 403
    assert asyncio.run(run(guarded, {"content-type": "application/json", "host": "evil.example"})) == 403
    assert logged == ["mallory"]  # none of the refused requests ran
    assert asyncio.run(run(guarded, {"content-type": "application/json", "origin": "http://127.0.0.1:8008"})) == 200


def test_host_and_origin_rules():
    guard = HostOriginGuard(None, hosts=allowed_hosts("0.0.0.0", ["gpt.lan"]), origins=["https://app.example"])
    post = {"content-type": "application/json"}
    for host in ("127.0.0.1:80", "localhost", "[::1]:8000", "10.1.2.3:8000", "[fe80::1]", "gpt.lan:1", "x.localhost"):
        assert guard.refusal("POST", {**post, "host": host}) is None, host  # bound to every address: any IP
    for host in ("evil.example", "gpt.lan.evil.example", "", "a b", "user@127.0.0.1", "127.0.0.1:99999999"):
        assert guard.refusal("GET", {"host": host})[2] == "host_not_allowed", host
    loopback_only = HostOriginGuard(None, hosts=allowed_hosts("127.0.0.1"))
    assert loopback_only.refusal("GET", {"host": "10.1.2.3:8000"})[2] == "host_not_allowed"  # not its address
    assert guard.refusal("POST", {**post, "host": "gpt.lan:8000", "origin": "http://gpt.lan:8000"}) is None
    assert guard.refusal("POST", {**post, "host": "gpt.lan", "origin": "http://gpt.lan"}) is None
    assert guard.refusal("POST", {**post, "host": "gpt.lan", "origin": "https://gpt.lan"}) is None  # TLS proxy
    assert guard.refusal("POST", {**post, "host": "gpt.lan", "origin": "http://gpt.lan:8000"}) is not None
    assert guard.refusal("POST", {**post, "host": "gpt.lan", "origin": "https://app.example"}) is None  # CORS'
    assert guard.refusal("POST", {**post, "host": "gpt.lan", "origin": "https://app.example:8443"}) is not None
    assert HostOriginGuard(None, hosts=["*"]).refusal("GET", {"host": "anything.example"}) is None
    assert check_allowed_host("*.Corp.Example") == ".corp.example" and check_allowed_host("[::1]") == "::1"
    for bad in ("gpt.lan:80", "http://gpt.lan", "a/b", "", "a..b"):
        with pytest.raises(ValueError, match="--allowed-host"):
            check_allowed_host(bad)
