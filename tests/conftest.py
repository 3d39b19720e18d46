"""Shared fixtures: tiny offline models (generated once per session) and a loaded engine."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")

_summaries: list[str] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Numbers a test reports with ``record_property("summary", text)`` (image size, build time...), collected
    from the report so that they also come back from pytest-xdist's workers."""
    if report.when == "call":
        _summaries.extend(str(value) for key, value in report.user_properties if key == "summary")


def pytest_terminal_summary(terminalreporter) -> None:
    if _summaries:
        terminalreporter.section("reported numbers")
        for line in _summaries:
            terminalreporter.write_line(line)


@pytest.fixture(scope="session")
def postgres() -> Iterator[object]:
    """A real PostgreSQL server for the session (tests/pg.py). Skipped where PostgreSQL is not installed,
    unless ``INPAINT_REQUIRE_POSTGRES=1`` (CI) makes that a failure."""
    from tests.pg import PostgresServer, unavailable

    reason = unavailable()
    if reason:
        if os.environ.get("INPAINT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"PostgreSQL tests are required here but {reason}")
        pytest.skip(reason)
    server = PostgresServer().start()
    yield server
    server.cleanup()


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Callable[[str, int], Path]]:
    """``tmpfs(name, kib)``: a tmpfs of that size mounted at ``tmp_path/name``, unmounted at the end (see
    :func:`tests.disk.mount_tmpfs` for where it is skipped)."""
    from tests.disk import mount_tmpfs, unmount

    mounted: list[Path] = []

    def mount(name: str, kib: int) -> Path:
        mount_tmpfs(tmp_path / name, kib)
        mounted.append(tmp_path / name)
        return tmp_path / name

    yield mount
    for path in reversed(mounted):
        unmount(path)


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Hugging Face cache holding tiny stand-ins for every file the configs name."""
    from pipelines.tiny import make_tiny_models

    return make_tiny_models(tmp_path_factory.mktemp("tiny") / "hub")


@pytest.fixture(scope="session")
def spec():
    from pipelines.specs import load_serving_spec

    return load_serving_spec()


@pytest.fixture(scope="session")
def resolver(tiny_cache: Path):
    from pipelines.hub import Resolver

    return Resolver(cache_dir=tiny_cache, local_files_only=True)


@pytest.fixture(scope="session")
def engine(spec, resolver):
    """Every variant of both apps, the safety checker and the prompt expander, on CPU in fp32."""
    from pipelines.engine import Engine

    return Engine.load(spec, device="cpu", resolver=resolver)


@pytest.fixture
def small_work(engine) -> Iterator[None]:
    """Work at 64x64-ish instead of 1 MP when a request gives no image_size (keeps CPU tests fast)."""
    saved = engine.work_pixels
    engine.work_pixels = 64 * 64
    yield
    engine.work_pixels = saved


@pytest.fixture
def make_server(engine, tmp_path: Path):
    """Build the real app (tiny engine, fresh data dir) and serve it on a loopback port.

    ``make_server(engine=..., **settings)`` returns a started :class:`tests.live.LiveServer`;
    every server is stopped at the end of the test. ``fetch_resolver=`` replaces DNS for user URLs.
    User URLs on loopback (test image hosts, webhook receivers) need ``fetch_allow=tests.live.LOOPBACK``.
    """
    from server.app import create_app
    from server.settings import load_settings
    from tests.live import LiveServer

    servers = []

    def make(engine_override=None, ssl_certfile=None, ssl_keyfile=None, clock=None, fetch_resolver=None, **settings):
        settings.setdefault("data_dir", tmp_path / f"data{len(servers)}")
        settings.setdefault("warmup", False)
        kwargs = {"clock": clock} if clock is not None else {}
        if fetch_resolver is not None:
            kwargs["fetch_resolver"] = fetch_resolver
        app = create_app(load_settings(settings), engine=engine_override or engine, **kwargs)
        server = LiveServer(app, ssl_certfile, ssl_keyfile).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()
