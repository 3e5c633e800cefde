"""``GET /health``: whether the server can answer requests, and the faults it has seen, per model."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .serving_models import RETRY_AFTER_S, OpenAIServingModels, ServedModel


@dataclass(frozen=True)
class HealthReport:
    """``/health``'s answer: ``status_code`` (200 or 503), the JSON ``body`` and extra ``headers``."""

    status_code: int
    body: dict[str, Any]
    headers: dict[str, str] | None = None


def model_health(served: ServedModel) -> dict[str, Any]:
    """One model's part of the report: ``status`` (``loading``, ``error``, ``ok`` or ``degraded``), the counts of
    failed steps and requests, the last step's error, its adapters."""
    scheduler = served.scheduler
    if not scheduler.ready.is_set():
        return {"status": "loading"}
    if scheduler.load_error is not None:
        return {"status": "error", "error": str(scheduler.load_error)}
    # a failed step (out of memory, a broken model) ended every request in flight: still serving,
    # but "degraded" until a step succeeds again
    body = {"status": "degraded" if scheduler.last_engine_error else "ok", "engine_failures": scheduler.engine_failures,
            "request_failures": scheduler.request_failures, "adapters": sorted(served.adapters)}
    if scheduler.last_engine_error:
        body["last_engine_error"] = scheduler.last_engine_error
    return body


class ServingHealth:
    """The engine threads' state, as load balancers and ``gpt2lab serve`` read it."""

    def __init__(self, models: OpenAIServingModels) -> None:
        self.models = models

    def check_health(self) -> HealthReport:
        """200 once every model is loaded and its engine runs: ``status`` ``ok``, or ``degraded`` while a model's
        last step failed as a whole; ``models`` gives each model's own report (:func:`model_health`), and the
        top level the first model's ``model`` name and the failure counts of all. 503 while a model loads
        (``Retry-After``) or if one failed to load."""
        reports = {served.id: model_health(served) for served in self.models.served}
        statuses = [r["status"] for r in reports.values()]
        if "loading" in statuses:
            return HealthReport(503, {"status": "loading", "models": reports}, {"Retry-After": str(RETRY_AFTER_S)})
        if "error" in statuses:
            errors = "; ".join(f"{name}: {r['error']}" for name, r in reports.items() if r["status"] == "error")
            return HealthReport(503, {"status": "error", "error": errors, "models": reports})
        body: dict[str, Any] = {
            "status": "degraded" if "degraded" in statuses else "ok", "model": self.models.default.id,
            "engine_failures": sum(r["engine_failures"] for r in reports.values()),
            "request_failures": sum(r["request_failures"] for r in reports.values())}
        last = next((r["last_engine_error"] for r in reports.values() if "last_engine_error" in r), None)
        if last is not None:
            body["last_engine_error"] = last
        body["models"] = reports
        return HealthReport(200, body)
