"""Fixtures shared by the tests that start ``inpaint-server serve`` as a subprocess."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pipelines.tiny import tiny_cache_dir


@pytest.fixture
def data_dir(tmp_path: Path, tiny_cache: Path) -> Path:
    """A data directory that already holds the tiny models (no generation at server start)."""
    data = tmp_path / "data"
    shutil.copytree(tiny_cache, tiny_cache_dir(data), symlinks=True)
    return data
