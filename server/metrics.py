"""Prometheus metrics, all prefixed ``inpaint_``, on a registry owned by one app instance.

An API node also exports every GPU worker the store knows (``inpaint_worker_*``, labelled by worker and device),
read from the workers' node rows at each scrape, so one scrape target shows the whole deployment.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

log = logging.getLogger("inpaint-server")

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 15, 30, 60, 120, 300, 900)
BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 16, 32, 64)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.queue_depth = Gauge("inpaint_queue_depth", "Requests waiting in the queue (the store's).", registry=r)
        self.in_progress = Gauge("inpaint_in_progress", "Requests running on any GPU now (the store's).", registry=r)
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
            "inpaint_batch_size", "Requests per GPU batch (this process's worker).", buckets=BATCH_BUCKETS, registry=r
        )
        self.webhooks = Counter(
            "inpaint_webhook_attempts", "Webhook delivery attempts, by outcome.", ["outcome"], registry=r
        )
        self.ready = Gauge("inpaint_ready", "1 when this node is ready (see /health/ready).", registry=r)

    def export_workers(self, nodes: Callable[[], list[Any]], lease_s: float) -> None:
        """Export every worker node the store knows at each scrape (``nodes()`` reads them)."""
        self.registry.register(WorkerCollector(nodes, lease_s))

    def render(self) -> bytes:
        return generate_latest(self.registry)


class WorkerCollector(Collector):
    """``inpaint_worker_*`` from the store's node rows: liveness and state, busy seconds, batches and rows, and a
    histogram of batch sizes, per worker and device."""

    def __init__(self, nodes: Callable[[], list[Any]], lease_s: float) -> None:
        self.nodes = nodes
        self.lease_s = lease_s

    def describe(self) -> list[Any]:
        return []  # read at scrape time only: never at registration

    def collect(self) -> Iterator[Any]:
        labels = ["worker", "device"]
        up = GaugeMetricFamily(
            "inpaint_worker_up", "1 while a GPU worker heartbeats and is ready to run.", labels=labels
        )
        state = GaugeMetricFamily(
            "inpaint_worker_state", "A GPU worker's state (1 for its current one).", labels=[*labels, "state"]
        )
        busy = CounterMetricFamily(
            "inpaint_worker_busy_seconds", "Seconds a GPU worker's engine ran batches.", labels=labels
        )
        batches = CounterMetricFamily("inpaint_worker_batches", "Batches a GPU worker ran.", labels=labels)
        rows = CounterMetricFamily("inpaint_worker_rows", "Image rows a GPU worker generated.", labels=labels)
        sizes = HistogramMetricFamily("inpaint_worker_batch_size", "Requests per batch, by GPU worker.", labels=labels)
        try:
            nodes = [n for n in self.nodes() if n.is_worker]
        except Exception as exc:  # the store is down: the scrape still answers, without workers
            log.debug("worker metrics skipped: %s", exc)
            nodes = []
        now = time.time()
        for node in nodes:
            key = [node.name, node.device or ""]
            live = node.heartbeat_at >= now - self.lease_s
            up.add_metric(key, 1.0 if live and node.state == "ready" else 0.0)
            state.add_metric([*key, node.state if live else "gone"], 1.0)
            stats = node.stats or {}
            busy.add_metric(key, float(stats.get("busy_s", 0.0)))
            batches.add_metric(key, float(stats.get("batches", 0)))
            rows.add_metric(key, float(stats.get("rows", 0)))
            counts = {int(k): int(v) for k, v in (stats.get("sizes") or {}).items()}
            buckets, total = [], 0
            for bound in BATCH_BUCKETS:
                total = sum(n for size, n in counts.items() if size <= bound)
                buckets.append((str(float(bound)), float(total)))
            count = sum(counts.values())
            buckets.append(("+Inf", float(count)))
            sizes.add_metric(key, buckets, sum_value=float(sum(size * n for size, n in counts.items())))
        yield from (up, state, busy, batches, rows, sizes)
