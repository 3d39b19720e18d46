"""Loading the engine off the event loop, warming it up, and saying honestly whether it is ready."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from typing import Any

log = logging.getLogger("inpaint-server.engine")


class EngineHost:
    """Holds the engine. ``state`` is ``loading``, ``warming``, ``ready``, ``failed`` (did not load) or
    ``gpu_fault`` (a fatal GPU error or a hung GPU; the process is about to exit for a restart)."""

    def __init__(self, engine: Any = None, loader: Callable[[], Any] | None = None, warmup: bool = True) -> None:
        if engine is None and loader is None:
            raise ValueError("give an engine or a loader")
        self.engine = engine
        self._loader = loader
        self._warmup = warmup
        self.state = "loading"
        self.error: str | None = None
        self._ready = asyncio.Event()
        self._thread: threading.Thread | None = None

    @property
    def ready(self) -> bool:
        return self.state == "ready"

    def fault(self, reason: str) -> None:
        """The GPU is unusable (GPU faults): not ready any more, with ``reason`` for /health/ready."""
        self.state = "gpu_fault"
        self.error = reason

    def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._thread = threading.Thread(target=self._load, args=(loop,), name="engine-loader", daemon=True)
        self._thread.start()

    async def wait_ready(self) -> Any:
        """The engine once loaded; None if loading failed (``state`` is then ``failed``)."""
        await self._ready.wait()
        return self.engine if self.ready else None

    def _load(self, loop: asyncio.AbstractEventLoop) -> None:
        try:
            if self.engine is None:
                assert self._loader is not None
                self.engine = self._loader()
            if self._warmup:
                self.state = "warming"
                warm_up(self.engine)
            self.state = "ready"
            log.info("engine ready")
            loop.call_soon_threadsafe(self._ready.set)
        except Exception as exc:  # reported by /health/ready; the process stays up to say why
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("engine failed to load")
            loop.call_soon_threadsafe(self._ready.set)  # wake waiters: they check ``ready`` and fail jobs


def warm_up(engine: Any) -> None:
    """One small request through every loaded variant, so the first user request pays no first-call costs."""
    from PIL import Image

    from pipelines import InpaintRequest

    image = Image.new("RGB", (64, 64), (127, 127, 127))
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    for n, (app_id, steps) in enumerate(sorted(engine.variants)):
        request = InpaintRequest(
            app_id=app_id,
            image=image,
            mask=mask,
            prompt="warm-up",
            steps=steps,
            seed=0,
            image_size=(64, 64),
            enable_safety_checker=n == 0,
            request_id=f"warmup-{n}",
        )
        result = engine.run([request])[0]
        if result.error is not None:
            raise result.error
    log.info("warm-up done for %d variants", len(engine.variants))
