"""Slow clients (reliability case S12) against ``inpaint-server serve``, the way it runs in production.

500 connections trickle header bytes: each is closed at the header deadline, not before, while
``/health/ready`` and a real request are answered as usual. A body that trickles or stops gets 408
and creates no job; a body that is slow but keeps a fair rate is served.
"""

from __future__ import annotations

import json
import resource
import selectors
import socket
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.api.queue_ops import APP, inpaint_input, wait_all_completed
from tests.live import SUBPROCESS_ENV, ServerProcess

HEADER_TIMEOUT = 2.0
BODY_TIMEOUT = 2.0
MIN_RATE = 1024
SLOW_CLIENTS = 500


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, tiny_cache: Path) -> Iterator[ServerProcess]:
    import shutil

    from pipelines.tiny import tiny_cache_dir

    # 500 sockets here and 500 in the server: make room under the open-file limit (inherited by the child).
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = 4 * SLOW_CLIENTS if hard == resource.RLIM_INFINITY else min(hard, 4 * SLOW_CLIENTS)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    data = tmp_path_factory.mktemp("slow") / "data"
    shutil.copytree(tiny_cache, tiny_cache_dir(data), symlinks=True)
    env = {
        **SUBPROCESS_ENV,
        "INPAINT_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT),
        "INPAINT_BODY_TIMEOUT_S": str(BODY_TIMEOUT),
        "INPAINT_MIN_BODY_RATE": str(MIN_RATE),
    }
    proc = ServerProcess(["--models", "tiny", "--app", "fast-lightning-sdxl:4", "--data-dir", str(data)], env=env)
    proc.data_dir = data  # type: ignore[attr-defined]
    proc.start()
    yield proc
    proc.stop()
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _jobs_in_store(server: ServerProcess) -> int:
    with sqlite3.connect(f"file:{server.data_dir / 'jobs.sqlite3'}?mode=ro", uri=True) as db:  # type: ignore[attr-defined]
        return db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]


def _connect(server: ServerProcess) -> socket.socket:
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    sock.setblocking(False)
    return sock


def _send(sock: socket.socket, data: bytes) -> bool:
    """Send what fits; False once the server has closed the connection."""
    try:
        sock.send(data)
        return True
    except (BlockingIOError, InterruptedError):
        return True
    except OSError:
        return False


def _read_all(sock: socket.socket, timeout: float) -> bytes:
    """Everything the server sends until it closes the connection (or ``timeout``)."""
    sock.setblocking(True)
    sock.settimeout(timeout)
    chunks = []
    try:
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    except (ConnectionResetError, TimeoutError):
        pass
    return b"".join(chunks)


def test_trickled_headers_are_closed_at_the_deadline_and_the_server_keeps_answering(server: ServerProcess) -> None:
    """S12: 500 slowloris connections: none is closed early, all are closed by the header deadline
    (plus one check period), and meanwhile readiness and a real request are served promptly."""
    opened = time.monotonic()
    socks = [_connect(server) for _ in range(SLOW_CLIENTS)]
    for sock in socks:
        _send(sock, f"POST /{APP} HTTP/1.1\r\nHost: slow\r\n".encode())
    closed_at: dict[int, float] = {}
    selector = selectors.DefaultSelector()
    for sock in socks:
        selector.register(sock, selectors.EVENT_READ)
    stop = threading.Event()

    def trickle() -> None:  # one more header line per connection every 0.25 s, as slowloris does
        n = 0
        while not stop.wait(0.25):
            n += 1
            for sock in socks:
                if sock.fileno() not in closed_at:
                    _send(sock, f"X-Slow-{n}: 1\r\n".encode())

    sender = threading.Thread(target=trickle, daemon=True)
    sender.start()
    answers: list[tuple[int, float]] = []
    with httpx.Client(base_url=server.url, timeout=10) as client:
        request = client.post(f"/{APP}", json=inpaint_input(seed=1))  # a real sync run while they trickle
        answers.append((request.status_code, 0.0))
        while len(closed_at) < len(socks) and time.monotonic() - opened < HEADER_TIMEOUT + 8:
            started = time.monotonic()
            answers.append((client.get("/health/ready").status_code, time.monotonic() - started))
            for key, _ in selector.select(timeout=0.2):
                sock = key.fileobj
                try:
                    data = sock.recv(4096)
                except (ConnectionResetError, BlockingIOError):
                    data = b""
                assert data == b"", f"a slowloris connection got an answer: {data[:200]!r}"
                closed_at[sock.fileno()] = time.monotonic() - opened
                selector.unregister(sock)
    stop.set()
    sender.join()
    for sock in socks:
        sock.close()

    assert answers[0][0] == 200, "the real request failed while the slow clients trickled"
    assert all(code == 200 for code, _ in answers[1:]), answers
    assert max(seconds for _, seconds in answers[1:]) < 1.0, answers
    assert len(closed_at) == SLOW_CLIENTS, f"only {len(closed_at)} of {SLOW_CLIENTS} closed"
    times = sorted(closed_at.values())
    assert times[0] >= HEADER_TIMEOUT - 0.1, f"closed before the deadline: {times[0]:.2f} s"
    assert times[-1] <= HEADER_TIMEOUT + 3.0, f"closed too late: {times[-1]:.2f} s"


def _post_head(length: int) -> bytes:
    """A queue submit's request head; ``Connection: close`` so the answer ends with the connection."""
    return (
        f"POST /queue/{APP} HTTP/1.1\r\nHost: slow\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\nConnection: close\r\n\r\n"
    ).encode()


@pytest.mark.parametrize("how", ["trickle", "stall"])
def test_a_body_that_trickles_or_stops_gets_408_and_creates_no_job(server: ServerProcess, how: str) -> None:
    """A body under min_body_rate after body_timeout_s (trickle), or one that pauses longer (stall)."""
    body = json.dumps(inpaint_input(seed=2)).encode()
    before = _jobs_in_store(server)
    sock = _connect(server)
    started = time.monotonic()
    _send(sock, _post_head(len(body)))
    if how == "trickle":
        sent = 0
        while sent < len(body) and time.monotonic() - started < BODY_TIMEOUT + 4:
            if not _send(sock, body[sent : sent + 10]):  # 10 bytes every 0.1 s: 100 B/s, under 1 KiB/s
                break
            sent += 10
            time.sleep(0.1)
    else:
        _send(sock, body[: len(body) // 2])
    answer = _read_all(sock, timeout=BODY_TIMEOUT + 6)
    elapsed = time.monotonic() - started
    sock.close()
    head, _, payload = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408"), answer[:300]
    assert b"connection: close" in head.lower()
    assert json.loads(payload)["error_type"] == "request_timeout"
    assert BODY_TIMEOUT - 0.1 <= elapsed <= BODY_TIMEOUT + 3.0, elapsed
    assert _jobs_in_store(server) == before  # half a body never became a job


def test_a_slow_body_at_a_fair_rate_is_served(server: ServerProcess) -> None:
    """The deadline is not a cap on upload time: ~4 KiB/s for longer than body_timeout_s succeeds."""
    payload = inpaint_input(seed=3, prompt="a slow upload " + "x" * 4_000)  # ~17 KB: ~4 s at this rate
    body = json.dumps(payload).encode()
    sock = _connect(server)
    started = time.monotonic()
    _send(sock, _post_head(len(body)))
    sock.setblocking(True)
    for i in range(0, len(body), 400):  # 400 bytes every 0.1 s
        sock.sendall(body[i : i + 400])
        time.sleep(0.1)
    assert time.monotonic() - started > BODY_TIMEOUT + 0.5  # it did take longer than body_timeout_s
    answer = _read_all(sock, timeout=10).split(b"\r\n\r\n", 1)
    sock.close()
    assert answer[0].startswith(b"HTTP/1.1 200"), answer[0]
    request_id = json.loads(answer[1])["request_id"]
    with httpx.Client(base_url=server.url, timeout=10) as client:
        body_status = wait_all_completed(client, [request_id])[request_id]
    assert "error" not in body_status, body_status


def test_an_answer_before_the_body_does_not_leave_the_connection_without_a_deadline(server: ServerProcess) -> None:
    """The app answers before reading the body (a 404); the body then arrives and the client goes quiet.
    uvicorn starts the next request cycle with no keep-alive timer; the header deadline still closes it."""
    sock = _connect(server)
    _send(sock, b"GET /queue/nope/requests/x/status HTTP/1.1\r\nHost: slow\r\nContent-Length: 5\r\n\r\n")
    sock.setblocking(True)
    sock.settimeout(10)
    head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 404"), head[:200]
    sock.sendall(b"abcde")
    started = time.monotonic()
    rest = _read_all(sock, timeout=HEADER_TIMEOUT + 8)
    elapsed = time.monotonic() - started
    sock.close()
    assert b"HTTP/1.1" not in rest  # closed without another answer
    assert elapsed <= HEADER_TIMEOUT + 3.0, f"still open after {elapsed:.1f} s"
