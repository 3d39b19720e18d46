"""Step previews of running jobs, from the engine's GPU thread to the job store, without slowing either down.

The engine hands a step's preview (``pipelines.previews.StepPreview``: uint8 pixels on their way to pinned host
memory) to ``on_progress`` of jobs submitted with ``previews``. :class:`PreviewEncoder` takes it from the GPU
thread without waiting, JPEG-encodes it on a thread of its own (skipping a step when a newer one of the same
job is already waiting), and keeps the newest encoded preview per job until the worker writes it with the
job's progress (only the newest per job is ever written; it is dropped when the job ends).
"""

from __future__ import annotations

import asyncio
import base64
import logging
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("inpaint-server.jobs")


class PreviewEncoder:
    """Encodes previews off the GPU thread; ``ready(request_id)`` is called on the loop when one is waiting."""

    def __init__(self, ready: Callable[[str], None]) -> None:
        self._ready = ready
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="previews")
        self._steps: dict[str, int] = {}  # the newest step handed over per job
        self._encoded: dict[str, dict[str, Any]] = {}  # the newest encoded preview per job, not written yet

    def submit(self, loop: asyncio.AbstractEventLoop, request_id: str, step: int, total: int, preview: Any) -> None:
        """(The GPU thread.) Queue a step's preview for encoding; returns at once."""
        self._steps[request_id] = step
        self._pool.submit(self._encode, loop, request_id, step, total, preview)

    def _encode(self, loop: asyncio.AbstractEventLoop, request_id: str, step: int, total: int, preview: Any) -> None:
        if self._steps.get(request_id, step) > step:
            return  # a newer step of this job is waiting: only the newest is kept anyway
        try:
            images = [
                {
                    "url": "data:image/jpeg;base64," + base64.b64encode(jpeg.data).decode("ascii"),
                    "width": jpeg.width,
                    "height": jpeg.height,
                    "content_type": "image/jpeg",
                }
                for jpeg in preview.jpegs()
            ]
        except Exception:
            log.exception("request %s: the preview of step %d could not be encoded", request_id, step)
            return
        body = {"step": step, "total_steps": total, "previews": images}
        if not loop.is_closed():
            loop.call_soon_threadsafe(self._keep, request_id, body)

    def _keep(self, request_id: str, body: dict[str, Any]) -> None:
        if request_id not in self._steps:
            return  # the job was forgotten meanwhile (it ended)
        pending = self._encoded.get(request_id)
        if pending is None or pending["step"] < body["step"]:
            self._encoded[request_id] = body
            self._ready(request_id)

    def pending(self, request_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
        """The previews waiting to be written for these jobs."""
        return {i: self._encoded[i] for i in request_ids if i in self._encoded}

    def written(self, previews: dict[str, dict[str, Any]]) -> None:
        """These previews are in the store (those replaced meanwhile by newer ones stay pending)."""
        for request_id, body in previews.items():
            if self._encoded.get(request_id) is body:
                del self._encoded[request_id]

    def forget(self, request_id: str) -> None:
        """The job ended here: nothing of it is written any more."""
        self._steps.pop(request_id, None)
        self._encoded.pop(request_id, None)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
