"""This process as a node of the store: its row in ``nodes``, its heartbeat, and the sweeper every API node runs.

Every process that uses the store (an API node, a GPU worker, or both in the embedded default) registers a
row under a fresh *incarnation* id (``name#random``) and refreshes it every ``lease_s / 3`` with its state
and counters. Other nodes read these rows to tell which nodes are gone (a stale heartbeat, or a process
provably ended: see :meth:`~.store.JobStore.dead_nodes`), and API nodes export them as per-worker metrics.

The :class:`Sweeper` takes back what gone nodes held: a running job whose holder is gone, or whose lease
ran out more than ``lease_s`` ago (a live worker renews every ``lease_s / 3``), runs again with its seed
(or fails ``interrupted`` after ``max_attempts``, or at once when it was sent with ``x-fal-no-retry``), a
sync run whose caller's node is gone fails (nobody would read its answer), a queued job past its start
deadline fails ``request_timeout``, and a queued job flagged cancelled whose cancel was not finished (a full
disk between the two writes) is cancelled. Every write is a compare-and-set, so any number of API nodes may
sweep at once.

Heartbeats are only judged once the sweeper has seen the store answer for ``lease_s`` without a gap: after a
store outage (or a stall of this process) every node's heartbeat is late, and none of them is dead for that.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from . import outcomes
from .job import Job, JobState
from .store import JobStore, NodeRow, StoreUnavailable
from .store.base import process_start, this_host

log = logging.getLogger("inpaint-server.nodes")

NODE_ROW_KEEP_S = 3600.0  # rows of nodes gone this long are deleted


class Node:
    """This process's row in the store: registered at start, refreshed by :meth:`run`, removed at stop.

    ``state()`` is the node's own word for itself (``ready``, ``loading``, ``warming``, ``failed``,
    ``gpu_fault``, ``draining``); ``stats()`` gives the counters to publish (a worker's busy seconds and batch
    sizes)."""

    def __init__(
        self,
        store: JobStore,
        name: str,
        kind: str,
        lease_s: float,
        clock: Callable[[], float],
        device: str | None = None,
        stats: Callable[[], dict[str, Any]] | None = None,
        state: Callable[[], str] | None = None,
    ) -> None:
        self.store = store
        self.lease_s = lease_s
        self.clock = clock
        self.stats = stats or dict
        self.state_of = state or (lambda: "ready")
        now = clock()
        pid = os.getpid()
        self.row = NodeRow(
            id=f"{name}#{secrets.token_hex(4)}",
            name=name,
            kind=kind,
            host=this_host(),
            pid=pid,
            pid_start=process_start(pid),
            device=device,
            started_at=now,
            heartbeat_at=now,
            state="starting",
        )

    @property
    def id(self) -> str:
        return self.row.id

    @property
    def heartbeat_s(self) -> float:
        return max(self.lease_s / 3, 0.2)

    def register(self) -> None:
        """Write this node's row at start. While the store cannot take it (its disk is full, say), the node starts
        anyway and its heartbeat writes the row once it can."""
        try:
            self.store.register_node(self.current())
        except StoreUnavailable as exc:
            log.warning("node %s not registered yet (its heartbeat will): %s", self.id, exc)

    def beat(self) -> None:
        """Write the heartbeat now (a node whose row was removed as dead writes it again: it is alive)."""
        row = self.current()
        if not self.store.heartbeat(row):
            log.warning("node %s was taken for gone (its heartbeat was late); registering again", self.id)
            self.store.register_node(row)

    async def run(self) -> None:
        """Heartbeat every ``lease_s / 3`` until cancelled; a store outage only delays it."""
        while True:
            await asyncio.sleep(self.heartbeat_s)
            try:
                self.beat()
            except StoreUnavailable as exc:
                log.warning("heartbeat not written (store unavailable): %s", exc)
            except Exception:
                log.exception("heartbeat failed")

    def deregister(self) -> None:
        """A clean stop: the row goes, so other nodes know at once that this one is gone."""
        try:
            self.store.remove_nodes([self.id])
        except Exception as exc:  # the store may be down at shutdown; the row then goes stale
            log.warning("node %s not removed from the store: %s", self.id, exc)

    def current(self) -> NodeRow:
        """This node's row as it is now (state and counters read live), as the next heartbeat writes it."""
        self.row = replace(self.row, heartbeat_at=self.clock(), state=self.state_of(), stats=self.stats())
        return self.row


class Sweeper:
    """Takes back the work of gone nodes and fails queued jobs past their start deadline (see the module)."""

    def __init__(
        self,
        store: JobStore,
        lease_s: float,
        max_attempts: int,
        retention_s: float,
        clock: Callable[[], float],
        on_terminal: Callable[[Job], None],
        on_webhooks: Callable[[], None] = lambda: None,
    ) -> None:
        self.store = store
        self.on_webhooks = on_webhooks  # webhooks of gone nodes are free to deliver
        self.lease_s = lease_s
        self.max_attempts = max_attempts
        self.retention_s = retention_s
        self.clock = clock
        self.on_terminal = on_terminal  # metrics and webhook wake-up for a state this node wrote
        self._last_pass: float | None = None  # when the last pass got through
        self._trust_heartbeats_at = math.inf  # until then, a late heartbeat proves nothing (see the module)

    def sweep(self) -> int:
        """One pass; returns how many jobs it changed."""
        now = self.clock()
        if self._last_pass is None or now - self._last_pass > max(self.lease_s / 2, 5.0):
            self._trust_heartbeats_at = now + self.lease_s  # just started, or back after an outage or a stall
        try:
            changed = self._pass(now)
        except StoreUnavailable:
            self._last_pass = None
            raise
        self._last_pass = now
        return changed

    def _pass(self, now: float) -> int:
        waiting = self.store.waiting_sync()
        claimants = self.store.webhook_claimants(now)
        candidates = self.store.holders() | {waiter for _, waiter in waiting if waiter} | claimants
        stale_s = self.lease_s if now >= self._trust_heartbeats_at else math.inf
        dead = self.store.dead_nodes(candidates, now, stale_s)
        lost = self.store.lost_leases(now - self.lease_s, dead)
        changed = sum(self._take_back(job, now, dead) for job in lost)
        for job_id, waiter in waiting:
            if waiter is None or waiter in dead:  # None: written by a version that did not record its waiter
                changed += self._orphaned_sync(job_id, now)
        if claimants & dead and self.store.release_webhooks(claimants & dead):
            self.on_webhooks()
        for job in self.store.cancelled_queued():  # no worker takes them; only this finishes them
            changed += self.fail(job, "cancelled", "the request was cancelled before it started", now)
        changed += self.overdue(now)
        self._forget_nodes(now, dead)
        return changed

    def overdue(self, now: float | None = None) -> int:
        """Fail the queued jobs whose start deadline (``X-Fal-Request-Timeout``) has passed."""
        now = self.clock() if now is None else now
        changed = 0
        for job in self.store.overdue(now):
            message = "the request did not start before its start timeout"
            changed += self.fail(job, "request_timeout", message, now)
        return changed

    def _take_back(self, job: Job, now: float, dead: set[str]) -> bool:
        holder, lease = job.worker, job.lease_until
        why = "its worker stopped" if holder is None or holder in dead else "its worker stopped renewing its lease"
        if job.cancel_requested:
            return self.fail(job, "cancelled", "the request was cancelled while running", now, (holder, lease))
        if job.sync and (job.waiter is None or job.waiter in dead):
            return self.fail(job, "interrupted", _SYNC_ORPHAN, now, (holder, lease))
        if job.no_retry:
            message = f"{why} while this request was running; not run again (it was sent with x-fal-no-retry)"
            return self.fail(job, "interrupted", message, now, (holder, lease))
        if job.attempts >= self.max_attempts:
            message = f"{why} while this request was running, {job.attempts} times; not retried again"
            return self.fail(job, "interrupted", message, now, (holder, lease))
        job.state, job.worker, job.lease_until, job.started_at = JobState.QUEUED, None, None, None
        job.add_log(f"Interrupted: {why}; running again (attempt {job.attempts + 1})", "WARN", now)
        if self.store.save(job, lost=(holder, lease)):
            log.info("request %s requeued: %s (attempts so far %d)", job.id, why, job.attempts)
            return True
        return False

    def _orphaned_sync(self, job_id: str, now: float) -> bool:
        job = self.store.get(job_id)
        if job is None or job.state.is_terminal():
            return False
        if job.state is JobState.QUEUED:
            return self.fail(job, "interrupted", _SYNC_ORPHAN, now)
        return self.fail(job, "interrupted", _SYNC_ORPHAN, now, (job.worker, job.lease_until))

    def fail(
        self,
        job: Job,
        error_type: str,
        message: str,
        now: float,
        lost: tuple[str | None, float | None] | None = None,
        field: str | None = None,
    ) -> bool:
        """Fail a job nobody holds: a queued one (only while it is still queued), or a running one whose lease
        was seen lost (``lost`` = holder, lease; only while that lease is unchanged). Written once, whichever
        node gets there first; False (nothing written) otherwise."""
        webhook = outcomes.fail(job, error_type, message, field, now, self.retention_s)
        saved = self.store.save(job, webhook, lost=lost, queued=lost is None)
        if saved:
            log.info("request %s %s (%s: %s)", job.id, job.state.value, error_type, job.error)
            self.on_terminal(job)
        return saved

    def _forget_nodes(self, now: float, dead: set[str]) -> None:
        """Delete the rows of nodes gone for a while (and of gone nodes that hold nothing any more)."""
        gone = {n.id for n in self.store.nodes() if n.heartbeat_at < now - NODE_ROW_KEEP_S}
        holding = self.store.holders() | {w for _, w in self.store.waiting_sync() if w}
        self.store.remove_nodes(gone | (dead - holding))


_SYNC_ORPHAN = "the server that took this synchronous run stopped before it finished (nobody waits for it); retry it"


@dataclass
class WorkerStats:
    """What this worker publishes in its node row (and API nodes export per worker and device)."""

    busy_s: float = 0.0  # seconds the engine ran batches
    batches: int = 0
    rows: int = 0  # image rows over every batch
    requests: int = 0
    sizes: dict[str, int] = field(default_factory=dict)  # batches by number of requests

    def add(self, requests: int, rows: int, seconds: float) -> None:
        self.busy_s += seconds
        self.batches += 1
        self.rows += rows
        self.requests += requests
        self.sizes[str(requests)] = self.sizes.get(str(requests), 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "busy_s": round(self.busy_s, 3),
            "batches": self.batches,
            "rows": self.rows,
            "requests": self.requests,
            "sizes": dict(self.sizes),
        }
