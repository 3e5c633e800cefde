"""Fuzz the running server from its own OpenAPI schema: valid and invalid bodies alike, never a 5xx."""

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
    assert seen.get(200, 0) > 0 and seen.get(400, 0) > 0, seen  # both kinds were exercised
