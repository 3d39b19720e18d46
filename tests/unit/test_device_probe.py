"""scripts/device_probe.py, the prepared one-shot command for a lent GPU, runs end to end on the CPU with the
tiny models (``--compile-backend eager``), so the first minutes of a lent device are never lost to a typo.
Every section records its numbers (CPU-only ones say they were skipped; FP8 says why it cannot run here)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.live import REPO


@pytest.mark.slow
def test_the_probe_runs_every_section_on_the_tiny_models(tmp_path: Path) -> None:
    out = tmp_path / "probe"
    command = [sys.executable, "scripts/device_probe.py", "--arch", "tiny", "--device", "cpu", "--size", "64"]
    command += ["--compile-backend", "eager", "--out", str(out), "--budget", "600"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-3000:]
    rows = [json.loads(line) for line in (out / "probe.jsonl").read_text().splitlines()]
    by_section: dict[str, list[dict]] = {}
    for row in rows:
        by_section.setdefault(row["section"], []).append(row)
    errors = {name: r["error"] for name, rs in by_section.items() for r in rs if "error" in r}
    assert set(errors) == {"S11 fp8"} and "fp8" in errors["S11 fp8"]  # no torchao float8 on a CPU
    assert "skipped" in by_section["S3 kernels"][0]  # CUDA kernels only
    compiled = by_section["S6 engine compiled"]
    assert {(r["app"], r["steps"], r["batch"]) for r in compiled} == {
        ("fast-lightning-sdxl", 4, 1),
        ("hyper-sdxl", 1, 1),
        ("fast-lightning-sdxl", 4, 8),
        ("hyper-sdxl", 1, 8),
    }
    assert all(r["p50_ms"] > 0 for r in compiled + by_section["S5 engine eager"] + by_section["S4 naive"])
    warm = by_section["S6 compiled: warm-up before ready (cold cache)"][0]
    assert warm["seconds"] > 0 and warm["dynamo_graphs"] <= 12
    assert by_section["S5 prompt-cache retention"][0]["cached_grad_fn"] is False
    assert by_section["S9 restart"][0]["rc"] == 0 and by_section["S9 restart (child)"][0]["warmup_before_ready_s"] > 0
