"""``serve`` and ``worker`` flags are generated from the Settings class: one per field, as the README says."""

from __future__ import annotations

import argparse
import re
import types
import typing
from pathlib import Path
from typing import Any, Literal

import pytest

from server import __version__, cli
from server.cli_flags import WORKER_SKIP, settings_overrides
from server.settings import ENV_PREFIX, Settings, cli_flag, load_settings

README = Path(__file__).resolve().parents[2] / "README.md"


pytestmark = pytest.mark.usefixtures("clean_env")  # tests/unit/conftest.py


def _subparser(command: str) -> argparse.ArgumentParser:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices[command]


def _options(command: str) -> dict[str, str]:
    """Every option string of ``command`` -> the namespace attribute it sets."""
    return {flag: a.dest for a in _subparser(command)._actions for flag in a.option_strings}


def _parse(command: str, *argv: str) -> dict[str, Any]:
    return settings_overrides(cli.build_parser().parse_args([command, *argv]))


def _sample(annotation: Any) -> list[str]:
    """Command-line words that give a setting of this type a value."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):  # X | None
        annotation = next(a for a in typing.get_args(annotation) if a is not type(None))
    if annotation is bool:
        return []
    if typing.get_origin(annotation) is Literal:
        return [str(typing.get_args(annotation)[-1])]
    if typing.get_origin(annotation) is dict:
        return ["key=value"]
    return ["1"]  # ints, floats, strings, paths and lists all take it


@pytest.mark.parametrize("command", ["serve", "worker"])
def test_every_setting_has_its_flag(command: str) -> None:
    options = _options(command)
    skip = WORKER_SKIP if command == "worker" else frozenset()
    for name, info in Settings.model_fields.items():
        if name in skip:  # serve's alone (a worker's --port is worker_port)
            assert options.get(cli_flag(name)) != name, name
            continue
        assert options.get(cli_flag(name)) == name, f"{cli_flag(name)} missing or storing elsewhere"
        given = _parse(command, cli_flag(name), *_sample(info.annotation))
        assert list(given) == [name], name  # it sets that setting, and only it


def test_old_flag_names_still_work() -> None:
    given = _parse("serve", "--api-key", "a", "--api-key", "b,c", "--app", "hyper-sdxl", "--model-path", "base=/m")
    assert given == {"api_keys": ["a", "b", "c"], "apps": ["hyper-sdxl"], "model_paths": {"base": "/m"}}
    assert _parse("worker", "--port", "8009") == {"worker_port": 8009}  # a worker's --port is its health port


def test_flags_reach_the_settings_with_their_types(tmp_path: Path) -> None:
    argv = [
        "--no-warmup",
        "--fp8",
        "--webhook-signing",
        "false",
        "--compile",
        "auto",
        "--cuda-graphs",
        "--lease-s",
        "12.5",
        "--max-queue-size",
        "50",
        "--devices",
        "0,cpu",
        "--cors-origins",
        "https://a.example",
        "--cors-origins",
        "https://b.example",
        "--warmup-sizes",
        "square,512x768",
        "--attention",
        "cudnn",
        "--compile-cache-dir",
        str(tmp_path / "cc"),
        "--data-dir",
        str(tmp_path),
    ]
    settings = load_settings(_parse("serve", *argv))
    assert settings.warmup is False and settings.fp8 is True and settings.webhook_signing is False
    assert settings.compile is None and settings.cuda_graphs is True
    assert settings.lease_s == 12.5 and settings.max_queue_size == 50
    assert settings.devices == ["cuda:0", "cpu"]
    assert settings.cors_origins == ["https://a.example", "https://b.example"]
    assert settings.warmup_sizes == [(512, 512), (512, 768)]
    assert settings.attention == "cudnn" and settings.compile_cache_dir == tmp_path / "cc"


def test_unset_flags_override_nothing() -> None:
    assert _parse("serve") == {} and _parse("worker") == {}


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["--warmup", "maybe"], "argument --warmup: use true, false, not 'maybe'"),
        (["--compile", "perhaps"], "argument --compile: use true, false, auto"),
        (["--no-fp8", "true"], "--no-fp8 takes no value"),
        (["--max-queue-size", "lots"], "argument --max-queue-size: expected an integer"),
        (["--lease-s", "soon"], "argument --lease-s: expected a number"),
        (["--attention", "fastest"], "argument --attention: invalid choice"),
        (["--model-paths", "base"], "expected KEY=PATH"),
        (["--api-key", ""], "argument --api-key: empty value"),  # an unset "$KEY" must not open the server
        (["--apps", " , "], "argument --apps: empty value"),
    ],
)
def test_bad_flag_values_exit_2_with_one_line(argv: list[str], needle: str, capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli.build_parser().parse_args(["serve", *argv])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("inpaint-server: error:") and needle in err, err


def _readme_table() -> list[tuple[str, str]]:
    """(setting, environment variable) of each row of the README's settings table."""
    rows = re.findall(r"^\| `(\w+)` \| `(\w+)` \|", README.read_text(), flags=re.MULTILINE)
    assert len(rows) > 20
    return rows


def test_readme_settings_table_matches_the_settings_and_their_flags() -> None:
    options = _options("serve")
    rows = _readme_table()
    for name, env in rows:
        assert name in Settings.model_fields, f"README lists {name}, which is no setting"
        assert env == f"{ENV_PREFIX}{name.upper()}"
        assert cli_flag(name) in options
    assert set(Settings.model_fields) <= {name for name, _ in rows}, "settings missing from the README table"


def test_every_serve_and_worker_flag_in_the_readme_exists() -> None:
    """Each ``--flag`` of an ``inpaint-server serve|worker`` command line the README shows (continuations
    included) is an option of that command."""
    text = README.read_text().replace("\\\n", " ")
    seen = 0
    for command, rest in re.findall(r"inpaint-server (serve|worker)\b([^\n`|]*)", text):
        options = _options(command)
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
            assert flag in options or flag == "--help", f"README: inpaint-server {command} ... {flag}"
            seen += 1
    assert seen > 10


def test_version(capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as info:
        cli.main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"inpaint-server {__version__}"
