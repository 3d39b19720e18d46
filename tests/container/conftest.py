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

from tests.container.podman import Podman, build_base, missing_tools, pip_build_mounts

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "localhost/inpaint-server:test"
# The CPU image: torch 2.13.0 CPU, no gpu/fp8 extras, no model weights (--models tiny generates stand-ins).
MAX_IMAGE_BYTES = 1_800_000_000
BUILD_TIMES: dict[str, float] = {}


def _unavailable() -> str | None:
    missing = missing_tools()
    if missing:
        return f"needs {', '.join(missing)} (apt-get install podman buildah debootstrap runc slirp4netns)"
    if os.geteuid() != 0:
        return "needs root (podman here runs rootful, with its state in a folder of the test's own)"
    return None


@pytest.fixture(scope="module")
def podman(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Podman]:
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
def image(podman: Podman, tmp_path_factory: pytest.TempPathFactory) -> str:
    """``podman build`` of the project's Dockerfile on the local base, with the CPU torch."""
    work = tmp_path_factory.mktemp("image-build")
    started = time.monotonic()
    base = build_base(podman, work)
    based = time.monotonic()
    podman(
        "build",
        "--format", "docker",  # OCI format drops HEALTHCHECK
        "--network", "host",
        "--build-arg", f"BASE_IMAGE={base}",
        "--build-arg", "EXTRAS=",  # torchvision has no CPU build in these registries; fp8 needs a GPU
        *pip_build_mounts(work),
        "-t", IMAGE,
        str(ROOT),
        timeout=900,
    )  # fmt: skip
    BUILD_TIMES.update(base_s=based - started, build_s=time.monotonic() - based)
    return IMAGE
