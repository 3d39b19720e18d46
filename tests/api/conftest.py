"""Fixtures shared by the tests that start ``inpaint-server serve`` as a subprocess."""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pipelines.tiny import tiny_cache_dir
from tests.live import SUBPROCESS_ENV, ServerProcess


@pytest.fixture
def data_dir(tmp_path: Path, tiny_cache: Path) -> Path:
    """A data directory that already holds the tiny models (no generation at server start)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_cache, tiny_cache_dir(data), symlinks=True)
    return data


@pytest.fixture
def serve_tiny(tmp_path: Path) -> Iterator[Callable[..., ServerProcess]]:
    """``serve_tiny(data_dir, *args, **env)``: ``inpaint-server serve --models tiny`` (the one Lightning
    variant the tests use) as a subprocess on ``data_dir``, with SUBPROCESS_ENV and ``env``, logging to
    ``tmp_path/server.log``; every server is stopped at the end."""
    procs: list[ServerProcess] = []

    def start(data_dir: Path, *args: str, **env: str) -> ServerProcess:
        proc = ServerProcess(
            ["--models", "tiny", "--app", "fast-lightning-sdxl:4", "--data-dir", str(data_dir), *args],
            env={**SUBPROCESS_ENV, **env},
            log=tmp_path / "server.log",
        )
        procs.append(proc)
        return proc.start()

    yield start
    for proc in procs:
        proc.stop()
