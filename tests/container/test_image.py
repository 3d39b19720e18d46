"""The image, built and run for real: the README's container commands with podman, the CPU base and
``--models tiny`` in place of the GPU (the quick start's two commands: download into the volume, run).

One module, run in order on one xdist worker: the image is built once, then containers come and go
on the same two named volumes, the way an operator's restarts and deploys do.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import ssl
import time
from collections.abc import Callable
from pathlib import Path

import fal_client
import httpx
import pytest

from tests.compat.certs import make_tls_files
from tests.container.podman import BUILD_TIMES, MAX_IMAGE_BYTES, ROOT, Podman, build_image
from tests.helpers import box_mask, noise_image, png
from tests.live import free_port

pytestmark = pytest.mark.xdist_group("container")

LIGHTNING = "fal-ai/fast-lightning-sdxl/inpainting"
KEY = "container-test-key"
UID = 10001
# The README's run line, less the GPU: the volumes, the secrets folder, the stop timeout, the port.
VOLUMES = ("-v", "inpaint-data:/data", "-v", "inpaint-models:/models")
STOP_TIMEOUT_S = 45
EDITED = "localhost/inpaint-server:edited"
RERUN = "Interrupted: its worker stopped"  # the job log line of a request run again after a crash


def _data_uri(content: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(content).decode()


IMAGE_URI = _data_uri(png(noise_image(64, 48)))
MASK_URI = _data_uri(png(box_mask(64, 48)))


def _arguments(seed: int, prompt: str = "a red balloon") -> dict:
    return {
        "image_url": IMAGE_URI,
        "mask_url": MASK_URI,
        "prompt": prompt,
        "seed": seed,
        "image_size": {"width": 64, "height": 48},
        "num_inference_steps": "2",
    }


class Container:
    """One ``podman run -d`` of the image, reached through a published port (slirp4netns, no iptables)."""

    def __init__(self, podman: Podman, image: str, secrets: Path, name: str, env: dict[str, str] | None = None):
        self.podman, self.name = podman, name
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        env_args = [arg for key, value in (env or {}).items() for arg in ("-e", f"{key}={value}")]
        podman(
            "run", "-d", "--name", name,
            "--network", "slirp4netns", "-p", f"127.0.0.1:{self.port}:8000",
            "--stop-timeout", str(STOP_TIMEOUT_S),
            *VOLUMES, "-v", f"{secrets}:/run/secrets:ro",
            *env_args,
            image, "serve", "--models", "tiny",
        )  # fmt: skip

    def wait_ready(self, timeout: float = 180) -> None:
        """The README's readiness wait, inside the container: ``inpaint-server health --ready --wait``."""
        proc = self.podman(
            "exec", self.name, "inpaint-server", "health", "--ready", "--wait", str(timeout),
            check=False, timeout=timeout + 30,
        )  # fmt: skip
        assert proc.returncode == 0, f"{proc.stderr}\n{self.logs()}"
        assert json.loads(proc.stdout)["status"] == "ready"

    def logs(self) -> str:
        proc = self.podman("logs", self.name, check=False)
        return (proc.stdout + proc.stderr)[-6000:]

    def state(self) -> dict:
        return self.podman.inspect(self.name)["State"]

    def remove(self) -> None:
        self.podman("rm", "--force", "--time", "0", self.name, check=False)


@pytest.fixture(scope="module")
def secrets(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The README's ./secrets folder: the API key as a file the non-root uid can read."""
    folder = tmp_path_factory.mktemp("secrets")
    _secret(folder / "inpaint_api_keys", (KEY + "\n").encode())
    return folder


def _secret(path: Path, content: bytes) -> None:
    """As the README says: owned by the image's uid, readable by it alone."""
    path.write_bytes(content)
    os.chown(path, UID, UID)
    path.chmod(0o400)
    path.parent.chmod(0o755)


@pytest.fixture(scope="module")
def volumes(podman: Podman, image: str, secrets: Path) -> str:
    """The quick start's first command: ``download`` into the volumes (tiny stand-ins here, not ~45 GB)."""
    proc = podman("run", "--rm", *VOLUMES, image, "download", "--models", "tiny", timeout=300)
    files = json.loads(proc.stdout)["files"]
    assert files and all(path.startswith("/data/tiny-models/") for path in files), files
    return "inpaint-data"


@pytest.fixture
def connect(monkeypatch: pytest.MonkeyPatch) -> Callable[[str], fal_client.SyncClient]:
    """The unmodified Python fal client at a base URL (the README's plain-HTTP recipe), one per container."""

    def at(url: str) -> fal_client.SyncClient:
        monkeypatch.setattr(fal_client.client, "RUN_URL_FORMAT", f"{url}/")
        monkeypatch.setattr(fal_client.client, "QUEUE_URL_FORMAT", f"{url}/queue/")
        monkeypatch.setattr(fal_client.client, "REST_URL", url)
        monkeypatch.setattr(fal_client.client, "CDN_URL", url)
        return fal_client.SyncClient(key=KEY)

    return at


def _status(url: str, request_id: str) -> dict:
    response = httpx.get(
        f"{url}/queue/{LIGHTNING}/requests/{request_id}/status", headers={"Authorization": f"Key {KEY}"}, timeout=10
    )
    return response.json()


def _wait_status(url: str, request_id: str, wanted: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        status = _status(url, request_id)
        if status["status"] == wanted:
            return status
        assert time.monotonic() < deadline, f"{request_id} still {status} after {timeout} s"
        time.sleep(0.2)


def _one_at_a_time(hang_s: float, prompt: str) -> dict[str, str]:
    """A container's environment: one request per batch, and each step of requests whose prompt has
    ``prompt`` held ``hang_s`` seconds (a test fault), so the test can act while one runs."""
    hang = {"at": "denoise_step", "fault": "hang", "seconds": hang_s, "prompt": prompt}
    return {"INPAINT_TEST_FAULTS": json.dumps(hang), "INPAINT_MAX_BATCH_SIZE": "1"}


def _start_one(
    box: Container, connect: Callable[[str], fal_client.SyncClient], seed: int, prompt: str
) -> tuple[fal_client.SyncClient, str]:
    """Wait for ``box`` to be ready, submit one request and wait until it runs: (client, its id)."""
    box.wait_ready()
    client = connect(box.url)
    request_id = client.submit(LIGHTNING, arguments=_arguments(seed, prompt=prompt)).request_id
    _wait_status(box.url, request_id, "IN_PROGRESS")
    return client, request_id


def _assert_done(client: fal_client.SyncClient, request_ids: dict[str, int]) -> None:
    """Every acknowledged request completed with its own seed and an image of the size asked for."""
    for request_id, seed in request_ids.items():
        result = client.result(LIGHTNING, request_id)
        assert result["seed"] == seed
        assert [(i["width"], i["height"]) for i in result["images"]] == [(64, 48)]


def test_image_metadata(podman: Podman, image: str, record_property) -> None:
    """What the Dockerfile promises: non-root uid, volumes, port, stop signal, liveness healthcheck, tini,
    and a CPU image no larger than the bound."""
    info = podman.inspect(image, kind="image")
    config = info["Config"]
    size = int(info["Size"])
    record_property(
        "summary",
        f"container: CPU image {size / 1e9:.2f} GB (bound {MAX_IMAGE_BYTES / 1e9:.1f} GB); "
        f"base image {BUILD_TIMES.get('base_s', 0):.0f} s, project image build {BUILD_TIMES.get('build_s', 0):.0f} s",
    )
    assert size <= MAX_IMAGE_BYTES, f"the CPU image grew to {size / 1e9:.2f} GB (bound {MAX_IMAGE_BYTES / 1e9} GB)"
    assert config["User"] == f"{UID}:{UID}"
    assert set(config["Volumes"]) == {"/data", "/models"}
    assert "8000/tcp" in config["ExposedPorts"]
    assert config["StopSignal"] == "SIGTERM"
    assert config["Entrypoint"] == ["tini", "--", "inpaint-server"] and config["Cmd"] == ["serve"]
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["INPAINT_DATA_DIR"] == "/data" and env["HF_HOME"] == "/models" and env["INPAINT_HOST"] == "0.0.0.0"
    health = info["Healthcheck"]
    assert health["Test"] == ["CMD", "inpaint-server", "health"], health


def test_serves_the_fal_client_as_non_root(
    podman: Podman, image: str, secrets: Path, volumes: str, connect: Callable[[str], fal_client.SyncClient]
) -> None:
    box = Container(podman, image, secrets, "inpaint-serve")
    try:
        box.wait_ready()
        client = connect(box.url)
        # The key came in as a secret file: without it the API refuses.
        assert httpx.post(f"{box.url}/queue/{LIGHTNING}", json=_arguments(1), timeout=10).status_code == 401
        handle = client.submit(LIGHTNING, arguments=_arguments(7))
        result = handle.get()
        assert result["seed"] == 7 and result["images"][0]["width"] == 64
        image_file = httpx.get(result["images"][0]["url"], timeout=10)
        assert image_file.status_code == 200 and image_file.content[:2] == b"\xff\xd8"  # a JPEG, from /data
        # /docs works offline: Swagger UI's files are in the image, not on a CDN.
        bundle = httpx.get(f"{box.url}/docs/static/swagger-ui-bundle.js", timeout=10)
        assert bundle.status_code == 200 and b"SwaggerUIBundle" in bundle.content

        users = podman("top", box.name, "huser", "comm").stdout.split()[2:]
        assert users[0::2] == [str(UID)] * (len(users) // 2), users  # tini and the server, not root
        assert podman("exec", box.name, "id", "-u").stdout.strip() == str(UID)

        # No systemd here to run the healthcheck's timer: run it once, as the timer would.
        assert podman("healthcheck", "run", box.name, check=False).returncode == 0, box.logs()
        assert box.state()["Health"]["Status"] == "healthy"
    finally:
        box.remove()


def test_https_with_the_certificate_and_keys_as_secret_files(podman: Podman, image: str, volumes: str, tmp_path: Path):
    """TLS files and API keys from /run/secrets; the image's healthcheck finds HTTPS from the settings."""
    tls = make_tls_files(tmp_path / "tls")
    folder = tmp_path / "secrets"
    folder.mkdir()
    _secret(folder / "inpaint_api_keys", KEY.encode())
    _secret(folder / "tls.pem", tls.server_cert.read_bytes())
    _secret(folder / "tls.key", tls.server_key.read_bytes())
    env = {"INPAINT_TLS_CERT": "/run/secrets/tls.pem", "INPAINT_TLS_KEY": "/run/secrets/tls.key"}
    box = Container(podman, image, folder, "inpaint-tls", env=env)
    try:
        box.wait_ready()  # inpaint-server health inside the container, over HTTPS
        assert podman("healthcheck", "run", box.name, check=False).returncode == 0, box.logs()
        verify = ssl.create_default_context(cafile=str(tls.ca_cert))
        https = f"https://127.0.0.1:{box.port}"
        assert httpx.get(f"{https}/health/ready", verify=verify, timeout=10).json()["status"] == "ready"
        headers = {"Authorization": f"Key {KEY}"}
        unknown = f"{https}/queue/{LIGHTNING}/requests/00000000-0000-4000-8000-000000000000/status"
        assert httpx.get(unknown, verify=verify, headers=headers, timeout=10).status_code == 404
        assert httpx.get(unknown, verify=verify, timeout=10).status_code == 401
    finally:
        box.remove()


def test_sigkill_then_new_container_completes_everything_acknowledged(
    podman: Podman, image: str, secrets: Path, volumes: str, connect: Callable[[str], fal_client.SyncClient]
) -> None:
    """``podman kill`` (SIGKILL) with one request running and more queued; a new container on the same
    volume runs them all, the interrupted one again with its own seed."""
    first = Container(podman, image, secrets, "inpaint-killed", env=_one_at_a_time(hang_s=600, prompt="hold"))
    second = None
    try:
        client, running = _start_one(first, connect, seed=100, prompt="hold this one")
        acknowledged = {running: 100}
        for seed in range(101, 106):
            acknowledged[client.submit(LIGHTNING, arguments=_arguments(seed)).request_id] = seed
        assert all(_status(first.url, rid)["status"] == "IN_QUEUE" for rid in list(acknowledged)[1:])

        podman("kill", "--signal", "KILL", first.name)
        assert first.state()["ExitCode"] == 137
        first.remove()

        second = Container(podman, image, secrets, "inpaint-after-kill")
        second.wait_ready()
        client = connect(second.url)
        for request_id in acknowledged:
            _wait_status(second.url, request_id, "COMPLETED", timeout=120)
        _assert_done(client, acknowledged)
        assert f"{RERUN}; running again (attempt 2)" in _log_text(second.url, running)
    finally:
        first.remove()
        if second is not None:
            second.remove()


def test_stop_drains_and_exits_zero(
    podman: Podman, image: str, secrets: Path, volumes: str, connect: Callable[[str], fal_client.SyncClient]
) -> None:
    """``podman stop`` (SIGTERM, the container's 45 s stop timeout): the running request finishes and is
    saved, queued ones stay queued for the next container, and the server exits 0 well within the timeout."""
    first = Container(podman, image, secrets, "inpaint-stopped", env=_one_at_a_time(hang_s=2, prompt="slow"))
    second = None
    try:
        client, running = _start_one(first, connect, seed=200, prompt="slow steps")
        queued = {client.submit(LIGHTNING, arguments=_arguments(seed)).request_id: seed for seed in (201, 202)}

        started = time.monotonic()
        podman("stop", first.name, timeout=STOP_TIMEOUT_S + 30)  # no -t: the run's --stop-timeout 45
        took = time.monotonic() - started
        state = first.state()
        assert state["ExitCode"] == 0, first.logs()
        assert took < STOP_TIMEOUT_S - 5, f"stop took {took:.0f} s: it was killed, not drained"
        logs = first.logs()
        assert "draining" in logs.lower(), logs
        first.remove()

        second = Container(podman, image, secrets, "inpaint-after-stop")
        second.wait_ready()
        client = connect(second.url)
        for request_id in [running, *queued]:
            _wait_status(second.url, request_id, "COMPLETED", timeout=120)
        _assert_done(client, {running: 200, **queued})
        # The drained request finished in the first container: it was not run a second time.
        assert RERUN not in _log_text(second.url, running)
    finally:
        first.remove()
        if second is not None:
            second.remove()


def _log_text(url: str, request_id: str) -> str:
    response = httpx.get(
        f"{url}/queue/{LIGHTNING}/requests/{request_id}/status",
        params={"logs": 1},
        headers={"Authorization": f"Key {KEY}"},
        timeout=10,
    )
    return "\n".join(entry["message"] for entry in response.json()["logs"])


def test_code_change_rebuilds_only_the_project_layer(
    podman: Podman, image: str, base_image: str, tmp_path: Path, record_property
) -> None:
    """The layer order: after a change to the code, torch and the dependencies come from the cache."""
    context = tmp_path / "context"
    for name in ("Dockerfile", ".dockerignore", "pyproject.toml", "README.md"):
        (context / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / name, context / name)
    for folder in ("server", "pipelines", "configs"):
        shutil.copytree(ROOT / folder, context / folder, ignore=shutil.ignore_patterns("__pycache__"))
    marker = "# edited by test_code_change_rebuilds_only_the_project_layer"
    with (context / "server" / "__init__.py").open("a") as init:
        init.write(f"\n{marker}\n")
    started = time.monotonic()
    log = build_image(podman, context, EDITED, tmp_path, base_image)
    took = time.monotonic() - started
    try:
        steps = _build_steps(log)
        torch_step = next(step for step in steps if '"${TORCH_REQUIREMENT}"' in step)
        deps_step = next(step for step in steps if "requirements.txt" in step and "tomllib" in step)
        project_step = next(step for step in steps if "--no-deps --no-build-isolation" in step)
        assert "Using cache" in torch_step and "Using cache" in deps_step, log[-4000:]
        assert "Using cache" not in project_step, log[-4000:]
        installed = podman(
            "run", "--rm", "--entrypoint", "python", EDITED, "-c", "import server; print(open(server.__file__).read())"
        ).stdout  # fmt: skip
        assert marker in installed
        record_property("summary", f"container: rebuild after a code change {took:.0f} s (torch and deps cached)")
    finally:
        podman("rmi", "--force", EDITED, check=False)


def _build_steps(log: str) -> list[str]:
    """``podman build`` output cut at each ``STEP n/m:`` line."""
    parts = re.split(r"(?m)^STEP \d+/\d+: ", log)
    return parts[1:]
