"""The image, built for real with podman from a locally made Debian base (no registry is reachable).

Skipped where podman or root is missing, unless ``INPAINT_REQUIRE_CONTAINER=1`` (set by ``.ci/run``),
which turns a missing tool into a failure. ``INPAINT_CONTAINER_STATE=DIR`` keeps podman's state (the
base image and the build's layer cache) in DIR between runs; by default it is a fresh temporary folder.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.container.podman import BUILD_TIMES, IMAGE, ROOT, Podman, build_base, build_image, missing_tools


def _unavailable() -> str | None:
    missing = missing_tools()
    if missing:
        return f"needs {', '.join(missing)} (apt-get install podman buildah debootstrap runc slirp4netns)"
    if os.geteuid() != 0:
        return "needs root (podman here runs rootful, with its state in a folder of the test's own)"
    return None


def _check_one_worker(request: pytest.FixtureRequest) -> None:
    """Under pytest-xdist the module must stay on one worker (one image, one pair of volumes). With ``--dist
    loadgroup`` its xdist_group mark shows in its tests' node ids; without it, fail at once instead of
    building the image on each worker."""
    if not os.environ.get("PYTEST_XDIST_WORKER"):
        return
    mine = [item for item in request.session.items if item.path == request.path]
    if not all(item.nodeid.endswith("@container") for item in mine):
        pytest.fail("run the container tests with --dist loadgroup (or without -n): they share one image and volumes")


@pytest.fixture(scope="module")
def podman(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
    _check_one_worker(request)
    reason = _unavailable()
    if reason:
        if os.environ.get("INPAINT_REQUIRE_CONTAINER") == "1":
            pytest.fail(f"container tests are required here but {reason}")
        pytest.skip(reason)
    kept = os.environ.get("INPAINT_CONTAINER_STATE")
    root = Path(kept) if kept else tmp_path_factory.mktemp("podman")
    pm = Podman(root)
    yield pm
    pm("rm", "--all", "--force", "--time", "0", check=False, timeout=120)
    pm("volume", "rm", "--all", "--force", check=False)
    if not kept:
        pm("rmi", "--all", "--force", check=False, timeout=120)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def base_image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> str:
    started = time.monotonic()
    base = build_base(podman, tmp_path_factory.mktemp("base"))
    BUILD_TIMES["base_s"] = time.monotonic() - started
    return base


@pytest.fixture(scope="module")
def image(podman: Podman, base_image: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    started = time.monotonic()
    build_image(podman, ROOT, IMAGE, tmp_path_factory.mktemp("image-build"), base_image)
    BUILD_TIMES["build_s"] = time.monotonic() - started
    return IMAGE
