"""Prometheus metrics, all prefixed ``inpaint_``, on a registry owned by one app instance."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 900)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("inpaint_queue_depth", "Requests waiting in the queue.", registry=r)
        self.in_progress = Gauge("inpaint_in_progress", "Requests running on the GPU now.", registry=r)
        self.requests = Counter(
            "inpaint_requests", "Requests accepted, by app and mode (queue or sync).", ["app", "mode"], registry=r
        )
        self.completed = Counter(
            "inpaint_completed", "Requests finished, by app and outcome.", ["app", "outcome"], registry=r
        )
        self.failures = Counter(
            "inpaint_failures",
            "Requests that failed or were cancelled, by error_type.",
            ["app", "error_type"],
            registry=r,
        )
        self.latency = Histogram(
            "inpaint_latency_seconds",
            "Seconds per stage: queue (wait to start), total (submit to done), and the engine's stages.",
            ["app", "stage"],
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.batch_size = Histogram(
            "inpaint_batch_size", "Requests per GPU batch.", buckets=(1, 2, 3, 4, 6, 8, 16, 32, 64), registry=r
        )
        self.webhooks = Counter(
            "inpaint_webhook_attempts", "Webhook delivery attempts, by outcome.", ["outcome"], registry=r
        )
        self.ready = Gauge("inpaint_ready", "1 when the models are loaded and warm.", registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)
