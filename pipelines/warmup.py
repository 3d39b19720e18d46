"""The warm-up: what runs before the server says it is ready, and what runs after, in the background.

A plan is a list of :class:`WarmUnit` (one ``engine.run`` of ``rows`` requests of one variant at one
size), split in two:

* **before ready**: what the first request at the default size would otherwise pay. With a compiled
  engine that is every variant at every batch bucket (1/2/4/8) at the default size: the compiled
  blocks' graphs (shared by all variants: a handful in all), and one CUDA graph per variant and
  bucket, the 1-step variants included. Without compiling it is every variant once (lazy
  initialisation, weights touched once) and, on CUDA, the cheapest variant at each size (kernel and
  cuDNN plan selection happen per shape and are shared by the variants).
* **later**: with a compiled engine, the other sizes' CUDA graphs, recorded one unit at a time on the
  GPU thread between batches (``server/engine_host.py``). Until a size is done its requests run the
  compiled blocks without a CUDA graph: slower by the launch overhead, never compiling or recording.
"""

from __future__ import annotations

import logging
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

from PIL import Image

from .optimize import BATCH_BUCKETS
from .types import InpaintRequest

log = logging.getLogger(__name__)

SMALL = (64, 64)  # the size of a warm-up run that only pays first-call costs


@dataclass(frozen=True)
class WarmUnit:
    app_id: str
    steps: int
    size: tuple[int, int]
    rows: int = 1
    safety_checker: bool = False

    def requests(self, n: int) -> list[InpaintRequest]:
        width, height = self.size
        image = Image.new("RGB", self.size, (127, 127, 127))
        mask = Image.new("L", self.size, 0)
        mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
        return [
            InpaintRequest(
                app_id=self.app_id,
                image=image,
                mask=mask,
                prompt="warm-up",
                steps=self.steps,
                seed=k,
                image_size=self.size,
                enable_safety_checker=self.safety_checker,
                request_id=f"warmup-{n}-{k}",
            )
            for k in range(self.rows)
        ]


@dataclass
class WarmupPlan:
    ready: list[WarmUnit]
    later: list[WarmUnit]


def compiled(engine: Any) -> bool:
    return bool(getattr(getattr(engine, "speed", None), "compile", False))


def plan_warmup(engine: Any, sizes: list[tuple[int, int]], default_size: tuple[int, int] | None = None) -> WarmupPlan:
    """The plan for ``engine`` serving ``sizes`` (the default size first when it is among them)."""
    variants = sorted(engine.variants)
    if not compiled(engine):
        ready = [WarmUnit(app, steps, SMALL, safety_checker=n == 0) for n, (app, steps) in enumerate(variants)]
        cheapest = min(variants, key=lambda v: v[1])
        ready += [WarmUnit(*cheapest, size, safety_checker=True) for size in sizes]
        return WarmupPlan(ready, [])
    ordered = list(dict.fromkeys(([default_size] if default_size in sizes else []) + list(sizes))) or [SMALL]
    units = [
        [
            WarmUnit(app, steps, size, rows, safety_checker=n == 0 and rows == 1)
            for app, steps in variants
            for rows in BATCH_BUCKETS
        ]
        for n, size in enumerate(ordered)
    ]
    return WarmupPlan(units[0], [u for later in units[1:] for u in later])


def run_unit(engine: Any, unit: WarmUnit, n: int = 0) -> None:
    """Run one unit; compiling and CUDA-graph recording are allowed inside (``engine.warming()``)."""
    warming = getattr(engine, "warming", None)
    with warming() if warming is not None else nullcontext():
        for result in engine.run(unit.requests(n)):
            if result.error is not None:
                raise result.error


def run_units(engine: Any, units: list[WarmUnit], what: str) -> None:
    started = time.perf_counter()
    for n, unit in enumerate(units):
        run_unit(engine, unit, n)
    sizes = sorted({u.size for u in units})
    log.info(
        "warm-up %s: %d runs (%d variants, sizes %s) in %.1f s",
        what,
        len(units),
        len({(u.app_id, u.steps) for u in units}),
        sizes,
        time.perf_counter() - started,
    )
