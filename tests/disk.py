"""Small tmpfs mounts for the full-disk tests (the ``tmpfs`` fixture in conftest) and a filler that fills one."""

from __future__ import annotations

import errno
import os
import subprocess
from pathlib import Path

import pytest


def mount_tmpfs(path: Path, kib: int) -> None:
    """Mount a tmpfs of ``kib`` KiB at ``path`` (a new directory). Skips the test where mounting is not permitted,
    unless ``INPAINT_REQUIRE_CONTAINER=1`` (CI, which has the privileges) makes that a failure."""
    path.mkdir()
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={kib}k", "tmpfs", str(path)], capture_output=True, text=True
        )
        reason = (done.stderr.strip() or f"mount exited with {done.returncode}") if done.returncode else ""
    except FileNotFoundError:
        reason = "there is no mount command"
    if reason:
        message = f"mounting a tmpfs needs root with CAP_SYS_ADMIN: {reason}"
        if os.environ.get("INPAINT_REQUIRE_CONTAINER") == "1":
            pytest.fail(message)
        pytest.skip(message)


def unmount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False)


def fill(disk: Path) -> Path:
    """Write a file until the disk has no byte left; returns it (delete it to free the space)."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:
        for block in (1 << 16, 1 << 12):
            try:
                while fh.write(b"\0" * block):
                    pass
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    return filler
