"""A TCP proxy that cuts connections idle for longer than a timeout, as load balancers do (an AWS ALB's
idle timeout, nginx's ``proxy_read_timeout``): a status stream that stays silent while its request waits
is cut, one that sends keep-alives is not."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from typing import Any


class IdleCuttingProxy:
    """Forwards ``127.0.0.1:<port>`` to ``127.0.0.1:<upstream_port>``; a connection over which no byte has
    passed (either way) for ``idle_s`` is closed on both sides. ``cuts`` counts those closes."""

    def __init__(self, upstream_port: int, idle_s: float) -> None:
        self.upstream_port = upstream_port
        self.idle_s = idle_s
        self.port = 0
        self.cuts = 0
        self._loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._loop.run_until_complete, args=(self._serve(),), daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> IdleCuttingProxy:
        self._thread.start()
        assert self._ready.wait(10), "the proxy did not start"
        return self

    def __exit__(self, *exc: Any) -> None:
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(10)

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        server = await asyncio.start_server(self._connection, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()

    async def _connection(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:
            client_writer.close()
            return
        last = [loop.time()]

        async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError):
                while data := await reader.read(65536):
                    last[0] = loop.time()
                    writer.write(data)
                    await writer.drain()

        pipes = {
            asyncio.ensure_future(pipe(client_reader, upstream_writer)),
            asyncio.ensure_future(pipe(upstream_reader, client_writer)),
        }
        while True:
            done, _ = await asyncio.wait(pipes, timeout=0.02, return_when=asyncio.FIRST_COMPLETED)
            if done:  # one side closed: close the other
                break
            if loop.time() - last[0] > self.idle_s:
                self.cuts += 1
                break
        for task in pipes:
            task.cancel()
        for writer in (client_writer, upstream_writer):
            writer.close()
