"""Server settings: INPAINT_* variables, the TOML file, precedence and messages that name the setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.settings import Settings, SettingsError, load_settings

pytestmark = pytest.mark.usefixtures("clean_env")  # tests/unit/conftest.py


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "inpaint.toml"
    path.write_text(text)
    return path


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings()
    assert (settings.host, settings.port, settings.max_batch_size) == ("127.0.0.1", 8000, 4)
    assert settings.api_keys == [] and settings.cors_origins == ["*"] and settings.public_url is None
    assert settings.data_dir == tmp_path / "xdg" / "inpaint-server"
    assert settings.models == "hub" and settings.warmup is True and settings.scheme == "http"


def test_environment_variables(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("INPAINT_PORT", "9001")
    monkeypatch.setenv("INPAINT_API_KEYS", "alpha, beta,,gamma:delta")
    monkeypatch.setenv("INPAINT_WARMUP", "false")
    monkeypatch.setenv("INPAINT_DATA_DIR", str(tmp_path / "d"))
    monkeypatch.setenv("INPAINT_APPS", "hyper-sdxl:1,fast-lightning-sdxl")
    monkeypatch.setenv("INPAINT_MODEL_PATHS", "base=/models/base,hyper-sdxl:1=/models/h1.safetensors")
    monkeypatch.setenv("INPAINT_PUBLIC_URL", "https://gpu.example/inpaint/")
    settings = load_settings()
    assert settings.port == 9001
    assert settings.api_keys == ["alpha", "beta", "gamma:delta"]
    assert settings.warmup is False and settings.data_dir == tmp_path / "d"
    assert settings.apps == ["hyper-sdxl:1", "fast-lightning-sdxl"]
    assert settings.model_paths == {"base": "/models/base", "hyper-sdxl:1": "/models/h1.safetensors"}
    assert settings.public_url == "https://gpu.example/inpaint"  # no trailing slash: URLs are joined onto it


def test_config_file_given_directly_or_by_inpaint_config(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = _toml(
        tmp_path,
        'port = 9002\napi_keys = ["k1", "k2"]\nmax_batch_size = 2\nmodels = "tiny"\n'
        'model_paths = { base = "/m/base" }\ncors_origins = ["https://app.example"]\n',
    )
    for settings in (load_settings(config_file=config), _with_env(monkeypatch, "INPAINT_CONFIG", str(config))):
        assert settings.port == 9002 and settings.api_keys == ["k1", "k2"]
        assert settings.max_batch_size == 2 and settings.models == "tiny"
        assert settings.model_paths == {"base": "/m/base"} and settings.cors_origins == ["https://app.example"]


def _with_env(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> Settings:
    monkeypatch.setenv(name, value)
    return load_settings()


def test_precedence_command_line_then_environment_then_file(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    config = _toml(tmp_path, 'port = 1111\nhost = "10.0.0.1"\nmax_batch_size = 3\nlog_level = "warning"\n')
    monkeypatch.setenv("INPAINT_PORT", "2222")
    monkeypatch.setenv("INPAINT_HOST", "10.0.0.2")
    settings = load_settings({"port": 3333}, config)
    assert settings.port == 3333  # command line beats environment and file
    assert settings.host == "10.0.0.2"  # environment beats file
    assert settings.max_batch_size == 3 and settings.log_level == "warning"  # only the file sets these


@pytest.mark.parametrize(
    ("overrides", "env", "file", "needles"),
    [
        ({"port": 70000}, {}, "", ["port:", "--port", "INPAINT_PORT"]),
        ({}, {"INPAINT_MAX_BATCH_SIZE": "zero"}, "", ["max_batch_size:", "INPAINT_MAX_BATCH_SIZE"]),
        ({}, {}, "max_batch_size = 0\n", ["max_batch_size:", "greater than or equal to 1"]),
        ({}, {}, 'log_level = "verbose"\n', ["log_level:"]),
        ({}, {}, "prot = 8000\n", ["prot:", "xtra"]),  # a typo in the file is an error, not ignored
        ({"public_url": "gpu-box:8000"}, {}, "", ["public_url:", "http://"]),
        ({"api_keys": ["has space"]}, {}, "", ["api_keys", "printable ASCII"]),
        ({}, {"INPAINT_MODEL_PATHS": "base"}, "", ["model_paths", "KEY=PATH"]),
        ({"tls_cert": "/nonexistent/cert.pem"}, {}, "", ["tls_cert and tls_key go together"]),
        ({"result_retention_s": -1}, {}, "", ["result_retention_s:", "greater than 0"]),
    ],
)
def test_bad_values_fail_with_a_message_naming_the_setting(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, overrides: dict, env: dict, file: str, needles: list[str]
) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    config = _toml(tmp_path, file) if file else None
    with pytest.raises(SettingsError) as info:
        load_settings(overrides, config)
    message = str(info.value)
    assert message.startswith("invalid settings:")
    for needle in needles:
        assert needle in message, message


def test_missing_config_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match=r"config file .*nope\.toml does not exist"):
        load_settings(config_file=tmp_path / "nope.toml")


def test_tls_pair_switches_the_scheme(tmp_path: Path) -> None:
    cert, key = tmp_path / "c.pem", tmp_path / "k.pem"
    cert.write_text("cert")
    key.write_text("key")
    assert load_settings({"tls_cert": cert, "tls_key": key}).scheme == "https"
    with pytest.raises(SettingsError, match="does not exist"):
        load_settings({"tls_cert": cert, "tls_key": tmp_path / "missing.pem"})


def test_every_field_is_documented() -> None:
    for name, field in Settings.model_fields.items():
        assert field.description, name


def test_warmup_sizes_take_presets_and_wxh(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().warmup_sizes is None  # default: the presets on CUDA, none on CPU
    assert load_settings({"warmup_sizes": "square_hd, 512x768"}).warmup_sizes == [(1024, 1024), (512, 768)]
    monkeypatch.setenv("INPAINT_WARMUP_SIZES", "1024x576")
    assert load_settings().warmup_sizes == [(1024, 576)]
    with pytest.raises(SettingsError, match=r"warmup_sizes: .*image size 'huge'"):
        load_settings({"warmup_sizes": "huge"})
