"""The in-memory queue (priority, then arrival; position = jobs ahead) and the wire-state mapping."""

from __future__ import annotations

import random

import pytest

from server.job_queue import JobQueue
from server.jobs import PRIORITIES, Job, JobState

NORMAL, LOW = PRIORITIES["normal"], PRIORITIES["low"]


def _job(seq: int, priority: int = NORMAL) -> Job:
    return Job(
        id=f"job-{seq:04d}",
        app_id="fal-ai/hyper-sdxl/inpainting",
        endpoint="fal-ai/hyper-sdxl",
        owner="",
        input={},
        seed=0,
        created_at=0.0,
        base_url="http://test",
        priority=priority,
        seq=seq,
    )


def test_arrival_order_and_positions() -> None:
    queue = JobQueue()
    jobs = [_job(n) for n in range(5)]
    for job in jobs:
        queue.push(job)
    assert len(queue) == 5
    assert [queue.position(j.id) for j in jobs] == [0, 1, 2, 3, 4]
    assert queue.head(3) == [j.id for j in jobs[:3]]
    assert queue.head(99) == [j.id for j in jobs]


def test_normal_priority_goes_ahead_of_low() -> None:
    queue = JobQueue()
    low1, normal1, low2, normal2 = _job(1, LOW), _job(2), _job(3, LOW), _job(4)
    for job in (low1, normal1, low2, normal2):
        queue.push(job)
    assert queue.head(4) == [normal1.id, normal2.id, low1.id, low2.id]
    assert queue.position(low1.id) == 2 and queue.position(normal2.id) == 1


def test_remove_moves_later_jobs_up_and_is_idempotent() -> None:
    queue = JobQueue()
    jobs = [_job(n) for n in range(4)]
    for job in jobs:
        queue.push(job)
    queue.remove(jobs[1].id)
    queue.remove(jobs[1].id)  # a second remove (cancel racing the worker) changes nothing
    queue.remove("never-queued")
    assert jobs[1].id not in queue and jobs[2].id in queue
    assert queue.position(jobs[1].id) is None
    assert [queue.position(j.id) for j in (jobs[0], jobs[2], jobs[3])] == [0, 1, 2]
    assert len(queue) == 3


def test_matches_a_sorted_reference_under_random_operations() -> None:
    rng = random.Random(7)
    queue, reference = JobQueue(), {}
    for seq in range(300):
        if reference and rng.random() < 0.4:
            victim = rng.choice(sorted(reference))
            queue.remove(victim)
            del reference[victim]
        else:
            job = _job(seq, rng.choice([NORMAL, LOW]))
            queue.push(job)
            reference[job.id] = (job.priority, job.seq)
        expected = sorted(reference, key=reference.__getitem__)
        assert queue.head(len(queue)) == expected
        probe = rng.choice(expected) if expected else None
        if probe is not None:
            assert queue.position(probe) == expected.index(probe)


@pytest.mark.parametrize(
    ("state", "wire", "terminal"),
    [
        (JobState.QUEUED, "IN_QUEUE", False),
        (JobState.RUNNING, "IN_PROGRESS", False),
        (JobState.SUCCEEDED, "COMPLETED", True),
        (JobState.FAILED, "COMPLETED", True),
        (JobState.CANCELLED, "COMPLETED", True),
    ],
)
def test_only_three_wire_states(state: JobState, wire: str, terminal: bool) -> None:
    assert state.wire == wire and state.is_terminal() is terminal


def test_status_body_shape_per_state() -> None:
    job = _job(1)
    job.add_log("Request queued", when=0.0)
    queued = job.status_body(3, with_logs=False)
    assert queued["status"] == "IN_QUEUE" and queued["queue_position"] == 3 and queued["logs"] is None
    assert queued["status_url"] == "http://test/queue/fal-ai/hyper-sdxl/requests/job-0001/status"
    job.state = JobState.RUNNING
    running = job.status_body(None, with_logs=True)
    assert "queue_position" not in running and [e["message"] for e in running["logs"]] == ["Request queued"]
    assert running["logs"][0]["timestamp"].startswith("1970-01-01T00:00:00")
    job.add_log("Step 1/1", when=1.0)
    assert [e["message"] for e in job.status_body(None, with_logs=True, logs_from=1)["logs"]] == ["Step 1/1"]
    job.state, job.error, job.error_type, job.inference_time = JobState.CANCELLED, "stopped", "cancelled", None
    done = job.status_body(None, with_logs=False)
    assert done["status"] == "COMPLETED" and done["error_type"] == "cancelled" and done["error"] == "stopped"
    assert done["metrics"] == {"inference_time": None} and done["logs"] is None
