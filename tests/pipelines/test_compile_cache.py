"""Inductor's cache goes where the server says, even if something asked inductor for its cache dir first.

Inductor writes its ``/tmp`` default into ``TORCHINDUCTOR_CACHE_DIR`` the first time it needs a cache
dir; the engine used to ``setdefault`` the variable afterwards, which then changed nothing, and a
restart compiled everything again from a cold cache. Each run here is a fresh process that first makes
inductor settle on its default, then calls :func:`pipelines.optimize.use_compile_cache` and compiles a
small function with inductor: the artefacts must land in the server's directory, and a second process
must find them there (an FX graph cache hit, nothing compiled).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]

SCRIPT = """
import json, os, sys
import torch
from torch._inductor.runtime.cache_dir_utils import cache_dir
from torch._dynamo.utils import counters
default = cache_dir()  # inductor settles on (and exports) its default first
from pipelines.optimize import use_compile_cache
use_compile_cache(sys.argv[1])
f = torch.compile(lambda x: torch.sin(x) * 2 + 1, backend="inductor")
f(torch.ones(8))
stats = counters["inductor"]
print(json.dumps({"default": default, "env": os.environ["TORCHINDUCTOR_CACHE_DIR"],
                  "hits": stats["fxgraph_cache_hit"], "misses": stats["fxgraph_cache_miss"]}))
"""


def _run(cache: Path, tmp: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")}
    env["TMPDIR"] = str(tmp)  # inductor's default lands here, not in the machine's /tmp
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(cache)], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_the_compile_cache_is_the_servers_and_survives_a_restart(tmp_path: Path) -> None:
    cache = tmp_path / "data" / "compile-cache"
    first = _run(cache, tmp_path)
    assert first["default"] != str(cache) and first["env"] == str(cache)
    assert first["misses"] >= 1 and first["hits"] == 0
    assert any((cache / "fxgraph").rglob("*")) and any(cache.rglob("*.so"))  # graphs and kernels: the server's dir
    # Nothing in inductor's default dir but the C++ precompiled headers, which torch always puts under the
    # temp dir (codecache._HEADER_DIR ignores the variable; CPU only: CUDA kernels are Triton's).
    default_dir = Path(first["default"])
    strays = [p for p in default_dir.rglob("*") if p.is_file() and "precompiled_headers" not in p.parts]
    assert strays == []

    second = _run(cache, tmp_path)
    assert second["hits"] >= 1 and second["misses"] == 0  # the restart compiled nothing
