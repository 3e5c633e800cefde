"""Fuzz the running server from its own OpenAPI schema, and with hypothesis bodies built to hurt:
valid and invalid bodies alike, never a 5xx, and /health answering throughout."""

from __future__ import annotations

import pytest

schemathesis = pytest.importorskip("schemathesis")
pytest.importorskip("fastapi")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402

from .server_helpers import get, start_all  # noqa: E402

pytestmark = pytest.mark.slow
EXAMPLES = 12  # per operation and mode: bounded, the suite shares two cores


def test_openapi_fuzz_never_gives_a_server_error(tmp_path_factory, tiny_checkpoint):
    start_all(tmp_path_factory, tiny_checkpoint)
    server = get("timeout")  # a 2 s request timeout: whatever the fuzzer asks for costs at most that
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/v1/completions", "/v1/chat/completions", "/v1/models",
                                              "/tokenize", "/detokenize", "/health"}
    seen: dict[int, int] = {}
    for op in operations:
        # a GET without parameters has no invalid form to generate
        for mode in GenerationMode if op.method.upper() == "POST" else [GenerationMode.POSITIVE]:

            @settings(max_examples=EXAMPLES, deadline=None, database=None, derandomize=True,
                      suppress_health_check=list(HealthCheck))
            @given(case=op.as_strategy(generation_mode=mode))
            def call(case) -> None:
                response = case.call(base_url=server.url, timeout=60)
                seen[response.status_code] = seen.get(response.status_code, 0) + 1
                assert response.status_code < 500, (case.operation.label, case.body, response.text[:500])

            call()
    print(f"schemathesis: {sum(seen.values())} requests, statuses {dict(sorted(seen.items()))}")
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0, seen  # both kinds were exercised


# -- hypothesis bodies: extreme numbers, huge and odd Unicode, many stop strings --------------------
ODD_TEXT = ["\ud800", "\udfff", "a\udc00b", "\x00", "\u2028\u2029\x85\x0c", "\ufeff", "\u0301" * 3000,
            "🙂" * 2000, "<|endoftext|>", "\\ud800", "x" * 300_000, "hello " * 40_000, "\U0010ffff", "𝔘𝔫𝔦"]
NUMBERS = [0, -1, 1, 2**31, -(2**63), 2**64, 10**30, 5e-324, -5e-324, 1e308, -1e308, float("inf"), float("-inf"),
           float("nan"), 1e-45, 100.0, 100.0000001, 0.5, True, None]


def _bodies():
    from hypothesis import strategies as st

    text = st.one_of(st.text(max_size=50), st.sampled_from(ODD_TEXT),
                     st.lists(st.sampled_from(ODD_TEXT[:6] + ["a", " "]), max_size=20).map("".join))
    number = st.one_of(st.sampled_from(NUMBERS), st.floats(), st.integers(-(2**70), 2**70))
    small = st.one_of(st.integers(0, 6), number)
    token_ids = st.lists(st.one_of(st.integers(0, 50256), st.integers(-(2**40), 2**40)), max_size=30)
    prompt = st.one_of(text, st.lists(text, max_size=5), token_ids, st.lists(token_ids, max_size=4), number)
    sampling = {
        "max_tokens": small, "temperature": number, "top_p": number, "top_k": number, "min_p": number,
        "typical_p": number, "repetition_penalty": number, "presence_penalty": number,
        "frequency_penalty": number, "n": st.one_of(st.integers(0, 3), number), "seed": number,
        "stop": st.one_of(text, st.lists(text, max_size=40)),
        "logit_bias": st.dictionaries(st.one_of(text, st.integers(-5, 2**40).map(str)), number, max_size=8),
        "stream": st.booleans(), "no_repeat_ngram_size": small, "model": text, "user": text,
    }
    message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]),
                                     "content": st.one_of(text, st.lists(st.fixed_dictionaries(
                                         {"type": st.just("text"), "text": text}), max_size=3))})
    completions = st.fixed_dictionaries({"prompt": prompt}, optional={**sampling, "logprobs": small,
                                                                      "echo": st.booleans()})
    chat = st.fixed_dictionaries({"messages": st.lists(message, max_size=4)},
                                 optional={**sampling, "logprobs": st.booleans(), "top_logprobs": small,
                                           "max_completion_tokens": small})
    return st.one_of(completions.map(lambda b: ("/v1/completions", b)),
                     chat.map(lambda b: ("/v1/chat/completions", b)),
                     st.fixed_dictionaries({"prompt": text}).map(lambda b: ("/tokenize", b)),
                     st.fixed_dictionaries({"tokens": token_ids}).map(lambda b: ("/detokenize", b)))


def test_hostile_bodies_never_give_a_server_error(tmp_path_factory, tiny_checkpoint, tmp_path):
    """Extreme numbers (NaN, infinities, 2**70, 5e-324), lone surrogates, 300k-character strings, 40
    stop strings...: never a 5xx, and ``/health`` keeps answering within a second throughout."""
    import json
    from collections import Counter

    import httpx

    from .server_helpers import HealthPoller

    start_all(tmp_path_factory, tiny_checkpoint)
    server = get("robust")  # its own process (the poller measures it, not this one's GIL); --max-body-mb 1
    seen: Counter = Counter()
    poller = HealthPoller(server.url, tmp_path)
    client = httpx.Client(base_url=server.url, timeout=60, headers={"content-type": "application/json"})

    @settings(max_examples=HOSTILE_EXAMPLES, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(request=_bodies())
    def call(request) -> None:
        path, body = request
        content = json.dumps(body).encode()  # NaN and Infinity as Python writes them; surrogates as \ud800
        response = client.post(path, content=content)
        seen[response.status_code] += 1
        assert response.status_code < 500, (path, content[:300], response.text[:500])

    try:
        call()
    finally:
        samples = poller.samples()
        client.close()
    print(f"hostile bodies: {sum(seen.values())} requests, statuses {dict(sorted(seen.items()))}")
    assert seen[200] > 0 and seen[400] > 0, seen
    assert HealthPoller.within_a_second(samples), samples


HOSTILE_EXAMPLES = 100
