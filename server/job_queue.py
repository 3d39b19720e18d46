"""The in-memory order of queued jobs: (priority, arrival); O(log n) position for status polls."""

from __future__ import annotations

import bisect

from .jobs import Job


class JobQueue:
    """Queued job ids ordered by (priority, arrival). Position = number of jobs ahead."""

    def __init__(self) -> None:
        self._order: list[tuple[int, int, str]] = []
        self._keys: dict[str, tuple[int, int, str]] = {}

    def __len__(self) -> int:
        return len(self._order)

    def __contains__(self, job_id: str) -> bool:
        return job_id in self._keys

    def push(self, job: Job) -> None:
        key = (job.priority, job.seq, job.id)
        self._keys[job.id] = key
        bisect.insort(self._order, key)

    def remove(self, job_id: str) -> None:
        key = self._keys.pop(job_id, None)
        if key is not None:
            i = bisect.bisect_left(self._order, key)
            del self._order[i]

    def position(self, job_id: str) -> int | None:
        key = self._keys.get(job_id)
        return None if key is None else bisect.bisect_left(self._order, key)

    def head(self, n: int) -> list[str]:
        return [k[2] for k in self._order[:n]]
