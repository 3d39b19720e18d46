"""``inpaint-server serve``: its options, and how flags, INPAINT_* variables and the config file combine."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from server import cli
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
SERVE_OPTIONS = [
    "--config",
    "--host",
    "--port",
    "--data-dir",
    "--public-url",
    "--models",
    "--device",
    "--api-key",
    "--tls-cert",
    "--tls-key",
    "--config-dir",
    "--model-path",
    "--app",
    "--max-batch-size",
    "--log-level",
]


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if name.startswith("INPAINT_"):
            monkeypatch.delenv(name)


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """Run ``cmd_serve`` for real up to the point where it would build the app and listen."""
    seen: dict[str, Any] = {}

    def fake_create_app(settings: Settings) -> object:
        seen["settings"] = settings
        return object()

    def fake_run(app: object, **kwargs: Any) -> None:
        seen["uvicorn"] = kwargs

    monkeypatch.setattr("server.app.create_app", fake_create_app)
    monkeypatch.setattr("server.http.draining.run", fake_run)  # uvicorn.run, with draining on SIGTERM
    return seen


def _serve(argv: list[str]) -> int:
    return cli.cmd_serve(cli.build_parser().parse_args(["serve", *argv]))


def test_serve_help_lists_every_option() -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    for option in SERVE_OPTIONS:
        assert option in proc.stdout, option
    assert "INPAINT_" in proc.stdout  # says the options are also environment variables


def test_flags_beat_environment_which_beats_the_file(
    served: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    config = tmp_path / "serve.toml"
    config.write_text('port = 1111\nhost = "10.0.0.1"\nmax_batch_size = 3\napi_keys = ["from-file"]\n')
    monkeypatch.setenv("INPAINT_PORT", "2222")
    monkeypatch.setenv("INPAINT_HOST", "10.0.0.2")
    monkeypatch.setenv("INPAINT_API_KEYS", "from-env")
    argv = ["--config", str(config), "--port", "3333", "--data-dir", str(tmp_path / "d"), "--api-key", "a"]
    assert _serve([*argv, "--api-key", "b", "--model-path", "base=/m/base"]) == 0
    settings = served["settings"]
    assert settings.port == 3333 and served["uvicorn"]["port"] == 3333  # flag
    assert settings.host == "10.0.0.2" and served["uvicorn"]["host"] == "10.0.0.2"  # environment
    assert settings.max_batch_size == 3  # file
    assert settings.api_keys == ["a", "b"]  # repeated flag replaces env and file
    assert settings.model_paths == {"base": "/m/base"}
    assert settings.data_dir == tmp_path / "d"


def test_unset_flags_do_not_override(served: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INPAINT_CONFIG", str(tmp_path / "env.toml"))
    (tmp_path / "env.toml").write_text('models = "tiny"\nlog_level = "error"\n')
    monkeypatch.setenv("INPAINT_MAX_BATCH_SIZE", "7")
    assert _serve(["--data-dir", str(tmp_path / "d")]) == 0
    settings = served["settings"]
    assert settings.models == "tiny" and settings.log_level == "error" and settings.max_batch_size == 7
    assert settings.port == 8000  # nothing set it: the default


@pytest.mark.parametrize(
    ("argv", "env", "needle"),
    [
        (["--max-batch-size", "0"], {}, "max_batch_size"),
        (["--port", "99999"], {}, "port"),
        ([], {"INPAINT_PORT": "eighty"}, "INPAINT_PORT"),
        (["--public-url", "gpu-box"], {}, "public_url"),
        (["--config", "/nonexistent/inpaint.toml"], {}, "/nonexistent/inpaint.toml"),
    ],
)
def test_bad_values_exit_2_naming_the_setting(
    served: dict[str, Any],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    argv: list[str],
    env: dict[str, str],
    needle: str,
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as info:
        _serve(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("inpaint-server: error:") and needle in err, err
    assert "settings" not in served  # nothing was started
