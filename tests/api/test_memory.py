"""No memory grows with the number of distinct prompts (issue 10, section 1).

The text encoders used to run with autograd on, so every embedding the prompt cache kept held its
batch's whole autograd graph: about 1 MB per prompt with the tiny models (124 MiB with the full-size
encoders, on the GPU). Here the real ``serve --models tiny`` (SDXL-Lightning 1-step) runs 600 queued
requests, each with a prompt of its own and a prompt cache large enough to keep every one of them, and
its resident memory must stay flat. Not a benchmark: the bound is generous (measured: ~30 MB, of which
~18 MB are the cached embeddings themselves); the leak grew it by ~600 MB.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.api.queue_ops import inpaint_input, result, submit, wait_all_completed
from tests.live import SUBPROCESS_ENV, ServerProcess

WARM = 64  # requests before the first reading: allocator pools, lazy imports, first-call caches
PROMPTS = 600
BOUND_MB = 60


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS line")


def run_prompts(url: str, prompts: list[str]) -> None:
    """Queue the prompts in waves of 96 (so batches are full), and wait for each wave to succeed."""
    body = inpaint_input(image_size={"width": 32, "height": 32}, num_inference_steps=1, enable_safety_checker=False)
    with httpx.Client(base_url=url, timeout=60) as client:
        for start in range(0, len(prompts), 96):
            ids = [submit(client, **{**body, "prompt": p}) for p in prompts[start : start + 96]]
            wait_all_completed(client, ids, timeout=120)
            for request_id in ids:
                assert len(result(client, request_id)["images"]) == 1


def test_resident_memory_stays_flat_over_600_distinct_prompts(data_dir: Path, tmp_path: Path) -> None:
    env = {
        **SUBPROCESS_ENV,
        "INPAINT_APPS": "fast-lightning-sdxl:1",
        "INPAINT_MAX_BATCH_SIZE": "8",
        "INPAINT_PROMPT_CACHE_SIZE": str(WARM + PROMPTS),  # every prompt stays cached: the leak's worst case
    }
    server = ServerProcess(["--models", "tiny", "--data-dir", str(data_dir)], env=env, log=tmp_path / "server.log")
    server.start()
    try:
        assert server.proc is not None
        run_prompts(server.url, [f"warm-up prompt {i}" for i in range(WARM)])
        before = resident_mb(server.proc.pid)
        run_prompts(server.url, [f"a lighthouse at dusk, variation {i}" for i in range(PROMPTS)])
        after = resident_mb(server.proc.pid)
    finally:
        server.stop()
    print(f"serve RSS {before:.0f} MB -> {after:.0f} MB over {PROMPTS} distinct prompts")
    assert after - before < BOUND_MB, f"RSS grew {after - before:.0f} MB over {PROMPTS} distinct prompts"
