"""Several models and LoRA adapters in one real ``gpt2lab serve``: routing by the request's ``model``, ``/v1/models``,
404 for unknown names, rows of different adapters in one batch giving what each gives alone, run-time loading and
unloading (refused without ``--allow-runtime-lora``), the memory budget, and prefix reuse over a chat."""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import gpt2lab

from .conftest import make_peft_adapter, tiny_model
from .server_helpers import _env, free_port, launch, launch_in_thread, metric_value
from .server_helpers import get as get_server

pytest.importorskip("fastapi")
pytestmark = pytest.mark.slow

KEY = "multi-key"
PROMPTS = ["The quick brown fox", "Once upon a time", "Hello there, how"]


@pytest.fixture(scope="module")
def base_b(tmp_path_factory):
    """A second base model, with a long context (for the chat of many turns)."""
    return tiny_model(tmp_path_factory, "base-b", seed=5, n_positions=1024)


@pytest.fixture(scope="module")
def late_adapter(tmp_path_factory, base_b):
    """An adapter of base-b that no server starts with (loaded at run time)."""
    return make_peft_adapter(tmp_path_factory.mktemp("late") / "late", base_b[0], seed=13)


@pytest.fixture(scope="module")
def multi(tmp_path_factory, tiny_checkpoint, lora_adapters, base_b):
    """``gpt2lab serve`` with two base models, two adapters on the first, run-time LoRA allowed (with the key)."""
    logs = tmp_path_factory.mktemp("multi-logs")
    launch("multi", f"base-a={tiny_checkpoint}", logs, "--model", f"base-b={base_b[0]}",
           "--lora", f"ad-qkv={lora_adapters['ad-qkv']},base=base-a", "--lora", f"ad-all={lora_adapters['ad-all']}",
           "--allow-runtime-lora", "--max-batch", "16", api_key=KEY)
    launch_in_thread("multi-plain", tiny_checkpoint, logs, lora_modules={"ad-qkv": lora_adapters["ad-qkv"]},
                     prefix_cache_mb=0)
    return get_server("multi")


def _complete(server, model: str, prompt: str, **fields) -> dict:
    r = httpx.post(f"{server.url}/v1/completions", headers=server.headers, timeout=120,
                   json={"model": model, "prompt": prompt, "max_tokens": 8, "seed": 3, "logprobs": 1, **fields})
    assert r.status_code == 200, r.text
    return r.json()["choices"][0]


def _tokens(choice: dict) -> tuple[list[str], list[float]]:
    return choice["logprobs"]["tokens"], choice["logprobs"]["token_logprobs"]


def test_models_lists_every_model_and_adapter_and_routes_by_name(multi, tiny_checkpoint, base_b):
    r = httpx.get(f"{multi.url}/v1/models", headers=multi.headers, timeout=30)
    assert r.status_code == 200, r.text
    cards = {m["id"]: m for m in r.json()["data"]}
    assert set(cards) == {"base-a", "base-b", "ad-qkv", "ad-all"}
    assert cards["ad-qkv"]["parent"] == "base-a" and cards["ad-all"]["parent"] == "base-a"
    for name, path in (("base-a", tiny_checkpoint), ("base-b", base_b[0])):
        choice = _complete(multi, name, PROMPTS[0], temperature=0)
        alone = gpt2lab.load(path).generate(PROMPTS[0], max_new_tokens=8, temperature=0)[0]
        assert choice["text"] == alone.text, name
    assert _complete(multi, "base-a", PROMPTS[0], temperature=0)["text"] != \
        _complete(multi, "base-b", PROMPTS[0], temperature=0)["text"]


def test_unknown_model_is_404_model_not_found(multi):
    r = httpx.post(f"{multi.url}/v1/completions", headers=multi.headers, json={"model": "gpt-4", "prompt": "x"},
                   timeout=30)
    assert r.status_code == 404, r.text
    error = r.json()["error"]
    assert (error["type"], error["param"], error["code"]) == ("invalid_request_error", "model", "model_not_found")
    assert "'gpt-4'" in error["message"]


def test_requests_of_different_adapters_batched_together_give_what_each_gives_alone(multi, tiny_checkpoint,
                                                                                  lora_adapters):
    plan = [(model, prompt) for prompt in PROMPTS for model in ("base-a", "ad-qkv", "ad-all")]
    alone = {key: _tokens(_complete(multi, *key)) for key in plan}  # one at a time
    with ThreadPoolExecutor(len(plan)) as pool:  # all at once: they share the running batch
        together = dict(zip(plan, pool.map(lambda key: _tokens(_complete(multi, *key)), plan)))
    assert together == alone
    # and an adapter's request is what the library gives with that adapter loaded, seeded
    lib = gpt2lab.load(tiny_checkpoint)
    lib.load_lora_adapter("ad-all", lora_adapters["ad-all"])
    (c,) = lib.generate(PROMPTS[1], max_new_tokens=8, seed=3, adapter="ad-all")
    assert _complete(multi, "ad-all", PROMPTS[1])["text"] == c.text
    assert len({tuple(alone[m, PROMPTS[1]][0]) for m in ("base-a", "ad-qkv", "ad-all")}) == 3


def test_health_and_metrics_report_each_model(multi):
    health = httpx.get(f"{multi.url}/health", timeout=30).json()
    assert health["status"] == "ok" and set(health["models"]) == {"base-a", "base-b"}
    assert sorted(health["models"]["base-a"]["adapters"]) == ["ad-all", "ad-qkv"]
    _complete(multi, "base-b", "count me")
    text = httpx.get(f"{multi.url}/metrics", timeout=30).text
    assert metric_value(text, "gpt2lab_generation_tokens_total", model="base-b") >= 8
    assert 'model="base-a"' in text


def test_adapters_load_and_unload_at_run_time_with_the_key(multi, late_adapter):
    body = {"lora_name": "late", "lora_path": str(late_adapter), "base_model_name": "base-b"}
    assert httpx.post(f"{multi.url}/v1/load_lora_adapter", json=body, timeout=60).status_code == 401  # no key
    r = httpx.post(f"{multi.url}/v1/load_lora_adapter", json=body, headers=multi.headers, timeout=60)
    assert r.status_code == 200, r.text
    ids = {m["id"] for m in httpx.get(f"{multi.url}/v1/models", headers=multi.headers, timeout=30).json()["data"]}
    assert "late" in ids
    adapted = _complete(multi, "late", PROMPTS[2], temperature=0)["text"]
    assert adapted != _complete(multi, "base-b", PROMPTS[2], temperature=0)["text"]
    again = httpx.post(f"{multi.url}/v1/load_lora_adapter", json=body, headers=multi.headers, timeout=60)
    assert again.status_code == 400 and "late" in again.json()["error"]["message"]
    r = httpx.post(f"{multi.url}/v1/unload_lora_adapter", json={"lora_name": "late"}, headers=multi.headers,
                   timeout=60)
    assert r.status_code == 200, r.text
    gone = httpx.post(f"{multi.url}/v1/completions", headers=multi.headers, json={"model": "late", "prompt": "x"},
                      timeout=30)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"
    r = httpx.post(f"{multi.url}/v1/unload_lora_adapter", json={"lora_name": "late"}, headers=multi.headers,
                   timeout=60)
    assert r.status_code == 404, r.text


def test_run_time_lora_is_refused_without_the_flag(multi, late_adapter):
    plain = get_server("multi-plain")
    r = httpx.post(f"{plain.url}/v1/load_lora_adapter", json={"lora_name": "late", "lora_path": str(late_adapter)},
                   timeout=60)
    assert r.status_code == 403 and r.json()["error"]["code"] == "runtime_lora_disabled", r.text
    r = httpx.post(f"{plain.url}/v1/unload_lora_adapter", json={"lora_name": "ad-qkv"}, timeout=60)
    assert r.status_code == 403, r.text
    assert _complete(plain, "ad-qkv", PROMPTS[0])["text"]  # the adapter it started with still serves


def test_a_memory_budget_too_small_is_refused_at_start_naming_the_models(tiny_checkpoint, base_b):
    cmd = [sys.executable, "-m", "gpt2lab", "serve", "--model", f"base-a={tiny_checkpoint}", "--model",
           f"base-b={base_b[0]}", "--max-models-memory", "1MB", "--port", str(free_port())]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(), timeout=300)
    assert out.returncode != 0
    assert "base-a" in out.stderr and "base-b" in out.stderr and "1MB" in out.stderr.replace(" ", ""), out.stderr


def _chat(server, model: str, turns: int) -> tuple[list[str], list[float]]:
    """A seeded chat of ``turns`` turns, the whole conversation sent each turn; the replies and, per turn, the
    prompt tokens the server's prefills computed."""
    messages, replies, prefilled = [{"role": "system", "content": "You are a helpful assistant. " * 4}], [], []
    for turn in range(turns):
        messages.append({"role": "user", "content": f"Question number {turn}: what comes next in the story?"})
        before = server.metric("gpt2lab_prefill_tokens_total", model=model)
        r = httpx.post(f"{server.url}/v1/chat/completions", headers=server.headers, timeout=120,
                       json={"model": model, "messages": messages, "max_tokens": 12, "seed": turn})
        assert r.status_code == 200, r.text
        reply = r.json()["choices"][0]["message"]["content"]
        prefilled.append(server.metric("gpt2lab_prefill_tokens_total", model=model) - before)
        replies.append(reply)
        messages.append({"role": "assistant", "content": reply})
    return replies, prefilled


def test_prefix_reuse_gives_the_same_chat_and_prefills_only_what_is_new(multi, tmp_path_factory, base_b):
    launch_in_thread("multi-nocache", base_b[0], tmp_path_factory.mktemp("nocache-logs"), model_name="base-b",
                     prefix_cache_mb=0)
    plain = get_server("multi-nocache")
    hits = multi.metric("gpt2lab_prefix_cache_hits_total", model="base-b")
    with_cache, computed = _chat(multi, "base-b", 10)
    without, full = _chat(plain, "base-b", 10)
    assert with_cache == without
    # without the cache every turn prefills the whole conversation: O(turns^2) in all; with it, about what
    # the turn added (the last reply and the new question, plus less than a block)
    assert full[-1] > 5 * computed[-1] and sum(full) > 3 * sum(computed)
    assert all(c <= f for c, f in zip(computed, full))
    assert multi.metric("gpt2lab_prefix_cache_hits_total", model="base-b") >= hits + 9
    assert multi.metric("gpt2lab_prefix_cache_saved_tokens_total", model="base-b") > 0
    assert multi.metric("gpt2lab_prefix_cache_bytes", model="base-b") > 0


def test_the_playground_compares_a_base_model_with_its_adapter(multi):
    """In real headless Chromium: side A on base-a, side B on adapter ad-all, greedy; each side shows what the API
    gives for its model."""
    import shutil
    from pathlib import Path

    sync_api = pytest.importorskip("playwright.sync_api")
    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    if not Path(chromium).exists():
        pytest.skip("needs Debian's chromium")
    from .test_server_playground import ARGS

    prompt = "The meaning of life is"
    expected = {side: prompt + _complete(multi, model, prompt, temperature=0, max_tokens=10)["text"]
                for side, model in (("a", "base-a"), ("b", "ad-all"))}
    assert expected["a"] != expected["b"]
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(multi.url + "/")
            page.fill("#apikey", KEY)
            page.dispatch_event("#apikey", "change")
            sync_api.expect(page.locator("#model-b option")).to_have_count(4)
            page.select_option("#model-a", "base-a")
            page.select_option("#model-b", "ad-all")
            page.fill("#prompt", prompt)
            for side in "ab":
                page.fill(f"#max-tokens-{side}", "10")
                page.fill(f"#temperature-{side}", "0")
            page.click("#generate")
            for side in "ab":
                sync_api.expect(page.locator(f"#stats-{side}")).to_contain_text("finished", timeout=60_000)
                assert page.locator(f"#output-{side}").inner_text() == expected[side], side
        finally:
            browser.close()


def test_review_make_generates_with_a_running_server(multi, tmp_path):
    """``gpt2lab review make --server URL --model base-a --model ad-all``: the sources are the served model and its
    adapter, with what the server gives for those settings."""
    import json

    from typer.testing import CliRunner

    from gpt2lab.cli.main import app

    out = tmp_path / "review.jsonl"
    result = CliRunner().invoke(app, ["review", "make", "--server", multi.url, "--api-key", KEY, "--model", "base-a",
                                      "--model", "ad-all", "--temperature", "0", "--max-new-tokens", "8",
                                      "-o", str(out), *PROMPTS[:2]])
    assert result.exit_code == 0, result.output
    assert "from 2 sources (base-a, ad-all)" in result.output
    text = out.read_text()
    for model in ("base-a", "ad-all"):
        r = httpx.post(f"{multi.url}/v1/completions", headers=multi.headers, timeout=60,
                       json={"model": model, "prompt": PROMPTS[0], "max_tokens": 8, "temperature": 0, "top_k": 50})
        assert json.dumps(r.json()["choices"][0]["text"])[1:-1] in text, model
    bad = CliRunner().invoke(app, ["review", "make", "--server", multi.url, "--api-key", KEY, "--model", "base-a",
                                   "--model", "nope", "-o", str(tmp_path / "x.jsonl"), PROMPTS[0]])
    assert bad.exit_code != 0 and "'nope'" in bad.output and "404" in bad.output


def test_review_make_chats_with_a_running_server(multi, tmp_path):
    """``review make --server URL --chat --system S``: each prompt is the user's message of a chat completion of
    the served model or adapter, and the review holds those replies (main's chat branch beside --server)."""
    import json

    from typer.testing import CliRunner

    from gpt2lab.cli.main import app

    out = tmp_path / "review.jsonl"
    result = CliRunner().invoke(app, ["review", "make", "--server", multi.url, "--api-key", KEY, "--model", "base-a",
                                      "--model", "ad-all", "--chat", "--system", "Be brief.", "--temperature", "0",
                                      "--max-new-tokens", "8", "-o", str(out), PROMPTS[0]])
    assert result.exit_code == 0, result.output
    text = out.read_text()
    for model in ("base-a", "ad-all"):
        r = httpx.post(f"{multi.url}/v1/chat/completions", headers=multi.headers, timeout=60,
                       json={"model": model, "max_tokens": 8, "temperature": 0, "top_k": 50,
                             "messages": [{"role": "system", "content": "Be brief."},
                                          {"role": "user", "content": PROMPTS[0]}]})
        assert r.status_code == 200, r.text
        assert json.dumps(r.json()["choices"][0]["message"]["content"])[1:-1] in text, model


def test_structured_outputs_and_chat_templates_per_model(multi):
    """Each served model and adapter answers structured-output requests (compiled for its own tokenizer) on both
    endpoints, and renders chats in its own render processes (an adapter in its base model's)."""
    import json

    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"],
              "additionalProperties": False}
    for model in ("base-a", "base-b", "ad-all"):
        r = httpx.post(f"{multi.url}/v1/completions", headers=multi.headers, timeout=60,
                       json={"model": model, "prompt": "pick:", "max_tokens": 8,
                             "structured_outputs": {"choice": ["left", "right"]}})
        assert r.status_code == 200, (model, r.text)
        assert r.json()["choices"][0]["text"] in ("left", "right") and r.json()["model"] == model
        r = httpx.post(f"{multi.url}/v1/chat/completions", headers=multi.headers, timeout=60,
                       json={"model": model, "max_tokens": 40, "messages": [{"role": "user", "content": "a number"}],
                             "response_format": {"type": "json_schema",
                                                 "json_schema": {"name": "n", "schema": schema}}})
        assert r.status_code == 200, (model, r.text)
        reply = r.json()["choices"][0]
        if reply["finish_reason"] == "stop":
            assert isinstance(json.loads(reply["message"]["content"])["n"], int)


def test_a_broken_adapter_or_name_at_run_time_is_a_400_naming_the_field(multi, late_adapter, tmp_path):
    """A truncated adapter file was a 500 (CheckpointError escaped the handler); a name with a terminal escape
    was accepted and then listed and logged."""
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_bytes((late_adapter / "adapter_config.json").read_bytes())
    weights = next(late_adapter.glob("adapter_model.*"))
    (broken / weights.name).write_bytes(weights.read_bytes()[:5000])
    for body, param in (({"lora_name": "broken", "lora_path": str(broken)}, "lora_path"),
                        ({"lora_name": "\x1b[31mred", "lora_path": str(late_adapter)}, "lora_name"),
                        ({"lora_name": "", "lora_path": str(late_adapter)}, "lora_name")):
        r = httpx.post(f"{multi.url}/v1/load_lora_adapter", json={**body, "base_model_name": "base-b"},
                       headers=multi.headers, timeout=60)
        assert r.status_code == 400, r.text
        assert r.json()["error"]["param"] == param, r.text
    assert "broken" in httpx.post(f"{multi.url}/v1/load_lora_adapter", headers=multi.headers, timeout=60, json={
        "lora_name": "broken", "lora_path": str(broken)}).json()["error"]["message"]
    assert _complete(multi, "base-b", PROMPTS[0])["text"]  # the server goes on
