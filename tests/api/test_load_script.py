"""scripts/load_test.py in miniature: 20 submissions from 5 clients, ``kill -9`` after about 10, nothing lost."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from pipelines.tiny import tiny_cache_dir
from tests.live import REPO


def test_load_script_loses_nothing_across_a_kill9(tmp_path: Path, tiny_cache: Path) -> None:
    data = tmp_path / "data"
    shutil.copytree(tiny_cache, tiny_cache_dir(data), symlinks=True)
    command = [sys.executable, "scripts/load_test.py", "--requests", "20", "--concurrency", "5"]
    command += ["--data-dir", str(data), "--timeout", "120"]
    run = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    killed = re.search(r"kill -9 after (\d+) accepted", run.stdout)
    assert killed is not None and 10 <= int(killed.group(1)) < 20, run.stdout  # midway, not after the end
    summary = json.loads(run.stdout.split("summary:", 1)[1])
    assert summary["accepted"] == 20 and summary["completed"] == 20, summary
    assert summary["failed"] == 0 and summary["lost"] == 0 and summary["duplicates"] == 0, summary
    assert summary["exit_code"] == 0, summary
    assert len(summary["peak_rss_kib"]) == 2 and all(peak > 0 for peak in summary["peak_rss_kib"]), summary
