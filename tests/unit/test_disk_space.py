"""When a disk counts as full (server.disk_space), on a tmpfs of its own: below the reserve, and after a write
that found no space until space is freed or a while has passed; and a server started on a full disk."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from server import cli
from server.disk_space import FAILURE_HOLD_S, FILES, STORE, DiskSpace
from server.http.errors import InsufficientStorage
from server.jobs.store import SqliteStore, StoreFull
from tests.disk import fill


def test_less_free_than_the_reserve_is_full_and_refuses_writes(tmpfs: Callable[[str, int], Path]) -> None:
    disk = tmpfs("disk", 1024)
    space = DiskSpace([(STORE, disk), (FILES, disk / ".")], reserve_bytes=2 << 20)
    assert space.problem == (
        "the disk of the job store, result files and uploads is full (1.0 MiB free, less than "
        "disk_reserve_bytes, 2.0 MiB)"
    )
    with pytest.raises(InsufficientStorage) as refused:
        space.check()
    assert refused.value.status == 507 and refused.value.error_type == "insufficient_storage"
    assert DiskSpace([(STORE, disk)], reserve_bytes=512 << 10).problem is None


def test_a_write_that_found_no_space_counts_until_space_is_freed_or_a_while_passed(
    tmpfs: Callable[[str, int], Path],
) -> None:
    store_disk, files_disk = tmpfs("store", 1024), tmpfs("files", 1024)
    now = [0.0]
    space = DiskSpace([(STORE, store_disk), (FILES, files_disk)], reserve_bytes=0, clock=lambda: now[0])
    assert space.problem is None
    (files_disk / "filler").write_bytes(b"\0" * (256 << 10))
    space.failed(FILES)
    assert space.problem == "the disk of the result files and uploads is full (a write found no space; 768 KiB free)"
    space.failed("compile cache")  # not a disk it watches
    (files_disk / "other").write_bytes(b"\0" * 4096)
    space.refresh()
    assert space.problem is not None  # less free than when the write failed
    now[0] += FAILURE_HOLD_S
    assert space.problem is None  # tried again after a while
    space.failed(FILES)
    (files_disk / "filler").unlink()
    space.refresh()
    assert space.problem is None  # space was freed


def test_a_server_started_on_a_full_disk_exits_3_saying_so(
    tmpfs: Callable[[str, int], Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """SQLite cannot open its WAL files without space: ``serve`` stops at once with the reason, for its supervisor to
    start it again (a running server, which has them open, waits for space instead)."""
    disk = tmpfs("data", 1024)
    SqliteStore(disk / "jobs.sqlite3").close()
    fill(disk)
    with pytest.raises(StoreFull, match=r"is full .* cannot be opened"):
        SqliteStore(disk / "jobs.sqlite3")
    with pytest.raises(SystemExit) as stopped:
        cli.main(["serve", "--data-dir", str(disk), "--workers", "0"])  # an API node: no model libraries
    assert stopped.value.code == 3
    assert "the disk of the job store" in capsys.readouterr().err
