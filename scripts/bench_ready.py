"""The ready section of scripts/bench.py: ``inpaint-server serve`` as an operator starts it.

It starts the real command twice on one fresh data directory, pointed at the benchmark's models with
``--model-path``: the first start compiles (when compiling) and fills the compile cache, the restart
reads it. Each is timed from launch to ``/health/ready`` answering 200 (the target: a restart with
warm caches is ready within 60 s). Then, on each, the first request after ready against the next
``--iterations`` ones (reliability case R18: the first request within ~1.2x the steady state, because
the warm-up ran the benchmark's size; ``INPAINT_WARMUP_SIZES`` is set to it).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from bench_http import REPO, ClientOptions, drive, free_port, request_body
from bench_measure import Inputs, Row
from bench_models import APP_NAME, ModelSet, log


def expansion_model(models: ModelSet) -> Path:
    """A tiny prompt-expansion model next to the benchmark's models. ``serve`` loads one at start (the
    benchmark never sets ``expand_prompt``, so its size does not matter); written once."""
    from pipelines.tiny import _expansion_files  # the project's tiny stand-in, in the real repo layout

    folder = models.root / "prompt-expansion"
    if not (folder / "model.safetensors").exists():
        tmp = folder.with_name(folder.name + ".partial")
        tmp.mkdir(parents=True, exist_ok=True)
        for name, content in _expansion_files().items():
            (tmp / name).write_bytes(content)
        tmp.rename(folder)
    return folder


def serve_command(args: argparse.Namespace, models: ModelSet, data_dir: Path, port: int) -> list[str]:
    """The ``serve`` command line for the benchmark's models, step counts and levers."""
    command = [sys.executable, "-m", "server.cli", "serve", "--host", "127.0.0.1", "--port", str(port)]
    command += ["--data-dir", str(data_dir), "--device", args.device]
    command += ["--max-batch-size", str(args.server_max_batch_size)]
    for n in args.steps:
        command += ["--app", f"{APP_NAME}:{n}"]
    for key, path in {**models.overrides(args.steps), "prompt_expansion": str(expansion_model(models))}.items():
        command += ["--model-path", f"{key}={path}"]
    if args.speed != "auto":
        command += ["--compile", "true" if "compile" in args.speed.split(",") else "false"]
    return command


def wait_ready(url: str, proc: subprocess.Popen, timeout: float) -> float:
    """Seconds until ``/health/ready`` answers 200 (counted by the caller from the launch)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode} before it was ready")
        try:
            answer = httpx.get(f"{url}/health/ready", timeout=2)
            if answer.status_code == 200:
                return time.monotonic()
            if answer.json().get("status") == "failed":
                raise RuntimeError(f"the server could not load its models: {answer.json().get('detail')}")
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"the server was not ready after {timeout:.0f} s")


def ready_rows(args: argparse.Namespace, models: ModelSet, inputs: Inputs) -> list[Row]:
    """Two starts (``first start``, ``restart``) on one data directory; one row each (steps ``args.steps[0]``)."""
    steps = args.steps[0]
    rows = []
    options = ClientOptions(args.wait, args.poll_interval, args.safety_checker)
    with tempfile.TemporaryDirectory(prefix="inpaint-bench-ready-") as tmp:
        data_dir = Path(tmp) / "data"
        env = {
            **os.environ,
            "INPAINT_WARMUP_SIZES": f"{inputs.width}x{inputs.height}",
            "INPAINT_LOG_LEVEL": "warning",
            "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
        }
        for start in ("first start", "restart"):
            port = free_port()
            url = f"http://127.0.0.1:{port}"
            logfile = Path(tmp) / f"serve-{start.replace(' ', '-')}.log"
            launched = time.monotonic()
            with logfile.open("wb") as out:
                proc = subprocess.Popen(serve_command(args, models, data_dir, port), env=env, stdout=out, stderr=out)
            try:
                ready_s = wait_ready(url, proc, args.ready_timeout) - launched

                def body(i: int) -> dict:
                    return request_body(inputs, steps, args.seed + 1 + i, options.safety_checker)

                wall, done = asyncio.run(drive(url, body, 1, 1 + args.iterations, options))
            except Exception:
                log(f"ready section: server log follows\n{logfile.read_text(errors='replace')[-4000:]}")
                raise
            finally:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=120)
                except subprocess.TimeoutExpired:
                    proc.kill()
            first, rest = done[0].latency_s, [d.latency_s for d in done[1:]]
            steady = float(np.median(rest)) if rest else float("nan")
            extra = {
                "start": start,
                "ready_s": round(ready_s, 2),
                "first_request_ms": round(first * 1000, 1),
                "first_vs_steady": round(first / steady, 3) if rest else None,
            }
            log(
                f"ready ({start}): {ready_s:.1f} s to ready; first request {first * 1000:.1f} ms, "
                f"then p50 {steady * 1000:.1f} ms (x{extra['first_vs_steady']})"
            )
            rows.append(Row(f"ready:{start}", steps, 1, 1, len(done), wall, rest or [first], extra))
    return rows
