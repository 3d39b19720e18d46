"""Graceful shutdown: on SIGTERM (or Ctrl-C) drain first, then let uvicorn shut down.

Plain uvicorn stops accepting connections at once and runs the app's shutdown only after that, so
clients could not see the server draining, nor poll the request that is finishing. Here the first
signal only starts ``drain()`` (readiness 503 ``draining``, submits 503 with Retry-After, the running
batch gets ``drain_grace_s`` to finish) while the server keeps answering; then uvicorn shuts down as
usual. A second signal stops at once. The process exits 0 either way: uvicorn's own handler would
re-raise the signal after shutdown, which ends the process with 143 instead.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from types import FrameType
from typing import Any

import uvicorn

log = logging.getLogger("inpaint-server")


def run(app: Any, **kwargs: Any) -> None:
    """``uvicorn.run(app, **kwargs)``, but SIGTERM drains first (``app.state.drain``)."""
    server = DrainingServer(uvicorn.Config(app, **kwargs), drain=app.state.drain)
    server.run()
    if not server.started:
        raise SystemExit(3)  # could not start (the port is taken...), as uvicorn.run exits


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Callable[[], Awaitable[Any]]) -> None:
        super().__init__(config)
        self._drain = drain
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_requested = False
        self._drain_task: asyncio.Task[None] | None = None

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().startup(sockets)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """Signal handler (main thread) and the way tests ask for a drain (any thread)."""
        if self._loop is not None and self.started and not self.should_exit and not self._drain_requested:
            self._drain_requested = True
            self._loop.call_soon_threadsafe(self._start_drain, sig)
            return
        # A second signal, or one before the server was up: stop now (a running batch is abandoned
        # and runs again after the restart).
        if self._loop is not None and self._drain_requested:
            self._loop.call_soon_threadsafe(self._cancel_drain)
        if self.should_exit and sig == signal.SIGINT:
            self.force_exit = True
        self.should_exit = True

    def _start_drain(self, sig: int) -> None:
        log.info("%s received: draining (send it again to stop at once)", signal.Signals(sig).name)
        self._drain_task = asyncio.ensure_future(self._drain_then_exit())

    def _cancel_drain(self) -> None:
        if self._drain_task is not None:
            self._drain_task.cancel()

    async def _drain_then_exit(self) -> None:
        try:
            await self._drain()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("draining failed; shutting down now")
        finally:
            self.should_exit = True
