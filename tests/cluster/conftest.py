"""Fixtures for the multi-process tests: API nodes (``serve --workers 0``) and GPU workers (``worker``) as
subprocesses on loopback, each with a data directory of its own (as on separate hosts), sharing one store and
one files location."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from pipelines.tiny import tiny_cache_dir
from tests.live import SUBPROCESS_ENV, ServerProcess

APP_VARIANT = "fast-lightning-sdxl:4"


@dataclass
class Cluster:
    """Starts nodes on one store (``store``, a URL) and one files location (``files``)."""

    root: Path
    tiny_cache: Path
    store: str
    files: str
    env: dict[str, str] = field(default_factory=dict)
    procs: list[ServerProcess] = field(default_factory=list)

    def data_dir(self, name: str) -> Path:
        """A node's own data directory, holding the tiny models."""
        data = self.root / name
        if not data.exists():
            shutil.copytree(self.tiny_cache, tiny_cache_dir(data), symlinks=True)
        return data

    def api(self, name: str, *args: str, port: int | None = None, **env: str) -> ServerProcess:
        """An API node: no GPU worker, no torch."""
        return self.serve(name, "--workers", "0", *args, port=port, **env)

    def serve(self, name: str, *args: str, data: str | None = None, port: int | None = None, **env: str):
        """``serve`` on the shared store and files (with its embedded worker unless ``args`` say otherwise)."""
        common = ["--node-name", name, "--data-dir", data or str(self.data_dir(name)), "--models", "tiny"]
        return self._start("serve", name, [*common, "--app", APP_VARIANT, *self._shared(), *args], env, port)

    def worker(self, name: str, *args: str, **env: str) -> ServerProcess:
        """A GPU worker with the tiny models (on CPU); ready once they are loaded."""
        common = ["--node-name", name, "--data-dir", str(self.data_dir(name)), "--models", "tiny"]
        return self._start("worker", name, [*common, "--app", APP_VARIANT, *self._shared(), *args], env, None)

    def _shared(self) -> list[str]:
        return ["--store", self.store, "--files", self.files]

    def _start(self, command: str, name: str, args: list[str], env: dict[str, str], port: int | None):
        proc = ServerProcess(
            args,
            env={**SUBPROCESS_ENV, **self.env, **env},
            log=self.root / f"{name}.log",
            command=command,
            port=port,
        )
        self.procs.append(proc)
        return proc.start()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-4000:]}" for p in sorted(self.root.glob("*.log")))


@pytest.fixture
def cluster(tmp_path: Path, tiny_cache: Path) -> Iterator[Callable[..., Cluster]]:
    made: list[Cluster] = []

    def make(store: str, files: str | None = None, **env: str) -> Cluster:
        made.append(Cluster(tmp_path, tiny_cache, store, files or str(tmp_path / "shared-files"), env))
        return made[-1]

    yield make
    for one in made:
        for proc in one.procs:
            proc.stop()


def poll_until(check: Callable[[], object], what: str, timeout: float = 60.0, every: float = 0.1) -> object:
    """``check()``'s first truthy answer, failing with ``what`` after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if answer:
            return answer
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(every)
