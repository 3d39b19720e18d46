"""scripts/bench_store.py end to end, briefly: both stores, both phases, numbers that add up."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

from pipelines.tiny import tiny_cache_dir
from tests.live import REPO


def test_a_short_run_measures_both_stores_and_phases(postgres, tiny_cache: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_cache, tiny_cache_dir(data), symlinks=True)  # no model generation at start
    out = tmp_path / "store.json"
    command = [sys.executable, "scripts/bench_store.py", "--seconds", "1", "--concurrency", "4"]
    command += ["--postgres", postgres.fresh_url(), "--json", str(out), "--data-dir", str(data)]
    proc = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=240, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = json.loads(out.read_text())["rows"]
    assert [(r["store"], r["phase"]) for r in rows] == [
        ("sqlite", "submit"),
        ("sqlite", "status"),
        ("postgresql", "submit"),
        ("postgresql", "status"),
    ]
    for row in rows:
        assert row["errors"] == 0 and row["requests_per_s"] > 0 and row["p50_ms"] <= row["p99_ms"], row
    assert rows[0]["queued"] == rows[1]["queued"] > 0  # polls read what the submits queued
    assert proc.stdout.count("\n") == 4  # one JSON line per row, as it goes
