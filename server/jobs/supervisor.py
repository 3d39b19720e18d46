"""``serve --devices``: one GPU worker process per device, started and watched by the server.

Each worker is ``inpaint-server worker --device D`` with the server's own settings (passed as ``INPAINT_*``
variables, API keys and TLS files left out), so a fatal CUDA error, a hung GPU or an out-of-memory kill takes
down one worker, not the API: its jobs are taken back by the server's sweeper at once (same host: its
process is provably gone) and run on another worker with the same seeds, and the supervisor starts the
worker again after a short back-off. On shutdown the workers get SIGTERM and drain like the server.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Any

from ..settings import ENV_PREFIX, Settings

log = logging.getLogger("inpaint-server.workers")

RESTART_BACKOFF_S = (1.0, 2.0, 5.0, 10.0, 30.0)
STABLE_S = 60.0  # a worker that ran this long restarts with the shortest back-off again
# Settings a worker does not need (secrets of the API) or sets itself.
NOT_PASSED = {"api_keys", "tls_cert", "tls_key", "devices", "workers", "device", "node_name", "worker_port"}


@dataclass
class _Child:
    device: str
    name: str
    proc: subprocess.Popen | None = None
    started: float = 0.0
    restarts: int = 0
    exits: list[int] = field(default_factory=list)


def worker_devices(settings: Settings) -> list[str]:
    """The device of each worker process ``serve`` starts: ``devices`` (``all``: every CUDA device, counted in a
    child process so this one never imports torch), or ``workers`` copies of ``device``."""
    if settings.devices == ["all"]:
        return [f"cuda:{i}" for i in range(_cuda_count())]
    if settings.devices:
        return list(settings.devices)
    return [settings.device or "auto"] * (settings.workers or 0)


def _cuda_count() -> int:
    code = "import torch; print(torch.cuda.device_count())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    try:
        count = int(out.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        count = 0
    if count == 0:
        raise RuntimeError("--devices all: no CUDA device found (nvidia-smi and the driver must see the GPUs)")
    return count


def settings_env(settings: Settings) -> dict[str, str]:
    """The settings as ``INPAINT_*`` variables for a worker process, so it runs with exactly this server's."""
    env: dict[str, str] = {}
    for name, value in settings.model_dump().items():
        if name in NOT_PASSED or value is None:
            continue
        env[ENV_PREFIX + name.upper()] = _env_value(value)
    return env


def _env_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    if isinstance(value, list | tuple):
        return ",".join(f"{v[0]}x{v[1]}" if isinstance(v, list | tuple) else str(v) for v in value)
    return str(value)


class WorkerSupervisor:
    """Starts one ``inpaint-server worker`` per device, restarts those that exit, drains them on shutdown."""

    def __init__(self, settings: Settings, base_name: str) -> None:
        self.settings = settings
        devices = worker_devices(settings)
        names = [f"{base_name}/{d}" if devices.count(d) == 1 else f"{base_name}/{d}.{i}" for i, d in enumerate(devices)]
        self.children = [_Child(device, name) for device, name in zip(devices, names, strict=True)]
        self._env = {**os.environ, **settings_env(settings)}
        self._task: asyncio.Task | None = None
        self._stopping = False

    def start(self) -> None:
        for child in self.children:
            self._spawn(child)
        self._task = asyncio.create_task(self._watch(), name="worker-supervisor")

    def _spawn(self, child: _Child) -> None:
        command = [sys.executable, "-m", "server.cli", "worker", "--node-name", child.name, "--port", "0"]
        if child.device != "auto":
            command += ["--device", child.device]
        child.proc = subprocess.Popen(command, env=self._env)
        child.started = time.monotonic()
        log.info("worker %s started (pid %d)", child.name, child.proc.pid)

    async def _watch(self) -> None:
        while not self._stopping:
            await asyncio.sleep(0.2)
            for child in self.children:
                code = child.proc.poll() if child.proc is not None else None
                if code is None or self._stopping:
                    continue
                child.exits.append(code)
                ran = time.monotonic() - child.started
                if ran > STABLE_S:
                    child.restarts = 0
                delay = RESTART_BACKOFF_S[min(child.restarts, len(RESTART_BACKOFF_S) - 1)]
                child.restarts += 1
                log.warning(
                    "worker %s exited with status %d after %.0f s; restarting in %g s", child.name, code, ran, delay
                )
                child.proc = None
                asyncio.get_running_loop().call_later(delay, self._respawn, child)

    def _respawn(self, child: _Child) -> None:
        if not self._stopping and child.proc is None:
            self._spawn(child)

    def pids(self) -> dict[str, int]:
        """The running workers' pids, by node name."""
        return {c.name: c.proc.pid for c in self.children if c.proc is not None and c.proc.poll() is None}

    def drain(self) -> None:
        """SIGTERM every worker: each finishes its running batch (within drain_grace_s) and exits."""
        self._stopping = True
        for child in self.children:
            if child.proc is not None and child.proc.poll() is None:
                child.proc.send_signal(signal.SIGTERM)

    async def stop(self) -> None:
        """Drain the workers and wait for them (drain_grace_s and a margin), then kill what is left."""
        self.drain()
        deadline = time.monotonic() + self.settings.drain_grace_s + 15
        for child in self.children:
            while child.proc is not None and child.proc.poll() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if child.proc is not None and child.proc.poll() is None:
                log.warning("worker %s did not stop in time; killing it", child.name)
                child.proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    child.proc.wait(5)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
