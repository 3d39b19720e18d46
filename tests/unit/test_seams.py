"""The seams between the HTTP server and the engine: ``server/`` never imports torch (not even lazily), and
talks to the engine only through ``pipelines.serving``."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import fields
from pathlib import Path

from pipelines.serving import EngineSettings, ServingEngine
from server.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
HEAVY = ("torch", "diffusers", "transformers")


def test_no_server_module_imports_torch_even_lazily() -> None:
    offenders = []
    for path in sorted((ROOT / "server").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            offenders += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names if n.split(".")[0] in HEAVY]
    assert offenders == []


def test_importing_every_server_module_loads_no_torch() -> None:
    code = (
        "import importlib, pkgutil, sys, server\n"
        "for m in pkgutil.walk_packages(server.__path__, 'server.'):\n"
        "    importlib.import_module(m.name)\n"
        f"print(sorted(set({HEAVY!r}) & set(sys.modules)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_the_engine_is_a_serving_engine(engine) -> None:
    assert isinstance(engine, ServingEngine)


def test_engine_settings_are_server_settings(tmp_path: Path) -> None:
    """Every field the engine takes is a server setting of the same name, so EngineSettings.of cannot drift."""
    names = {f.name for f in fields(EngineSettings)}
    assert names <= set(Settings.model_fields), names - set(Settings.model_fields)
    settings = Settings(data_dir=tmp_path, models="tiny", apps=["fast-lightning-sdxl:4"], prompt_cache_size=3)
    config = EngineSettings.of(settings)
    assert (config.data_dir, config.models, config.apps, config.prompt_cache_size) == (
        tmp_path,
        "tiny",
        ["fast-lightning-sdxl:4"],
        3,
    )
