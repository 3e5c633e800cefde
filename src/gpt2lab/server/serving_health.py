"""``GET /health``: whether the server can answer requests, and the faults it has seen."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from .scheduler import Scheduler
from .serving_models import RETRY_AFTER_S, OpenAIServingModels


@dataclass(frozen=True)
class HealthReport:
    """``/health``'s answer: ``status_code`` (200 or 503), the JSON ``body`` and extra ``headers``."""

    status_code: int
    body: dict[str, Any]
    headers: dict[str, str] | None = None


class ServingHealth:
    """The engine thread's state, as load balancers and ``gpt2lab serve`` read it."""

    def __init__(self, scheduler: Scheduler, models: OpenAIServingModels) -> None:
        self.scheduler, self.models = scheduler, models

    def check_health(self) -> HealthReport:
        """200 once the model is loaded and the engine runs (``status`` ``ok``, or ``degraded`` after a step
        failed as a whole, until one succeeds); 503 while loading (``Retry-After``) or if loading failed."""
        scheduler = self.scheduler
        if not scheduler.ready.is_set():
            return HealthReport(503, {"status": "loading"}, {"Retry-After": str(RETRY_AFTER_S)})
        if scheduler.load_error is not None:
            return HealthReport(503, {"status": "error", "error": str(scheduler.load_error)})
        # a failed step (out of memory, a broken model) ended every request in flight: still serving,
        # but "degraded" until a step succeeds again
        body = {"status": "degraded" if scheduler.last_engine_error else "ok",
                "model": self.models.served_name(scheduler.generator), "engine_failures": scheduler.engine_failures,
                "request_failures": scheduler.request_failures}
        if scheduler.last_engine_error:
            body["last_engine_error"] = scheduler.last_engine_error
        return HealthReport(200, body)
