"""Prometheus metrics of one server, in a registry of its own (two apps in one process never collide).

Everything that belongs to one served model carries a ``model`` label (its served name): a server of
several models reports each one's tokens, batch, queue, failures and prefix cache apart
(``sum without (model)`` adds them up). HTTP requests are counted by endpoint and status only.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """Counters, gauges and histograms named ``gpt2lab_*``; :meth:`for_model` gives one model's view."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        m = ["model"]
        self.requests = Counter("gpt2lab_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("gpt2lab_prompt_tokens", "Prompt tokens admitted", m, registry=r)
        self.prefill_tokens = Counter("gpt2lab_prefill_tokens", "Prompt tokens computed by prefills (those "
                                      "found in the prefix cache are not)", m, registry=r)
        self.generation_tokens = Counter("gpt2lab_generation_tokens", "Tokens generated", m, registry=r)
        self.aborted = Counter("gpt2lab_aborted_requests", "Requests ended before finishing, by reason",
                               ["reason", "model"], registry=r)
        self.engine_failures = Counter("gpt2lab_engine_failures", "Engine steps that failed as a whole (not "
                                       "attributable to one request); every request in flight ended", m, registry=r)
        self.rejected = Counter("gpt2lab_rejected_requests", "Requests refused with 429 (queue full)", m, registry=r)
        self.running = Gauge("gpt2lab_running_sequences", "Sequences in the running batch", m, registry=r)
        self.queue_depth = Gauge("gpt2lab_queue_depth", "Sequences admitted but not yet in the running batch", m,
                                 registry=r)
        self.in_flight = Gauge("gpt2lab_in_flight_sequences", "Sequences admitted and not yet finished", m,
                               registry=r)
        self.batch_size = Histogram("gpt2lab_batch_size", "Sequences decoded per engine step", m,
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram("gpt2lab_step_seconds", "Duration of one engine step", m,
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("gpt2lab_request_latency_seconds", "Request latency, arrival to last token",
                                 ["endpoint", "model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("gpt2lab_time_to_first_token_seconds", "Arrival to first generated token",
                              ["endpoint", "model"], buckets=_LATENCY_BUCKETS, registry=r)
        self.prefix_hits = Counter("gpt2lab_prefix_cache_hits", "Prompts that found a cached prefix", m, registry=r)
        self.prefix_misses = Counter("gpt2lab_prefix_cache_misses", "Prompts that found no cached prefix", m,
                                     registry=r)
        self.prefix_saved = Counter("gpt2lab_prefix_cache_saved_tokens", "Prompt tokens taken from the prefix "
                                    "cache instead of prefilled", m, registry=r)
        self.prefix_bytes = Gauge("gpt2lab_prefix_cache_bytes", "Bytes of keys and values in the prefix cache", m,
                                  registry=r)
        self.prefix_blocks = Gauge("gpt2lab_prefix_cache_blocks", "Blocks in the prefix cache", m, registry=r)

    def for_model(self, model: str) -> ModelMetrics:
        """The metrics of the served model ``model`` (its label value)."""
        return ModelMetrics(self, model)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class ModelMetrics:
    """One served model's metrics: each ``model``-labelled metric of a :class:`ServerMetrics` with the label
    filled in (``latency``, ``ttft`` and ``aborted`` take their other label)."""

    def __init__(self, metrics: ServerMetrics, model: str) -> None:
        self.model, self._metrics = model, metrics
        for name in ("prompt_tokens", "prefill_tokens", "generation_tokens", "engine_failures", "rejected", "running",
                     "queue_depth", "in_flight", "batch_size", "step_seconds", "prefix_hits", "prefix_misses",
                     "prefix_saved", "prefix_bytes", "prefix_blocks"):
            setattr(self, name, getattr(metrics, name).labels(model=model))

    def aborted(self, reason: str):  # noqa: ANN201 - a prometheus child
        return self._metrics.aborted.labels(reason=reason, model=self.model)

    def latency(self, endpoint: str):  # noqa: ANN201
        return self._metrics.latency.labels(endpoint=endpoint, model=self.model)

    def ttft(self, endpoint: str):  # noqa: ANN201
        return self._metrics.ttft.labels(endpoint=endpoint, model=self.model)
