"""How many graphs torch.compile builds for a warm-up (issue 10, section 2: restart to ready in a minute).

Each count comes from a fresh process (``compile_count_probe.py``) that loads the tiny engine with
compile on and runs the whole warm-up plan: N variants x S sizes x the 4 batch buckets. Dynamo really
traces (the eager backend only skips code generation, which the inductor cache serves on a restart);
``counters["stats"]["unique_graphs"]`` counts what it built. The old whole-UNet compile built one graph
per variant x size x bucket x timestep dtype (about 100 at full size, 21 s of tracing each on a CPU);
regional compilation with dynamic shapes builds, for the UNet, two graphs per kind of transformer block
(batch 1 is specialised, the rest is one dynamic graph) shared by every variant, and two per VAE half:

    graphs <= 2 * (block kinds + 2)        whatever N, S and the buckets

A second start on the same cache directory traces the same graphs again, and no more.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _start(cache_dir: Path, hub: Path, variants: int, sizes: str, backend: str = "eager") -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [
        sys.executable,
        "-m",
        "tests.pipelines.compile_count_probe",
        str(cache_dir),
        str(hub),
        str(variants),
        sizes,
        backend,
    ]
    return subprocess.Popen(args, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.strip().splitlines()[-1])


def _bound(counts: dict) -> int:
    return 2 * (counts["block_kinds"] + 2)


@pytest.mark.slow
def test_warm_up_graphs_do_not_grow_with_variants_sizes_or_buckets(tmp_path: Path, tiny_cache: Path) -> None:
    small = _start(tmp_path / "small", tiny_cache, 1, "64x48")
    large = _start(tmp_path / "large", tiny_cache, 3, "64x48,48x64,64x64")
    one, many = _result(small), _result(large)
    print(f"1 variant x 1 size: {one}\n3 variants x 3 sizes: {many}")
    assert many["runs"] == 9 * one["runs"]  # 3 variants x 3 sizes x 4 buckets vs 1 x 1 x 4
    assert one["graphs"] <= _bound(one) and many["graphs"] <= _bound(many)
    assert many["graphs"] == one["graphs"]

    again = _result(_start(tmp_path / "large", tiny_cache, 3, "64x48,48x64,64x64"))  # a restart, same cache dir
    assert again["graphs"] == many["graphs"] <= _bound(again)
