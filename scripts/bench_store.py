"""How many durable submits and status polls one API node answers, per job store, side by side.

Starts an API node (``inpaint-server serve --workers 0``: no GPU worker, so nothing runs and the queue only
grows) once per store (SQLite, and PostgreSQL: a throwaway server made with initdb/pg_ctl, or
``--postgres URL``), then for ``--seconds`` each:

* ``submit``: ``--concurrency`` clients queue requests; each counted once the server answered 200,
  that is, once the job row is committed;
* ``status``: the same clients poll the status of random queued requests (with the queue position,
  which the store counts).

Prints one JSON line per store and phase (requests/s, p50/p99 latency, queue depth reached) and writes
them to ``--json``. The clients run on the same machine as the server and its database, so the numbers
are a floor for that machine, and the ratio between stores is the point.

    python scripts/bench_store.py --seconds 10 --concurrency 32 --json docs/store-bench.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.live import free_port  # noqa: E402  (the script reuses the tests' loopback helpers)

APP = "fal-ai/fast-lightning-sdxl/inpainting"


def _png(mode: str, color: int | tuple[int, int, int]) -> str:
    buf = io.BytesIO()
    Image.new(mode, (64, 48), color).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


BODY = {
    "image_url": _png("RGB", (120, 80, 40)),
    "mask_url": _png("L", 255),
    "prompt": "a red balloon",
    "image_size": {"width": 64, "height": 48},
}


def start_server(store: str, data_dir: Path, log: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {
        **os.environ,
        "INPAINT_WARMUP": "false",
        "INPAINT_APPS": "fast-lightning-sdxl:4",
        "OMP_NUM_THREADS": "1",
        "INPAINT_LOG_LEVEL": "warning",
        "INPAINT_MAX_QUEUE_SIZE": "1000000",  # measure the store, not the queue bounds
        "INPAINT_QUEUE_MAX_WAIT_S": "1e9",
    }
    args = [sys.executable, "-m", "server.cli", "serve", "--workers", "0", "--port", str(port)]
    args += ["--data-dir", str(data_dir), "--store", store]
    with log.open("ab") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health/ready", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise SystemExit(f"server on {store} did not get ready; see {log}")


async def _phase(url: str, seconds: float, concurrency: int, ids: list[str], kind: str) -> dict:
    latencies: list[float] = []
    errors = 0
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=30, limits=limits) as client:

        async def one_client() -> None:
            nonlocal errors
            while time.monotonic() < deadline:
                started = time.perf_counter()
                if kind == "submit":
                    response = await client.post(f"/queue/{APP}", json=BODY)
                    ok = response.status_code == 200
                    if ok:
                        ids.append(response.json()["request_id"])
                else:
                    response = await client.get(f"/queue/{APP}/requests/{random.choice(ids)}/status")
                    body = response.json() if response.status_code == 202 else {}
                    ok = "queue_position" in body  # every one is queued, with the position the store counts
                if ok:
                    latencies.append(time.perf_counter() - started)
                else:
                    errors += 1

        started = time.monotonic()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        took = time.monotonic() - started
    latencies.sort()
    return {
        "phase": kind,
        "requests_per_s": round(len(latencies) / took, 1),
        "p50_ms": round(statistics.median(latencies) * 1000, 2) if latencies else None,
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 2) if latencies else None,
        "errors": errors,
        "queued": len(ids),
    }


def bench(store: str, name: str, args: argparse.Namespace, work: Path) -> list[dict]:
    proc, url = start_server(store, args.data_dir or work / "data", work / f"server-{name}.log")
    try:
        ids: list[str] = []
        rows = []
        for kind in ("submit", "status"):
            row = {"store": name, **asyncio.run(_phase(url, args.seconds, args.concurrency, ids, kind))}
            print(json.dumps(row), flush=True)
            rows.append(row)
        return rows
    finally:
        proc.kill()  # a throwaway API node: nothing to drain
        proc.wait(timeout=30)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument(
        "--postgres", default="auto", help="URL of an empty database, 'auto' (a throwaway server) or 'off'"
    )
    parser.add_argument("--json", type=Path, help="write the rows here")
    parser.add_argument(
        "--data-dir", type=Path, help="the servers' data directory (default: a temporary one; tiny models made once)"
    )
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-store-"))
    rows: list[dict] = []
    pg = None
    try:
        rows += bench(f"sqlite:///{work / 'jobs.sqlite3'}", "sqlite", args, work)
        if args.postgres == "auto":
            from tests.pg import PostgresServer

            pg = PostgresServer().start()
            rows += bench(pg.fresh_url(), "postgresql", args, work)
        elif args.postgres != "off":
            rows += bench(args.postgres, "postgresql", args, work)
    finally:
        if pg is not None:
            pg.cleanup()
        shutil.rmtree(work, ignore_errors=True)
    if args.json:
        meta = {"cpus": os.cpu_count(), "seconds": args.seconds, "concurrency": args.concurrency}
        args.json.write_text(json.dumps({"machine": meta, "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
