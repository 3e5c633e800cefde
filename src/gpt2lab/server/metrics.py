"""Prometheus metrics of one server, in a registry of its own (two apps in one process never collide)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)


class ServerMetrics:
    """Counters, gauges and histograms named ``gpt2lab_*``."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("gpt2lab_requests", "HTTP requests answered, by endpoint and status code",
                                ["endpoint", "status"], registry=r)
        self.prompt_tokens = Counter("gpt2lab_prompt_tokens", "Prompt tokens admitted", registry=r)
        self.generation_tokens = Counter("gpt2lab_generation_tokens", "Tokens generated", registry=r)
        self.aborted = Counter("gpt2lab_aborted_requests", "Requests ended before finishing, by reason",
                               ["reason"], registry=r)
        self.engine_failures = Counter("gpt2lab_engine_failures", "Engine steps that failed as a whole (not "
                                       "attributable to one request); every request in flight ended", registry=r)
        self.rejected = Counter("gpt2lab_rejected_requests", "Requests refused with 429 (queue full)", registry=r)
        self.running = Gauge("gpt2lab_running_sequences", "Sequences in the running batch", registry=r)
        self.queue_depth = Gauge("gpt2lab_queue_depth", "Sequences admitted but not yet in the running batch",
                                 registry=r)
        self.in_flight = Gauge("gpt2lab_in_flight_sequences", "Sequences admitted and not yet finished",
                               registry=r)
        self.batch_size = Histogram("gpt2lab_batch_size", "Sequences decoded per engine step",
                                    buckets=_BATCH_BUCKETS, registry=r)
        self.step_seconds = Histogram("gpt2lab_step_seconds", "Duration of one engine step",
                                      buckets=_LATENCY_BUCKETS, registry=r)
        self.latency = Histogram("gpt2lab_request_latency_seconds", "Request latency, arrival to last token",
                                 ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("gpt2lab_time_to_first_token_seconds", "Arrival to first generated token",
                              ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
