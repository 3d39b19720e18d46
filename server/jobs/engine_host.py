"""Loading the engine off the event loop, warming it up, and saying honestly whether it is ready."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipelines.errors import ConfigError, ModelFileError
from pipelines.serving import ServingEngine

log = logging.getLogger("inpaint-server.engine")

DEFAULT_SIZE = "square_hd"  # the image_size both apps' schemas default to


class EngineHost:
    """Holds the engine. ``state`` is ``loading``, ``warming``, ``ready``, ``failed`` (did not load) or
    ``gpu_fault`` (a fatal GPU error or a hung GPU; the process is about to exit for a restart).

    ``gpu`` is the one thread that runs the engine (the warm-up and every batch): CUDA graphs, and
    the memory pool they record into, belong to the thread that captured them, so a warm-up on one
    thread and requests on others would capture everything again, per thread.
    """

    def __init__(
        self,
        engine: ServingEngine | None = None,
        loader: Callable[[], ServingEngine] | None = None,
        warmup: bool = True,
        warmup_sizes: list[tuple[int, int]] | None = None,
    ) -> None:
        if engine is None and loader is None:
            raise ValueError("give an engine or a loader")
        self.engine = engine
        self._loader = loader
        self._warmup = warmup
        self._warmup_sizes = warmup_sizes
        self.state = "loading"
        self.error: str | None = None
        self._ready = asyncio.Event()
        self.gpu = ThreadPoolExecutor(max_workers=1, thread_name_prefix="gpu")
        self._thread: threading.Thread | None = None
        self.warming_later = 0  # background warm-up runs still to do (other sizes' CUDA graphs)
        self._stopping = threading.Event()

    def stop(self) -> None:
        """Shutting down (or draining): start no more background warm-up runs."""
        self._stopping.set()

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
            later = []
            if self._warmup:
                self.state = "warming"
                plan = warmup_plan(self.engine, self._warmup_sizes)
                self.gpu.submit(self._warm, plan.ready).result()
                later = plan.later
            self.state = "ready"
            log.info("engine ready")
            loop.call_soon_threadsafe(self._ready.set)
        except Exception as exc:  # reported by /health/ready; the process stays up to say why
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            if isinstance(exc, ConfigError | ModelFileError):  # says what is missing and how to fetch it
                log.error("engine failed to load: %s", self.error)
            else:
                log.exception("engine failed to load")
            loop.call_soon_threadsafe(self._ready.set)  # wake waiters: they check ``ready`` and fail jobs
            return
        self._warm_later(later)

    def _warm(self, units: list[Any]) -> None:
        from pipelines.warmup import run_units

        run_units(self.engine, units, "before ready")
        seal = getattr(self.engine, "seal_compiled_shapes", None)
        if seal is not None:
            seal()  # from now on a shape the warm-up did not compile runs eagerly instead of compiling

    def _warm_later(self, units: list[Any]) -> None:
        """The other sizes, one unit at a time on the GPU thread: a batch submitted meanwhile waits for
        one unit at most. A unit that fails is logged and skipped (its size runs without CUDA graphs)."""
        from pipelines.warmup import run_unit

        self.warming_later = len(units)
        started = time.perf_counter()
        for n, unit in enumerate(units):
            if self.state != "ready" or self._stopping.is_set():  # a GPU fault, a drain or a shutdown
                self.warming_later = 0
                return
            try:
                work = self.gpu.submit(run_unit, self.engine, unit, n)
            except RuntimeError:  # the executor is shut down: the process is exiting
                self.warming_later = 0
                return
            try:
                work.result()
            except Exception:
                log.exception("background warm-up of %s failed; that size runs without CUDA graphs", unit)
            self.warming_later -= 1
        if units:
            log.info("background warm-up done: %d runs in %.1f s", len(units), time.perf_counter() - started)


def warmup_plan(engine: ServingEngine, sizes: list[tuple[int, int]] | None = None) -> Any:
    """The engine's warm-up plan for the served sizes: fal's ``image_size`` presets on CUDA by default
    (none on CPU, where first calls cost little and full-size runs would slow every start); the
    default size (``square_hd``, both apps' default) is warmed before ready, the others after."""
    from pipelines.warmup import plan_warmup

    from ..inputs.image_sizes import PRESETS

    if sizes is None:
        device = getattr(engine, "device", None)
        sizes = sorted(set(PRESETS.values())) if getattr(device, "type", None) == "cuda" else []
    return plan_warmup(engine, sizes, PRESETS[DEFAULT_SIZE])
