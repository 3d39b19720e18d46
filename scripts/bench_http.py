"""The server section of scripts/bench.py: the real app on a loopback port, driven over HTTP."""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
import torch
from bench_measure import Inputs, Row, prompt_for
from bench_models import (
    APP,
    APP_NAME,
    DTYPES,
    ModelSet,
    compile_cache,
    load_engine,
    log,
    quiet_libraries,
    speed_options,
)

from pipelines.engine import Engine

if TYPE_CHECKING:
    from fastapi import FastAPI

BENCH = Path(__file__).resolve().parent / "bench.py"
REPO = BENCH.parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def build_app(
    engine: Engine, models: ModelSet, steps: Sequence[int], data_dir: Path, port: int, max_batch: int
) -> FastAPI:
    """The real server app around an already loaded and warmed engine (no auth; ``load_engine`` warmed it)."""
    from pipelines.specs import default_config_dir
    from server.app import create_app
    from server.settings import load_settings

    settings = load_settings(
        {
            "host": "127.0.0.1",
            "port": port,
            "data_dir": data_dir,
            "config_dir": default_config_dir(),
            "model_paths": models.overrides(steps),
            "apps": [f"{APP_NAME}:{n}" for n in steps],
            "warmup": False,
            "max_batch_size": max_batch,
            "max_queue_size": 1_000_000,
            "api_keys": [],
            "rate_limit_per_minute": 0,
            "webhook_signing": False,
            "log_level": "warning",
        }
    )
    return create_app(settings, engine=engine)


class BenchServer:
    """The server under test on a loopback port: a child process (``process``) or a uvicorn thread (``thread``)."""

    def __init__(self, mode: str, child_argv: list[str], app_factory: Callable[[int], Any], data_dir: Path) -> None:
        self.mode = mode
        self.port = free_port()
        self.data_dir = data_dir
        self._child_argv = child_argv
        self._app_factory = app_factory
        self._proc: subprocess.Popen | None = None
        self._server: Any = None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> BenchServer:
        started = time.perf_counter()
        if self.mode == "process":
            command = [sys.executable, str(BENCH), *self._child_argv]
            command += ["--serve-child", str(self.port), "--data-dir", str(self.data_dir)]
            env = {**os.environ, "HF_HUB_OFFLINE": "1"}
            with (self.data_dir / "server.log").open("ab") as log_file:  # the child keeps its own copy
                self._proc = subprocess.Popen(command, cwd=REPO, env=env, stdout=log_file, stderr=log_file)
        else:
            import uvicorn

            config = uvicorn.Config(self._app_factory(self.port), host="127.0.0.1", port=self.port, log_level="warning")
            self._server = uvicorn.Server(config)
            self._thread = threading.Thread(target=self._server.run, name="bench-server", daemon=True)
            self._thread.start()
        self._wait_ready(timeout=900)
        log(f"server ({self.mode}) ready at {self.url} after {time.perf_counter() - started:.1f} s")
        return self

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self._proc is not None and self._proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self._proc.returncode}:\n{self.log_tail()}")
            if self._thread is not None and not self._thread.is_alive():
                raise RuntimeError("the server thread ended before it was ready (see the log above)")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.url}/health/ready", timeout=2).status_code == 200:
                    return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server was not ready after {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.1)

    def log_tail(self, lines: int = 30) -> str:
        """The end of the child's output (process mode), for error messages."""
        path = self.data_dir / "server.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.is_file() else ""

    def __exit__(self, exc_type: type[BaseException] | None, *exc: object) -> None:
        if exc_type is not None and self._proc is not None:
            ended = self._proc.poll()
            state = f"exited with {ended}" if ended is not None else "still running"
            log(f"the server section failed; the server process {state}; its last output:\n{self.log_tail()}")
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                self._proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        if self._server is not None and self._thread is not None:
            self._server.should_exit = True
            self._thread.join(timeout=60)


@dataclass(frozen=True)
class ClientOptions:
    """How the clients wait for a result (``poll`` the status every ``poll_interval`` s, or its ``stream``)."""

    wait: str = "poll"
    poll_interval: float = 0.01
    safety_checker: bool = False


@dataclass
class Completed:
    """One finished request as a client saw it."""

    latency_s: float
    status_reads: int  # status polls, or event-stream lines with wait="stream"
    timings: dict[str, float]  # the result's own ``timings`` (the server's stages, seconds)


def request_body(inputs: Inputs, steps: int, seed: int, safety_checker: bool) -> dict[str, Any]:
    """A queue submit like a fal client sends it: the inputs as data URIs, a JPEG result."""

    def uri(data: bytes, mime: str) -> str:
        return f"data:{mime};base64,{base64.b64encode(data).decode()}"

    return {
        "image_url": uri(inputs.image_bytes, "image/jpeg"),
        "mask_url": uri(inputs.mask_bytes, "image/png"),
        "prompt": prompt_for(seed),
        "num_inference_steps": str(steps),
        "image_size": {"width": inputs.width, "height": inputs.height},
        "seed": seed,
        "strength": 1.0,
        "enable_safety_checker": safety_checker,
        "format": "jpeg",
    }


async def one_request(client: httpx.AsyncClient, url: str, body: dict[str, Any], options: ClientOptions) -> Completed:
    """Submit, wait for COMPLETED, fetch the result and its image bytes; the latency ends at the last byte."""
    started = time.perf_counter()
    response = await client.post(f"{url}/queue/{APP}", json=body)
    if response.status_code != 200:
        raise RuntimeError(f"submit answered {response.status_code}: {response.text[:300]}")
    submitted = response.json()
    reads = 0
    if options.wait == "stream":
        async with client.stream("GET", submitted["status_url"] + "/stream") as stream:
            async for line in stream.aiter_lines():
                reads += 1
                if line.startswith("data:") and json.loads(line[5:])["status"] == "COMPLETED":
                    break
    else:
        while True:
            reads += 1
            status = await client.get(submitted["status_url"])
            if status.status_code not in (200, 202):
                raise RuntimeError(f"status answered {status.status_code}: {status.text[:300]}")
            if status.json()["status"] == "COMPLETED":
                break
            await asyncio.sleep(options.poll_interval)
    result = await client.get(submitted["response_url"])
    if result.status_code != 200:
        raise RuntimeError(f"result answered {result.status_code}: {result.text[:300]}")
    output = result.json()
    size = (body["image_size"]["width"], body["image_size"]["height"])
    images = output.get("images") or []
    if len(images) != 1 or (images[0]["width"], images[0]["height"]) != size:
        raise RuntimeError(f"unexpected result images: {images!r}")
    picture = await client.get(images[0]["url"])
    if picture.status_code != 200 or not picture.content.startswith(b"\xff\xd8"):
        raise RuntimeError(f"image fetch answered {picture.status_code} ({len(picture.content)} bytes)")
    return Completed(time.perf_counter() - started, reads, output.get("timings") or {})


async def drive(
    url: str, bodies: Callable[[int], dict[str, Any]], clients: int, per_client: int, options: ClientOptions
) -> tuple[float, list[Completed]]:
    """``clients`` concurrent clients, each sending ``per_client`` requests one after another.

    Returns (wall seconds from the first submit to the last image byte, every completed request).
    """
    limits = httpx.Limits(max_connections=clients + 4, max_keepalive_connections=clients + 4)
    done: list[Completed] = []
    async with httpx.AsyncClient(timeout=httpx.Timeout(900.0), limits=limits) as client:

        async def client_loop(c: int) -> None:
            for k in range(per_client):
                done.append(await one_request(client, url, bodies(c * per_client + k), options))

        started = time.perf_counter()
        await asyncio.gather(*(client_loop(c) for c in range(clients)))
        return time.perf_counter() - started, done


def bench_server(
    url: str, inputs: Inputs, steps: int, clients: int, per_client: int, seed: int, options: ClientOptions
) -> Row:
    """One row: ``clients`` closed-loop clients; also the server's mean stage timings and status reads."""

    def body(i: int) -> dict[str, Any]:
        return request_body(inputs, steps, seed + 1 + i, options.safety_checker)

    wall, done = asyncio.run(drive(url, body, clients, per_client, options))
    stages = sorted({k for d in done for k in d.timings})
    extra = {
        "status_reads_per_request": round(sum(d.status_reads for d in done) / len(done), 2),
        "server_timings_mean_ms": {
            k: round(1000 * sum(d.timings.get(k, 0.0) for d in done) / len(done), 2) for k in stages
        },
    }
    return Row("server", steps, 1, clients, len(done), wall, [d.latency_s for d in done], extra)


def warm_server(url: str, inputs: Inputs, steps: int, rounds: int, width: int, options: ClientOptions) -> None:
    """Untimed: ``rounds`` single requests and ``rounds`` bursts of ``width`` concurrent ones (batch buckets)."""

    def body(i: int) -> dict[str, Any]:
        return request_body(inputs, steps, 7 + i, options.safety_checker)

    for _ in range(rounds):
        asyncio.run(drive(url, body, 1, 1, options))
        asyncio.run(drive(url, body, width, 1, options))


def server_rows(args: argparse.Namespace, models: ModelSet, engine: Engine | None, inputs: Inputs) -> list[Row]:
    """The server section: per step count, warm up, then one row per client count."""
    rows = []
    child_argv = [
        "--arch", args.arch, "--models-dir", str(models.root), "--device", args.device,
        "--engine-dtype", args.engine_dtype, "--steps", ",".join(map(str, args.steps)),
        "--server-max-batch-size", str(args.server_max_batch_size), "--speed", args.speed,
    ]  # fmt: skip
    if args.safety_checker:
        child_argv.append("--safety-checker")
    with tempfile.TemporaryDirectory(prefix="inpaint-bench-") as tmp:
        data_dir = Path(tmp)

        def app_factory(port: int) -> Any:
            assert engine is not None
            return build_app(engine, models, args.steps, data_dir, port, args.server_max_batch_size)

        options = ClientOptions(args.wait, args.poll_interval, args.safety_checker)
        burst = min(args.server_max_batch_size, max(args.clients))
        with BenchServer(args.server_mode, child_argv, app_factory, data_dir) as server:
            for n in args.steps:
                warm_server(server.url, inputs, n, args.warmup, burst, options)
                for c in args.clients:
                    per_client = max(args.requests_per_client, -(-args.server_requests // c))
                    rows.append(bench_server(server.url, inputs, n, c, per_client, args.seed, options))
                    log(f"server {n} steps, {c} clients: {rows[-1].images / rows[-1].wall_s:.2f} img/s")
    return rows


def serve_child(args: argparse.Namespace) -> int:
    """``--serve-child PORT``: load the engine and serve it until SIGTERM (the parent's server section)."""
    import uvicorn

    quiet_libraries()
    models = ModelSet(Path(args.models_dir))
    device = torch.device(args.device)
    speed = speed_options(args.speed, device, compile_cache(models), args.compile_backend)
    engine = load_engine(
        models, args.steps, device, DTYPES[args.engine_dtype], args.safety_checker, speed, args.resolution
    )
    app = build_app(engine, models, args.steps, Path(args.data_dir), args.serve_child, args.server_max_batch_size)
    uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=args.serve_child, log_level="warning")).run()
    return 0
