"""A webhook receiver for tests: a real HTTP server that records each delivery and answers from a script.

Shared by the API tests (``tests/api``) and the contract tests with the real fal clients (``tests/compat``).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HANG = "hang"  # a scripted answer: hold the request open until released (or the receiver closes)


@dataclass
class Delivery:
    """One POST the receiver got."""

    path: str
    headers: dict[str, str]
    body: bytes
    arrived: float  # time.monotonic()
    epoch: int  # the receiver's epoch when it arrived (tests bump it across server restarts)
    status: int | None = None  # what the receiver answered; None while held or when never answered

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass
class WebhookReceiver:
    """Answers the n-th delivery with ``script[n]`` (an HTTP status or :data:`HANG`), then ``default``."""

    script: Sequence[int | str] = ()
    default: int = 200
    deliveries: list[Delivery] = field(default_factory=list)
    epoch: int = 1
    release: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        self._cond = threading.Condition()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                delivery = Delivery(
                    self.path, dict(self.headers.items()), self.rfile.read(length), time.monotonic(), receiver.epoch
                )
                with receiver._cond:
                    index = len(receiver.deliveries)
                    receiver.deliveries.append(delivery)
                    receiver._cond.notify_all()
                answer = receiver.script[index] if index < len(receiver.script) else receiver.default
                if answer == HANG:
                    receiver.release.wait(60)
                    answer = 200
                try:
                    self.send_response(int(answer))
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"{}")
                except OSError:  # the sender gave up on this attempt and closed the connection
                    return
                with receiver._cond:
                    delivery.status = int(answer)
                    receiver._cond.notify_all()

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def base_url(self) -> str:
        """The receiver's root: any path under it is recorded (``Delivery.path``)."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    @property
    def url(self) -> str:
        return f"{self.base_url}/hook"

    def wait_for(
        self, count: int, timeout: float = 30.0, answered: bool = False, path: str | None = None, grace: float = 0.0
    ) -> list[Delivery]:
        """Block until ``count`` deliveries arrived (``answered``: ``count`` of them were answered); return all.

        ``path``: count and return only the deliveries to that path. ``grace``: then wait that many seconds
        more, so that a duplicate delivery would be among those returned.
        """

        def mine() -> list[Delivery]:
            return [d for d in self.deliveries if path is None or d.path == path]

        def ready() -> bool:
            got = mine() if not answered else [d for d in mine() if d.status is not None]
            return len(got) >= count

        with self._cond:
            if not self._cond.wait_for(ready, timeout):
                where = "" if path is None else f" to {path}"
                raise AssertionError(
                    f"expected {count} webhook deliveries{where} within {timeout} s, got {self.deliveries}"
                )
        time.sleep(grace)
        with self._cond:
            return mine()

    def for_request(self, request_id: str) -> list[Delivery]:
        with self._cond:
            return [d for d in self.deliveries if d.json()["request_id"] == request_id]

    def close(self) -> None:
        self.release.set()
        self._server.shutdown()
        self._server.server_close()
