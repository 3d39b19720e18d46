"""How much the queue takes: the work the live GPU workers can finish within ``queue_max_wait_s``.

fal's clients retry a 429 for a few seconds without reading ``Retry-After`` (JS gives up after about 7 s), so
a 429 is only worth sending when a retry soon can succeed, and a full queue should be rare. The bound
therefore counts work, not requests: the image rows waiting against the rows per second the live workers have
shown (busy seconds and rows from their node rows in the store), times ``queue_max_wait_s``. At the bound,
room for the next request comes as soon as the GPUs finish a few rows, and ``Retry-After`` says when.
``max_queue_size`` stays as a hard cap on the number of requests, whatever the throughput.

A worker that has not run enough to be measured (a restart: its models are still loading) is taken to do what
one worker did when last measured, which is kept in the store, so a restart does not shrink the bound to the
low ``queue_assumed_rows_per_s`` used before any measurement.

Submits stay cheap: the queue's totals are read from the store at most every :data:`TOTALS_REFRESH_S` (this
node's own submits are added meanwhile) and the workers' throughput every :data:`RATE_REFRESH_S`; a refusal
is always decided on totals read just then.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..http.errors import TooManyRequests
from ..settings import Settings
from .leases import can_run
from .store import JobStore, NodeRow

MIN_MEASURED_ROWS = 8  # image rows a worker must have run before its own throughput replaces the assumed one
TOTALS_REFRESH_S = 1.0
RATE_REFRESH_S = 5.0
MAX_RETRY_AFTER_S = 60
PER_WORKER_COUNTER = "worker_milli_rows_per_s"  # one worker's measured throughput, in the store's counters


@dataclass(frozen=True)
class Throughput:
    """What the live GPU workers finish together: image rows per second."""

    rows_per_s: float
    workers: int  # live workers counted (0: none alive, one assumed)
    measured: int  # how many of them had run enough to be measured
    measured_rows_per_s: float = 0.0  # the part of rows_per_s those measured workers did

    def describe(self) -> str:
        if self.workers == 0:
            return f"{self.rows_per_s:.2f} image rows/s (assumed: no GPU worker is alive)"
        how = "measured" if self.measured == self.workers else "assumed" if not self.measured else "measured/assumed"
        return f"{self.rows_per_s:.2f} image rows/s ({how}) on {self.workers} GPU worker(s)"


def throughput(nodes: Iterable[NodeRow], now: float, lease_s: float, assumed_rows_per_s: float) -> Throughput:
    """The live workers' summed throughput: each worker's rows over its busy seconds once it has run
    :data:`MIN_MEASURED_ROWS` rows, ``assumed_rows_per_s`` before that; one assumed worker when none is alive.
    A draining worker counts: the queue it leaves runs on it after its restart (or on the others)."""
    workers, measured, measured_rate = 0, 0, 0.0
    for node in nodes:
        if not can_run(node, now, lease_s):
            continue
        workers += 1
        rows = float(node.stats.get("rows", 0) or 0)
        busy_s = float(node.stats.get("busy_s", 0.0) or 0.0)
        if rows >= MIN_MEASURED_ROWS and busy_s > 0:
            measured_rate += rows / busy_s
            measured += 1
    assumed = (max(workers, 1) - measured) * assumed_rows_per_s
    return Throughput(measured_rate + assumed, workers, measured, measured_rate)


class QueueBound:
    """Admission to the queue (see the module): :meth:`admit` before a job is written, :meth:`added` after."""

    def __init__(
        self,
        store: JobStore,
        settings: Settings,
        nodes: Callable[[], list[NodeRow]],
        clock: Callable[[], float],
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.store = store
        self.settings = settings
        self.nodes = nodes
        self.clock = clock  # the store's time (heartbeats)
        self.monotonic = monotonic  # when to read again
        self.requests = self.rows = 0  # queued, as last read plus this node's submits since
        self.rate = Throughput(settings.queue_assumed_rows_per_s, 0, 0)
        self.per_worker: float | None = None  # rows/s of one worker as last measured, by any node, in any run
        self._totals_at = self._rate_at = -math.inf

    def admit(self, rows: int) -> None:
        """Raise :class:`TooManyRequests` (``queue_full``) unless the queue has room for a request of ``rows``
        image rows."""
        now = self.monotonic()
        fresh = now - self._totals_at >= TOTALS_REFRESH_S
        if fresh:
            self._read_totals(now)
        if now - self._rate_at >= RATE_REFRESH_S:
            self._read_rate(now)
        refusal = self.refusal(rows)
        if refusal is not None and not fresh:  # decided on totals up to a second old: look again first
            self._read_totals(now)
            refusal = self.refusal(rows)
        if refusal is not None:
            raise refusal

    def added(self, rows: int) -> None:
        """A request of ``rows`` image rows was queued by this node."""
        self.requests += 1
        self.rows += rows

    def refusal(self, rows: int) -> TooManyRequests | None:
        """Why a request of ``rows`` image rows does not fit the queue as last read, or None when it does."""
        s, rate = self.settings, self.rate.rows_per_s
        if self.requests >= s.max_queue_size:
            rows_each = self.rows / max(self.requests, 1)
            wait = (self.requests - s.max_queue_size + 1) * rows_each / rate
            return _full(f"{self.requests} requests are waiting, the most this server queues (max_queue_size)", wait)
        bound = rate * s.queue_max_wait_s
        if self.rows == 0 or self.rows + rows <= bound:  # an empty queue takes any request: it can never fit later
            return None
        wait = (self.rows + rows - bound) / rate
        return _full(
            f"the {self.rows} image rows waiting take about {self.rows / rate:.0f} s at {self.rate.describe()}, and "
            f"this server queues at most {s.queue_max_wait_s:g} s of work (queue_max_wait_s); this request adds "
            f"{rows}",
            wait,
        )

    def _read_totals(self, now: float) -> None:
        self.requests, self.rows = self.store.queued_totals()
        self._totals_at = now

    def _read_rate(self, now: float) -> None:
        """The workers' throughput; a worker not measured yet (models loading after a restart, say) is taken to
        do what one worker was last measured to do, kept in the store across restarts, else the assumed rate."""
        if self.per_worker is None:
            stored = self.store.counter(PER_WORKER_COUNTER)
            self.per_worker = stored / 1000 if stored else None
        assumed = self.per_worker or self.settings.queue_assumed_rows_per_s
        self.rate = throughput(self.nodes(), self.clock(), self.settings.lease_s, assumed)
        if self.rate.measured:
            per_worker = self.rate.measured_rows_per_s / self.rate.measured
            if self.per_worker is None or abs(per_worker - self.per_worker) > 0.1 * self.per_worker:
                self.store.set_counter(PER_WORKER_COUNTER, max(1, round(per_worker * 1000)))
                self.per_worker = per_worker
        self._rate_at = now


def _full(why: str, wait_s: float) -> TooManyRequests:
    retry_after = min(MAX_RETRY_AFTER_S, max(1, math.ceil(wait_s)))
    return TooManyRequests(f"the queue is full: {why}; retry in about {retry_after} s", retry_after, "queue_full")
