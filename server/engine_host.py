"""Loading the engine off the event loop, warming it up, and saying honestly whether it is ready."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

log = logging.getLogger("inpaint-server.engine")


class EngineHost:
    """Holds the engine. ``state`` is ``loading``, ``warming``, ``ready``, ``failed`` (did not load) or
    ``gpu_fault`` (a fatal GPU error or a hung GPU; the process is about to exit for a restart).

    ``gpu`` is the one thread that runs the engine (the warm-up and every batch): CUDA graphs, and
    the memory pool they record into, belong to the thread that captured them, so a warm-up on one
    thread and requests on others would capture everything again, per thread.
    """

    def __init__(
        self,
        engine: Any = None,
        loader: Callable[[], Any] | None = None,
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
                self.gpu.submit(self._warm).result()
            self.state = "ready"
            log.info("engine ready")
            loop.call_soon_threadsafe(self._ready.set)
        except Exception as exc:  # reported by /health/ready; the process stays up to say why
            self.state = "failed"
            self.error = f"{type(exc).__name__}: {exc}"
            log.exception("engine failed to load")
            loop.call_soon_threadsafe(self._ready.set)  # wake waiters: they check ``ready`` and fail jobs

    def _warm(self) -> None:
        warm_up(self.engine, self._warmup_sizes)
        seal = getattr(self.engine, "seal_compiled_shapes", None)
        if seal is not None:
            seal()  # from now on a shape the warm-up did not compile runs eagerly instead of compiling


def warm_up(engine: Any, sizes: list[tuple[int, int]] | None = None, buckets: tuple[int, ...] | None = None) -> None:
    """Run every loaded variant once, then the cheapest variant at each size in ``sizes``.

    The first pass pays each variant's first-call costs (lazy initialisation, weights touched once).
    The second pays each resolution's: on CUDA, kernel and cuDNN plan selection and the caching
    allocator's growth happen per shape and are shared by the variants (one architecture), so one
    1-step run per size is enough for the first user request at that size to run at steady-state
    speed (reliability case R18). ``sizes`` defaults to fal's ``image_size`` presets on CUDA and to
    none on CPU, where first calls cost little and full-size runs would slow every start.

    A compiled engine (``engine.speed.compile``) has one graph per shape and module, so there every
    variant runs every size at every batch bucket (``buckets``, default 1/2/4/8): that is when the
    compilation happens (from the compile cache after the first start), before the server is ready.
    """
    from PIL import Image

    from pipelines import InpaintRequest

    from .image_sizes import PRESETS

    if sizes is None:
        device = getattr(engine, "device", None)
        sizes = sorted(set(PRESETS.values())) if getattr(device, "type", None) == "cuda" else []

    compiled = bool(getattr(getattr(engine, "speed", None), "compile", False))
    if buckets is None:
        from pipelines.optimize import BATCH_BUCKETS

        buckets = BATCH_BUCKETS if compiled else (1,)

    def run(n: int, app_id: str, steps: int, size: tuple[int, int], check_safety: bool, batch: int = 1) -> None:
        image = Image.new("RGB", size, (127, 127, 127))
        mask = Image.new("L", size, 0)
        mask.paste(255, (size[0] // 4, size[1] // 4, 3 * size[0] // 4, 3 * size[1] // 4))
        requests = [
            InpaintRequest(
                app_id=app_id,
                image=image,
                mask=mask,
                prompt="warm-up",
                steps=steps,
                seed=k,
                image_size=size,
                enable_safety_checker=check_safety,
                request_id=f"warmup-{n}-{k}",
            )
            for k in range(batch)
        ]
        for result in engine.run(requests):
            if result.error is not None:
                raise result.error

    started = time.perf_counter()
    variants = sorted(engine.variants)
    for n, (app_id, steps) in enumerate(variants):
        run(n, app_id, steps, (64, 64), n == 0)
    n = len(variants)
    if compiled:
        for app_id, steps in variants:
            for size in sizes:
                for batch in buckets:
                    run(n, app_id, steps, size, False, batch)
                    n += 1
    else:
        cheapest = min(variants, key=lambda v: v[1])
        for size in sizes:
            run(n, *cheapest, size, True)
            n += 1
    log.info(
        "warm-up done for %d variants, %d sizes and batches %s in %.1f s",
        len(variants),
        len(sizes),
        "/".join(map(str, buckets)),
        time.perf_counter() - started,
    )
