"""Deadlines for slow clients (slowloris): uvicorn's h11 protocol with header and body timeouts.

Plain uvicorn arms no timer on a new connection until a response has been sent, so a client that
opens a socket and trickles header bytes (or a body) holds it forever; a few thousand of them use
up the process's file descriptors. The deadlines here close such connections:

* **headers**: the request line and headers must arrive within ``header_timeout_s`` of the
  connection opening (or, on a kept-alive connection, of the first byte of the next request). The
  connection is closed without an answer, as nginx does for ``client_header_timeout``.
* **body**: once the headers are in, the body must keep coming: no pause longer than
  ``body_timeout_s``, and after that long at least ``min_body_rate`` bytes per second on average.
  Time during which the server itself stopped reading (its buffer is full because the app has not
  read it yet) does not count. A client that falls behind gets ``408`` with ``Connection: close``
  and the app sees a disconnect, so no job is created from half a body.

Waiting for the response (a sync run, a status stream) has no deadline: that is the server's time.
The timers cost one ``call_later`` per connection and tick, on the event loop; nothing blocks.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

log = logging.getLogger("inpaint-server")


class _ClosedLog:
    """One warning per minute at most, with the count, however many connections an attack opens."""

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self.last = -every_s
        self.counts: dict[str, int] = {}

    def note(self, phase: str, client: tuple[str, int] | None, elapsed: float) -> None:
        now = time.monotonic()
        self.counts[phase] = self.counts.get(phase, 0) + 1
        who = f"{client[0]}:{client[1]}" if client else "a client"
        log.debug("closed the connection of %s: %s too slow (%.1f s)", who, phase, elapsed)
        if now - self.last >= self.every_s:
            summary = ", ".join(f"{n} sending {what}" for what, n in sorted(self.counts.items()))
            log.warning("closed slow connections (%s), e.g. %s after %.1f s", summary, who, elapsed)
            self.last, self.counts = now, {}


_closed_log = _ClosedLog()


class SlowClientProtocol(H11Protocol):
    """``H11Protocol`` with the header and body deadlines above (set by :func:`slow_client_protocol`)."""

    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    min_body_rate: float = 1024.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._tick: Any = None  # asyncio.TimerHandle of the next check
        self._headers_since: float | None = None  # waiting for headers since (loop time)
        self._body_since: float | None = None  # reading a body since
        self._body_bytes = 0
        self._last_data = 0.0
        self._paused = 0.0  # seconds of the body phase during which the server itself stopped reading
        self._last_check = 0.0

    # -------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: Any) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._headers_since = self.loop.time()
        self._schedule()

    def data_received(self, data: bytes) -> None:
        now = self.loop.time()
        self._last_data = now
        if self.conn.their_state is h11.SEND_BODY:
            self._body_bytes += len(data)
        elif self.conn.their_state is h11.IDLE and self._headers_since is None:
            self._headers_since = now  # the first bytes of a request on a kept-alive connection
        super().data_received(data)
        self._update_phase(now)

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel()
        super().connection_lost(exc)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._update_phase(self.loop.time())

    def handle_websocket_upgrade(self, event: h11.Request) -> None:
        # The connection is handed to a WebSocket protocol: these deadlines no longer apply to it.
        self._headers_since = self._body_since = None
        self._cancel()
        super().handle_websocket_upgrade(event)

    # -------------------------------------------------------------- deadlines

    def _update_phase(self, now: float) -> None:
        """After h11 consumed data: which deadline applies now."""
        state = self.conn.their_state
        if state is not h11.IDLE:
            self._headers_since = None  # the headers are in
        elif self._headers_since is None and self.timeout_keep_alive_task is None and not self.transport.is_closing():
            # Waiting for the next request with no keep-alive timer: the app answered before reading the
            # body, and uvicorn began the next cycle when the body ended. That wait gets a deadline too.
            self._headers_since = now
        if state is h11.SEND_BODY:
            if self._body_since is None:
                self._body_since, self._last_data, self._last_check, self._paused = now, now, now, 0.0
                # Bytes of the body that came in the same packet as the headers.
                self._body_bytes = len(self.cycle.body) if self.cycle is not None else 0
        else:
            self._body_since = None
        if self._headers_since is None and self._body_since is None:
            self._cancel()
        elif self._tick is None:
            self._schedule()

    def _schedule(self) -> None:
        period = max(0.05, min(1.0, self.header_timeout_s / 4, self.body_timeout_s / 4))
        self._tick = self.loop.call_later(period, self._check)

    def _cancel(self) -> None:
        if self._tick is not None:
            self._tick.cancel()
            self._tick = None

    def _check(self) -> None:
        self._tick = None
        if self.transport.is_closing():
            return
        now = self.loop.time()
        if self._headers_since is not None and now - self._headers_since > self.header_timeout_s:
            self._close("headers", now - self._headers_since)
            return
        if self._body_since is not None:
            if self.flow.read_paused:  # the server's own back-pressure: not the client's fault
                self._last_data = now
                self._paused += now - self._last_check
            self._last_check = now
            elapsed = now - self._body_since
            idle = now - self._last_data
            sending = elapsed - self._paused  # time the client could have been sending
            slow = sending > self.body_timeout_s and self._body_bytes / sending < self.min_body_rate
            if idle > self.body_timeout_s or slow:
                self._close("body", elapsed)
                return
        if self._headers_since is not None or self._body_since is not None:
            self._schedule()

    def _close(self, phase: str, elapsed: float) -> None:
        _closed_log.note(phase, self.client, elapsed)
        if phase == "body" and self.cycle is not None and not self.cycle.response_started:
            body = json.dumps(
                {
                    "detail": "the request body did not arrive in time",
                    "error_type": "request_timeout",
                    "message": "the request body did not arrive in time",
                }
            ).encode()
            headers = [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(body)).encode()),
                (b"connection", b"close"),
                (b"x-fal-error-type", b"request_timeout"),
            ]
            try:
                response = h11.Response(status_code=408, headers=headers, reason=b"Request Timeout")
                self.transport.write(self.conn.send(response))
                self.transport.write(self.conn.send(h11.Data(data=body)))
                self.transport.write(self.conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:
                pass
        if self.cycle is not None:
            self.cycle.disconnected = True  # the app's receive() now says http.disconnect
            self.cycle.message_event.set()
        self._headers_since = self._body_since = None
        self.transport.close()


def slow_client_protocol(header_timeout_s: float, body_timeout_s: float, min_body_rate: float) -> type[H11Protocol]:
    """A protocol class for ``uvicorn.Config(http=...)`` with these deadlines."""
    return type(
        "SlowClientProtocol",
        (SlowClientProtocol,),
        {"header_timeout_s": header_timeout_s, "body_timeout_s": body_timeout_s, "min_body_rate": min_body_rate},
    )
