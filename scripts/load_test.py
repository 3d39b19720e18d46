"""Load test with a crash in the middle: nothing acknowledged may be lost.

Starts ``inpaint-server serve --models tiny`` on a fresh data directory (or targets ``--url``), sends
``--requests`` queue submissions from ``--concurrency`` concurrent clients, ``kill -9``s the server
once half of them are acknowledged, restarts it on the same data directory and port, then waits
for every acknowledged request to finish. Clients retry a submit that got no answer (connection
refused or reset, 503 while the server restarts) with the same ``Idempotency-Key``, so a submit the
server committed just before dying is not created twice.

Prints accepted, completed, failed and lost (acknowledged request ids that are unknown to the server
or never complete; must be 0) and each server process's peak RSS (VmHWM from /proc/<pid>/status).
Exits 1 if anything was lost.

    python scripts/load_test.py                          # 1000 requests, 50 clients, kill -9 midway
    python scripts/load_test.py --requests 20 --concurrency 5
    python scripts/load_test.py --url http://gpu-box:8000 --api-key "$KEY"   # no kill, no RSS
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import io
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
APP = "fal-ai/fast-lightning-sdxl/inpainting"
ENDPOINT = "fal-ai/fast-lightning-sdxl"
RETRY_STATUSES = {429, 502, 503, 504}  # no answer worth keeping: retry the same submit


def small_inputs(width: int, height: int) -> tuple[str, str]:
    """A noise image and a box mask as PNG data URIs."""
    import numpy as np
    from PIL import Image

    def uri(image: Image.Image) -> str:
        buf = io.BytesIO()
        image.save(buf, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()

    pixels = (np.random.RandomState(0).rand(height, width, 3) * 255).astype(np.uint8)
    mask = Image.new("L", (width, height), 0)
    mask.paste(255, (width // 4, height // 4, 3 * width // 4, 3 * height // 4))
    return uri(Image.fromarray(pixels, mode="RGB")), uri(mask)


def peak_rss_kib(pid: int) -> int | None:
    """VmHWM (peak resident set size) of a live process, in KiB."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except (OSError, ValueError):
        return None
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ManagedServer:
    """``inpaint-server serve`` as a child process; remembers the peak RSS of every process it ran."""

    def __init__(self, data_dir: Path, port: int, max_batch_size: int, app: str) -> None:
        self.data_dir = data_dir
        self.port = port
        exe = shutil.which("inpaint-server")
        self.command = [exe] if exe else [sys.executable, "-m", "server.cli"]
        self.command += ["serve", "--models", "tiny", "--host", "127.0.0.1", "--port", str(port)]
        self.command += ["--data-dir", str(data_dir), "--max-batch-size", str(max_batch_size), "--app", app]
        self.proc: subprocess.Popen | None = None
        self.peaks: list[tuple[int, int | None, str]] = []  # (pid, VmHWM KiB, how it ended)
        self._peak: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self, timeout: float = 300.0) -> None:
        log = (self.data_dir / f"server-{len(self.peaks) + 1}.log").open("ab")
        self.proc = subprocess.Popen(self.command, cwd=REPO, stdout=log, stderr=log)
        self._peak = None
        deadline = time.monotonic() + timeout
        async with httpx.AsyncClient(timeout=2) as client:
            while True:
                self.sample()
                if self.proc.poll() is not None:
                    raise SystemExit(f"the server exited with {self.proc.returncode}; see {log.name}")
                try:
                    if (await client.get(f"{self.url}/health/ready")).status_code == 200:
                        return
                except httpx.HTTPError:
                    pass
                if time.monotonic() > deadline:
                    raise SystemExit(f"the server was not ready after {timeout:.0f} s; see {log.name}")
                await asyncio.sleep(0.2)

    def sample(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            value = peak_rss_kib(self.proc.pid)
            if value is not None:
                self._peak = max(self._peak or 0, value)

    def kill9(self) -> None:
        assert self.proc is not None
        self.sample()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()
        self.peaks.append((self.proc.pid, self._peak, "kill -9"))

    def stop(self) -> int:
        """SIGTERM (the server drains) and wait; returns the exit code."""
        assert self.proc is not None
        self.sample()
        self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.peaks.append((self.proc.pid, self._peak, f"SIGTERM, exit {code}"))
        return code


@dataclass
class Tally:
    accepted: dict[int, str] = field(default_factory=dict)  # submission index -> request id
    refused: collections.Counter = field(default_factory=collections.Counter)  # final 4xx by status
    retries: int = 0
    replayed: int = 0  # retries answered with the id the server had already committed
    kill_at: int | None = None
    reached: asyncio.Event = field(default_factory=asyncio.Event)  # kill_at submits accepted


async def submit_all(args: argparse.Namespace, base_url: str, tally: Tally, headers: dict[str, str]) -> None:
    image, mask = small_inputs(args.width, args.height)
    run = uuid.uuid4().hex[:8]
    next_index = iter(range(args.requests))

    async def client_loop(client: httpx.AsyncClient) -> None:
        for i in next_index:
            body = {
                "image_url": image,
                "mask_url": mask,
                "prompt": f"load test {i}",
                "image_size": {"width": args.width, "height": args.height},
                "seed": i,
                "format": "png",
            }
            key = {"Idempotency-Key": f"load-{run}-{i}"}
            deadline = time.monotonic() + args.submit_timeout
            while True:
                try:
                    response = await client.post(f"/queue/{APP}", json=body, headers=key)
                except httpx.TransportError:
                    response = None  # refused, reset or timed out: the server may or may not have it
                if response is not None and response.status_code == 200:
                    tally.accepted[i] = response.json()["request_id"]
                    if tally.kill_at is not None and len(tally.accepted) >= tally.kill_at:
                        tally.reached.set()
                    tally.replayed += response.headers.get("idempotent-replayed") == "true"
                    break
                if response is not None and response.status_code not in RETRY_STATUSES:
                    tally.refused[response.status_code] += 1
                    break
                if time.monotonic() > deadline:
                    tally.refused["gave up"] += 1
                    break
                tally.retries += 1
                await asyncio.sleep(0.25)

    async with httpx.AsyncClient(base_url=base_url, timeout=30, headers=headers) as client:
        await asyncio.gather(*(client_loop(client) for _ in range(args.concurrency)))


async def wait_outcomes(
    base_url: str, ids: list[str], timeout: float, headers: dict[str, str]
) -> tuple[dict[str, dict], set[str], set[str]]:
    """Poll every request until it completes. Returns (final status bodies, unknown ids, unfinished ids)."""
    done: dict[str, dict] = {}
    unknown: set[str] = set()
    pending = list(ids)
    gate = asyncio.Semaphore(50)
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(base_url=base_url, timeout=30, headers=headers) as client:

        async def poll(request_id: str) -> None:
            async with gate:
                try:
                    response = await client.get(f"/queue/{ENDPOINT}/requests/{request_id}/status")
                except httpx.TransportError:
                    return
            if response.status_code == 404:
                unknown.add(request_id)
            elif response.status_code == 200 and response.json()["status"] == "COMPLETED":
                done[request_id] = response.json()

        while pending and time.monotonic() < deadline:
            await asyncio.gather(*(poll(request_id) for request_id in pending))
            pending = [i for i in pending if i not in done and i not in unknown]
            if pending:
                await asyncio.sleep(1.0)
    return done, unknown, set(pending)


async def main_async(args: argparse.Namespace) -> int:
    headers = {"Authorization": f"Key {args.api_key}"} if args.api_key else {}
    server: ManagedServer | None = None
    data_dir: Path | None = None
    temporary = False
    if args.url:
        base_url = args.url.rstrip("/")
    else:
        temporary = not args.data_dir
        data_dir = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="inpaint-load-"))
        data_dir.mkdir(parents=True, exist_ok=True)
        server = ManagedServer(data_dir, args.port or free_port(), args.max_batch_size, args.app)
        print(f"starting: {' '.join(server.command)}", flush=True)
        await server.start()
        base_url = server.url

    tally = Tally()
    if server is not None and args.kill_at > 0:
        tally.kill_at = max(1, int(args.requests * args.kill_at))
    started = time.monotonic()
    killed_after: int | None = None

    async def sample_rss() -> None:
        while True:
            assert server is not None
            server.sample()
            await asyncio.sleep(0.1)

    async def crash_midway() -> None:
        nonlocal killed_after
        assert server is not None
        await tally.reached.wait()
        killed_after = len(tally.accepted)
        server.kill9()
        print(f"kill -9 after {killed_after} accepted; restarting on the same data dir", flush=True)
        await server.start()
        print(f"restarted {time.monotonic() - started:.1f} s into the run", flush=True)

    watchers = [asyncio.create_task(sample_rss())] if server is not None else []
    crash = asyncio.create_task(crash_midway()) if tally.kill_at is not None else None
    await submit_all(args, base_url, tally, headers)
    submitted_s = time.monotonic() - started
    print(f"submissions done in {submitted_s:.1f} s; waiting for the requests to finish", flush=True)
    if crash is not None and not tally.reached.is_set():
        crash.cancel()  # fewer accepted than kill_at (refusals): no crash this run
    elif crash is not None:
        await crash  # the restarted server answers the polls
    done, unknown, unfinished = await wait_outcomes(base_url, list(tally.accepted.values()), args.timeout, headers)
    for task in watchers:
        task.cancel()
    total_s = time.monotonic() - started

    failed = {i: b for i, b in done.items() if b.get("error")}
    by_type = collections.Counter(b.get("error_type") for b in failed.values())
    lost = unknown | unfinished
    duplicates = None
    exit_code = None
    if server is not None:
        exit_code = server.stop()
        assert data_dir is not None
        with sqlite3.connect(data_dir / "jobs.sqlite3") as db:
            stored = db.execute("SELECT COUNT(*) FROM jobs").fetchone()[0]
        duplicates = stored - len(set(tally.accepted.values()))

    print()
    print(f"submitted:   {args.requests} ({args.concurrency} concurrent clients, {args.width}x{args.height} inputs)")
    print(f"accepted:    {len(tally.accepted)} (distinct ids {len(set(tally.accepted.values()))})")
    print(f"refused:     {sum(tally.refused.values())} {dict(tally.refused) or ''}")
    print(f"retried:     {tally.retries} submit attempts ({tally.replayed} answered with an id committed earlier)")
    print(f"completed:   {len(done) - len(failed)}")
    print(f"failed:      {len(failed)} {dict(by_type) or ''}")
    print(f"lost:        {len(lost)} (unknown {len(unknown)}, never completed {len(unfinished)})")
    if duplicates is not None:
        print(f"duplicates:  {duplicates} (jobs in the store beyond the accepted ids)")
    if killed_after is not None:
        print(f"crash:       kill -9 after {killed_after} accepted, restarted on the same data dir")
    print(f"time:        {submitted_s:.1f} s to submit, {total_s:.1f} s until all finished")
    if server is not None:
        for n, (pid, peak, ended) in enumerate(server.peaks, 1):
            shown = f"{peak / 1024:.0f} MiB" if peak is not None else "unknown"
            print(f"peak RSS:    server #{n} (pid {pid}, {ended}): {shown}")
        if temporary and not lost and not args.keep:
            shutil.rmtree(data_dir, ignore_errors=True)
        else:
            print(f"data dir:    {data_dir} (server logs there)")
    else:
        print("peak RSS:    not measured (--url: the server is not a child of this script)")
    summary = {
        "accepted": len(tally.accepted),
        "completed": len(done) - len(failed),
        "failed": len(failed),
        "lost": len(lost),
        "duplicates": duplicates,
        "peak_rss_kib": [peak for _, peak, _ in server.peaks] if server is not None else None,
        "exit_code": exit_code,
    }
    print("summary:     " + json.dumps(summary))
    return 1 if lost else 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="target this server instead of starting one (no kill, no RSS)")
    parser.add_argument("--api-key", default=os.environ.get("INPAINT_LOAD_API_KEY"), help="sent as 'Key <key>'")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=50)
    parser.add_argument("--kill-at", type=float, default=0.5, help="kill -9 after this share is accepted (0: never)")
    parser.add_argument("--data-dir", help="data directory of the started server (default: a new temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data dir (kept anyway if any is lost)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--max-batch-size", type=int, default=8)
    parser.add_argument("--app", default="fast-lightning-sdxl:4", help="variants the started server loads")
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--height", type=int, default=48)
    parser.add_argument("--submit-timeout", type=float, default=300.0, help="give up retrying one submit after this")
    parser.add_argument("--timeout", type=float, default=1800.0, help="longest wait for all requests to finish")
    args = parser.parse_args(argv)
    return asyncio.run(main_async(args))


if __name__ == "__main__":
    sys.exit(main())
