"""Leaving the process after a fatal GPU fault, so a supervisor restarts it on a fresh CUDA context."""

from __future__ import annotations

import contextlib
import os
import sys

# GPU faults: the exit status after a fatal GPU error or a watchdog timeout. 75 is EX_TEMPFAIL
# (sysexits.h: a temporary failure, try again), distinct from 1 (a crash), 2 (bad usage) and 3
# (uvicorn: could not start). Any supervisor that restarts on failure restarts the server.
EXIT_GPU_FAULT = 75


class GpuHung(Exception):
    """The running batch reported no progress for ``step_timeout_s`` (the watchdog)."""


def exit_for_restart(code: int) -> None:
    """End the process at once. Not a normal shutdown: the GPU thread may be hung (a normal exit joins it
    forever) and cleanup code touching a broken CUDA context can fail or hang. The store is consistent
    before this is called (SQLite commits are durable), so nothing acknowledged is lost."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    os._exit(code)
