"""A podman of the test's own: state, storage and configuration in one folder, no registry.

``../shared/containers.md`` records why each setting is here: the host's hard ``nofile``/``nproc``
limits (root lacks ``CAP_SYS_RESOURCE``), ``runc`` (crun refuses hybrid cgroups), ``cgroupfs`` and a
file events log (no systemd), and no search registries (none is reachable; a short name must not
send podman looking).
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "localhost/inpaint-server:test"
# The CPU image: torch 2.13.0 CPU, no gpu/fp8 extras, no model weights (--models tiny generates stand-ins).
MAX_IMAGE_BYTES = 1_800_000_000
BUILD_TIMES: dict[str, float] = {}  # how long the base and the image took, for the test that reports them

TOOLS = ("podman", "buildah", "debootstrap", "runc", "slirp4netns")


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _hard_limit(which: int, cap: int) -> int:
    hard = resource.getrlimit(which)[1]
    return cap if hard == resource.RLIM_INFINITY else min(hard, cap)


class Podman:
    """Runs ``podman`` with every bit of its state under ``root``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        for sub in ("graph", "run", "tmp", "volumes", "static"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        nofile = _hard_limit(resource.RLIMIT_NOFILE, 1 << 20)
        nproc = _hard_limit(resource.RLIMIT_NPROC, 32768)
        (root / "storage.conf").write_text(
            f'[storage]\ndriver = "overlay"\ngraphroot = "{root}/graph"\nrunroot = "{root}/run"\n'
        )
        (root / "containers.conf").write_text(
            "[containers]\n"
            'netns = "host"\n'
            f'default_ulimits = ["nofile={nofile}:{nofile}", "nproc={nproc}:{nproc}"]\n'
            "[engine]\n"
            'runtime = "runc"\n'
            'cgroup_manager = "cgroupfs"\n'
            'events_logger = "file"\n'
            f'events_logfile_path = "{root}/events.log"\n'
            f'tmp_dir = "{root}/tmp"\n'
            f'volume_path = "{root}/volumes"\n'
            f'static_dir = "{root}/static"\n'
        )
        (root / "registries.conf").write_text('unqualified-search-registries = []\nshort-name-mode = "disabled"\n')
        self.env = {
            **os.environ,
            "CONTAINERS_CONF": str(root / "containers.conf"),
            "CONTAINERS_STORAGE_CONF": str(root / "storage.conf"),
            "CONTAINERS_REGISTRIES_CONF": str(root / "registries.conf"),
            "TMPDIR": str(root / "tmp"),
        }

    def __call__(self, *args: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            ["podman", *args], env=self.env, capture_output=True, text=True, timeout=timeout, check=False
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"podman {' '.join(args)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}")
        return proc

    def popen(self, *args: str, log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as out:
            return subprocess.Popen(["podman", *args], env=self.env, stdout=out, stderr=subprocess.STDOUT)

    def inspect(self, name: str, kind: str = "container") -> dict:
        return json.loads(self(kind, "inspect", name).stdout)[0]

    def image_exists(self, ref: str) -> bool:
        return self("image", "exists", ref, check=False).returncode == 0


BASE_IMAGE = "localhost/inpaint-test-base:bookworm"
# What the base has: what the Dockerfile would otherwise apt-get (python3, venv, tini, CA certificates).
BASE_PACKAGES = ("python3", "python3-venv", "ca-certificates", "tini")


def apt_mirror() -> str:
    """The Debian mirror apt already uses here (the only one reachable)."""
    for source in (Path("/etc/apt/sources.list.d/debian.sources"), Path("/etc/apt/sources.list")):
        if not source.is_file():
            continue
        for line in source.read_text().splitlines():
            words = line.split()
            if words[:1] == ["URIs:"] and len(words) > 1:
                return words[1]
            if words[:1] == ["deb"] and len(words) > 2:
                return words[1] if not words[1].startswith("[") else words[2]
    return "http://deb.debian.org/debian"


def build_base(podman: Podman, work: Path, suite: str = "bookworm") -> str:
    """A minimal Debian with Python as a local image (no registry to pull one from): debootstrap, import.

    Kept in ``podman``'s storage, so a second call with the same state folder costs nothing."""
    if podman.image_exists(BASE_IMAGE):
        return BASE_IMAGE
    rootfs = work / "rootfs"
    shutil.rmtree(rootfs, ignore_errors=True)
    subprocess.run(
        ["debootstrap", "--variant=minbase", f"--include={','.join(BASE_PACKAGES)}", suite, str(rootfs), apt_mirror()],
        check=True,
        capture_output=True,
        timeout=600,
    )
    for junk in ("var/cache/apt/archives", "var/lib/apt/lists"):
        for path in (rootfs / junk).glob("*"):
            if path.is_file():
                path.unlink()
    tarball = work / "rootfs.tar"
    subprocess.run(["tar", "--numeric-owner", "-C", str(rootfs), "-cf", str(tarball), "."], check=True)
    shutil.rmtree(rootfs)
    podman("import", "--change", 'CMD ["/bin/bash"]', str(tarball), BASE_IMAGE, timeout=300)
    tarball.unlink()
    return BASE_IMAGE


_PIP_KEYS = ("index-url", "extra-index-url", "find-links", "cert", "trusted-host", "default-timeout")


def host_pip_config() -> dict[str, str]:
    """This host's pip settings that reach packages (indexes, local wheels, the proxy's CA), env first."""
    out = subprocess.run(
        ["python3", "-m", "pip", "config", "list"], capture_output=True, text=True, check=False
    ).stdout.splitlines()
    rank = {":env:": 0, "site": 1, "user": 2, "global": 3}
    best: dict[str, tuple[int, str]] = {}
    for line in out:
        name, sep, value = line.partition("=")
        scope, _, key = name.rpartition(".")
        if not sep or key not in _PIP_KEYS:
            continue
        order = rank.get(scope, 4)
        if key not in best or order < best[key][0]:
            best[key] = (order, value.strip().strip("'\""))
    return {key: value for key, (_, value) in best.items()}


def pip_build_mounts(work: Path) -> list[str]:
    """``podman build -v`` arguments that give pip in the build what it has here: a pip.conf at
    /etc/pip.conf and, read-only at the same paths, the local wheel folders, file indexes and CA bundle.
    Nothing of them ends up in a layer."""
    config = host_pip_config()
    if not config:
        return []
    lines = ["[global]", *(f"{key} = {value}" for key, value in config.items())]
    conf = work / "pip.conf"
    conf.write_text("\n".join(lines) + "\n")
    paths: set[Path] = set()
    for key in ("find-links", "extra-index-url", "index-url", "cert"):
        for item in config.get(key, "").split():
            local = item.removeprefix("file://")
            if local.startswith("/") and Path(local).exists():
                path = Path(local)
                # a file index is mounted from its root (/opt/pypi for file:///opt/pypi/simple)
                paths.add(path.parent if path.name == "simple" else path)
    mounts = ["-v", f"{conf}:/etc/pip.conf:ro"]
    for path in sorted(paths):
        mounts += ["-v", f"{path}:{path}:ro"]
    return mounts


def build_image(podman: Podman, context: Path, tag: str, work: Path, base: str) -> str:
    """``podman build`` of the project's Dockerfile on the local base with the CPU torch; the build's log."""
    return podman(
        "build",
        "--format", "docker",  # OCI format drops HEALTHCHECK
        "--network", "host",
        "--build-arg", f"BASE_IMAGE={base}",
        "--build-arg", "EXTRAS=",  # torchvision has no CPU build in these registries; fp8 needs a GPU
        *pip_build_mounts(work),
        "-t", tag,
        str(context),
        timeout=900,
    ).stdout  # fmt: skip
