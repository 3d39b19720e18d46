"""Running the real server for tests: in-process on a uvicorn thread, or as a subprocess."""

from __future__ import annotations

import faulthandler
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import httpx
import uvicorn

from server.http.draining import DrainingServer

REPO = Path(__file__).resolve().parent.parent
# The SSRF guard refuses loopback addresses; tests whose image hosts or webhook receivers listen on
# 127.0.0.1 allow it with ``make_server(fetch_allow=LOOPBACK)`` (or ``INPAINT_FETCH_ALLOW``).
LOOPBACK = ["127.0.0.1/32"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LiveServer:
    """A real uvicorn server on a loopback port, in a thread of the test process."""

    def __init__(
        self, app: Any, ssl_certfile: Path | None = None, ssl_keyfile: Path | None = None, port: int | None = None
    ) -> None:
        self.app = app
        self.port = port or free_port()  # a given port: a restart where the clients expect the server
        self.scheme = "https" if ssl_certfile else "http"
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            ssl_certfile=str(ssl_certfile) if ssl_certfile else None,
            ssl_keyfile=str(ssl_keyfile) if ssl_keyfile else None,
            timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def hostport(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 60.0) -> LiveServer:
        self._thread.start()
        deadline = time.monotonic() + ready_timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("server did not start")
            time.sleep(0.02)
        wait_ready(self.url, deadline - time.monotonic(), verify=False)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self._thread.join(timeout=30)
        if self._thread.is_alive():  # a server that cannot stop keeps its node alive: say so, with every stack
            print(f"LiveServer: the server on port {self.port} did not stop within 30 s", file=sys.stderr)
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)

    def __enter__(self) -> LiveServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


class DrainingLiveServer(LiveServer):
    """LiveServer with the CLI's DrainingServer; ``sigterm()`` does what the signal handler does."""

    def __init__(self, app: Any, port: int | None = None) -> None:
        super().__init__(app, port=port)
        self.server = DrainingServer(self.server.config, drain=app.state.drain)
        self._thread = threading.Thread(target=self.server.run, daemon=True)

    def sigterm(self) -> None:
        self.server.handle_exit(signal.SIGTERM, None)

    def exited(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()


def wait_ready(url: str, timeout: float = 60.0, verify: bool | str = True) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if httpx.get(f"{url}/health/ready", verify=verify, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"{url} not ready after {timeout} s")
        time.sleep(0.05)


# For ``serve`` subprocesses in tests: no warm-up (fast start), one request per batch (queue order is run
# order), one torch thread (a server next to the test process on a small, busy machine slows down many times
# over with more).
SUBPROCESS_ENV = {"INPAINT_WARMUP": "false", "INPAINT_MAX_BATCH_SIZE": "1", "OMP_NUM_THREADS": "1"}


class ServerProcess:
    """``inpaint-server serve`` (or ``worker``: ``command``) as a child process (for restarts and ``kill -9``)."""

    def __init__(
        self,
        args: Sequence[str],
        env: dict[str, str] | None = None,
        log: Path | None = None,
        command: str = "serve",
        port: int | None = None,
    ) -> None:
        self.port = port or free_port()
        self.args = [command, "--host", "127.0.0.1", "--port", str(self.port), *args]
        self.env = {**os.environ, **(env or {})}
        self.log = log
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, ready_timeout: float = 120.0) -> ServerProcess:
        out = self.log.open("ab") if self.log else subprocess.DEVNULL
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", *self.args], cwd=REPO, env=self.env, stdout=out, stderr=out
        )
        wait_ready(self.url, ready_timeout)
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()


class GatedEngine:
    """The real engine, but ``run`` can be held after its first denoising step until released.

    Makes "cancel while running" deterministic without timing guesses.
    """

    def __init__(self, engine: Any) -> None:
        self.engine = engine
        self.hold = False
        self.started = threading.Event()
        self.release = threading.Event()
        self.batches: list[list[str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.engine, name)

    def run(self, requests: Sequence[Any], should_stop: Callable | None = None, on_progress: Callable | None = None):
        self.batches.append([r.request_id for r in requests])

        def progress(request_id: str, step: int, total: int, *preview: Any) -> None:
            if on_progress is not None:
                on_progress(request_id, step, total, *preview)  # a step preview, for requests that asked
            if self.hold:
                self.started.set()
                self.release.wait(60)

        return self.engine.run(requests, should_stop, progress)
