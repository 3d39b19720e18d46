"""Test-only GPU fault injection. Off unless a test sets ``Engine.fault_hook`` or ``INPAINT_TEST_FAULTS``.

The engine calls ``engine.fault_hook(point)`` (when it is not None) at named points of a real run:

* ``denoise_step``: after each UNet step (``point.step`` is 0-based);
* ``decode``: just before the VAE decode;
* ``device_check``: in the device self-check after a request ran out of memory for good.

A hook may raise (an OOM, a fatal CUDA error, an ordinary bug) or sleep (a hung kernel). Tests in-process set the
attribute; subprocess servers read a JSON spec from ``INPAINT_TEST_FAULTS``, one rule or a list:

    {"at": "decode", "fault": "oom", "times": 1}
    [{"at": "denoise_step", "fault": "fatal", "prompt": "poison"}]
    {"at": "denoise_step", "fault": "error", "prompt": "poison"}
    {"at": "denoise_step", "fault": "hang", "seconds": 60}

Rule keys: ``at`` (a point), ``fault`` (``oom``, ``fatal``, ``hang`` or ``error``: an exception that is no GPU
fault, as a bug or input the engine cannot take raises), optional ``times`` (fire at most this often; default
always), ``prompt`` (only batches with a prompt containing this text: one request can be the culprit),
``min_batch`` (only batches of at least this many requests), ``tiled`` (only with VAE tiling on/off),
``seconds`` (how long ``hang`` sleeps, default 3600). Never set it in production: the server logs a
warning at start when it is set.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from .errors import ConfigError

log = logging.getLogger(__name__)

ENV_VAR = "INPAINT_TEST_FAULTS"
POINTS = ("denoise_step", "decode", "device_check")
FAULTS = ("oom", "fatal", "hang", "error")


@dataclass(frozen=True)
class FaultPoint:
    """Where a run is: the point's name, the requests of the (sub-)batch, and the memory mode."""

    name: str
    request_ids: tuple[str, ...]
    prompts: tuple[str, ...]
    vae_tiling: bool
    step: int | None = None


FaultHook = Callable[[FaultPoint], None]


@dataclass
class FaultRule:
    at: str
    fault: str
    times: int | None = None
    prompt: str | None = None
    min_batch: int = 1
    tiled: bool | None = None
    seconds: float = 3600.0

    def __post_init__(self) -> None:
        if self.at not in POINTS:
            raise ValueError(f"'at' must be one of {list(POINTS)}, got {self.at!r}")
        if self.fault not in FAULTS:
            raise ValueError(f"'fault' must be one of {list(FAULTS)}, got {self.fault!r}")
        if self.times is not None and (type(self.times) is not int or self.times < 0):
            raise ValueError(f"'times' must be a whole number >= 0, got {self.times!r}")
        if type(self.min_batch) is not int or self.min_batch < 1:
            raise ValueError(f"'min_batch' must be a whole number >= 1, got {self.min_batch!r}")
        if not isinstance(self.seconds, int | float) or self.seconds < 0:
            raise ValueError(f"'seconds' must be a number >= 0, got {self.seconds!r}")

    def matches(self, point: FaultPoint) -> bool:
        return (
            point.name == self.at
            and len(point.request_ids) >= self.min_batch
            and (self.tiled is None or point.vae_tiling == self.tiled)
            and (self.prompt is None or any(self.prompt in prompt for prompt in point.prompts))
        )


class FaultInjector:
    """A fault hook made of rules; the first matching rule with fires left fires. Records what it saw."""

    def __init__(self, rules: list[FaultRule]) -> None:
        self.rules = rules
        self._left = [rule.times for rule in rules]
        self.seen: deque[FaultPoint] = deque(maxlen=10_000)
        self.fired: list[tuple[FaultPoint, str]] = []
        self._lock = threading.Lock()

    @classmethod
    def from_spec(cls, spec: Any) -> FaultInjector:
        """Rules from a JSON value (a rule object or a list of them); ValueError says what is wrong."""
        items = spec if isinstance(spec, list) else [spec]
        names = {f.name for f in fields(FaultRule)}
        rules = []
        for item in items:
            if not isinstance(item, Mapping):
                raise ValueError(f"each rule must be a JSON object, got {item!r}")
            unknown = set(item) - names
            if unknown:
                raise ValueError(f"unknown rule keys {sorted(unknown)} (known: {sorted(names)})")
            try:
                rules.append(FaultRule(**item))
            except TypeError as exc:
                raise ValueError(str(exc)) from None
        return cls(rules)

    def __call__(self, point: FaultPoint) -> None:
        with self._lock:
            self.seen.append(point)
            rule = None
            for k, candidate in enumerate(self.rules):
                if candidate.matches(point) and (self._left[k] is None or self._left[k] > 0):
                    if self._left[k] is not None:
                        self._left[k] -= 1
                    rule = candidate
                    break
            if rule is None:
                return
            self.fired.append((point, rule.fault))
        log.warning("injecting a test fault: %s at %s for %s", rule.fault, point.name, ",".join(point.request_ids))
        inject(rule.fault, point.name, rule.seconds)


def inject(fault: str, where: str, seconds: float = 3600.0) -> None:
    """Raise (``oom``, ``fatal``, ``error``) or sleep (``hang``) the way a real fault would."""
    note = f"(injected by a test at {where})"
    if fault == "oom":
        raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate 20.00 GiB {note}")
    if fault == "fatal":
        raise RuntimeError(f"CUDA error: an illegal memory access was encountered {note}")
    if fault == "hang":
        time.sleep(seconds)
        return
    if fault == "error":
        raise TypeError(f"TextEncodeInput must be Union[TextInputSequence, Tuple[InputSequence, InputSequence]] {note}")
    raise ValueError(f"unknown fault {fault!r}")


def hook_from_env(environ: Mapping[str, str] = os.environ) -> FaultInjector | None:
    """The injector ``INPAINT_TEST_FAULTS`` describes, or None when it is unset (the normal case)."""
    text = environ.get(ENV_VAR)
    if not text:
        return None
    try:
        injector = FaultInjector.from_spec(json.loads(text))
    except ValueError as exc:  # json.JSONDecodeError is a ValueError
        raise ConfigError(f"{ENV_VAR} is not a valid fault spec: {exc}") from None
    log.warning("%s is set: TEST FAULT INJECTION IS ON (%s); never use this in production", ENV_VAR, text)
    return injector
