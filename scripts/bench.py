"""Benchmark: the stock diffusers pipeline vs our engine, eager and compiled, on one GPU, in one run.

Nothing is downloaded. The full-size SDXL architecture (UNet 2.57 B parameters, VAE, both text encoders;
model-recipes.md §9.5) is built with random weights on the device and written once, as fp16 safetensors
in the Hugging Face layout, to ``--models-dir`` (about 8 GB; later runs reuse it). FLOPs are the same as
with the real weights. Every section loads that one folder, so all of them compute with the same weights:

* **naive**: what a user copies from the SDXL-Lightning model card, for inpainting: the UNet loaded from
  the checkpoint file, ``StableDiffusionXLInpaintPipeline.from_pretrained(base, unet=unet, dtype=fp16,
  variant="fp16")``, Euler "trailing" (x0 prediction for 1 step), ``guidance_scale=0``, the stock VAE
  settings (``force_upcast``: its encodes and decode run in fp32), ``strength=1.0`` so all N steps run,
  one request at a time, PIL in and out;
* **eager**: ``pipelines.engine.Engine`` through its normal loader (the served configs with
  ``--model-path``-style overrides pointing at the folder) without compiling (the server with
  ``--compile false``), ``engine.run`` on 1 request and on batches of ``--batch-sizes`` requests (PIL in
  and out, safety checker off unless ``--safety-checker``);
* **engine**: the same with the server's levers (``--speed auto``: on CUDA fused QKV, channels_last,
  regional torch.compile and CUDA graphs), warmed up as the server warms up before ready; the JSON's
  ``engines`` list says how long each engine took to load and to warm up (compile and record);
* **server** (opt-in): ``server.app.create_app`` with that engine under uvicorn on 127.0.0.1 (a child process by
  default, ``--server-mode thread`` for one process), driven over HTTP by ``--clients`` concurrent
  closed-loop clients: submit to the queue (JPEG and PNG data URIs), poll the status every
  ``--poll-interval`` s (or ``--wait stream``), fetch the result and the JPEG bytes;
* **equivalence**: the engine and the naive pipeline, same weights and seed, must give the same latents
  and the same pixels in the repainted half within a half-precision tolerance (``--latent-tol``,
  ``--pixel-tol``; the naive run is fp16 with an fp32 VAE, the engine bf16), while the naive pipeline
  at another seed must not, so speed never comes from computing something else. Exit status 1 if not.

Opt-in as well: **levers** (a fresh engine per lever set, side by side: none, +fused QKV,
+channels_last, +compile, +CUDA graphs, and on CUDA +cuDNN attention and +FP8 on top) and **ready** (the
real ``serve`` started twice on one data dir: seconds to ready cold and warm, first request vs steady).

Each section runs 1024x1024 inpainting with a half-image mask (the right half is repainted) for each of
``--steps`` (default 1 and 4 of SDXL-Lightning's 1, 2, 4, 8). Warm-up calls are not timed; on CUDA every
timed call ends with ``torch.cuda.synchronize()``. The table gives p50/p99 of the per-request latencies,
images/s over the wall time of the whole row, and the share of the compute floor: TFLOP per image x
images/s / the dense matmul rate measured at the start of the run in the engine's dtype (bf16 on CUDA).
TFLOP per image are perf-anchors.md §3's at full size and 1024x1024 (text encoders, one VAE encode, N
UNet steps, decode), else counted from the models with ``torch.utils.flop_counter`` on the meta device;
on a CPU the share is n/a (its matmul rate is no peak). ``--json`` gets the same rows plus the GPU,
torch/CUDA/diffusers versions, git commit, settings, FLOP counts, the server's mean stage timings and
the equivalence numbers.

    python scripts/bench.py                                   # naive, eager, compiled, equivalence: < 10 min on an H200
    python scripts/bench.py --sections server --clients 1,16,64 --json docs/bench-h200-server.json
    python scripts/bench.py --sections levers --steps 4 --batch-sizes 1,8
    python scripts/bench.py --tiny                            # tiny models on CPU: under a minute

Results are written to ``--json`` after every row, so a run cut short keeps what it measured.

The engine holds one UNet per step count, as the server does (5.1 GB each in bf16); on a GPU with less
than about 40 GB pass fewer ``--steps``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
for _path in (SCRIPTS, REPO):  # the bench_* helpers, and a checkout that is not pip-installed
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")  # before transformers is first imported

import torch  # noqa: E402
from bench_http import serve_child, server_rows  # noqa: E402
from bench_measure import (  # noqa: E402
    Inputs,
    Output,
    Row,
    Tolerances,
    bench_engine,
    bench_naive,
    check_equivalence,
    engine_output,
    make_inputs,
    matmul_tflops,
    naive_output,
)
from bench_models import (  # noqa: E402
    ANCHOR_TFLOP_1024,
    DTYPES,
    LEVERS,
    OPTIONAL_LEVERS,
    ModelSet,
    architecture,
    compile_cache,
    counted_tflop,
    default_models_dir,
    ensure_model_set,
    floor_tflop,
    free,
    load_engine,
    load_naive,
    log,
    naive_scheduler,
    quiet_libraries,
    speed_label,
    speed_options,
)
from bench_ready import ready_rows  # noqa: E402

from pipelines.engine import Engine  # noqa: E402

SECTIONS = ("naive", "eager", "engine", "equivalence")
EXTRA_SECTIONS = ("server", "levers", "ready")  # on request only: each loads the models again
SEED = 1234


# -- report -------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    """Hardware and software versions, recorded with every result."""
    import diffusers
    import transformers

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "device": str(device),
        "gpu": None,
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["gpu"] = {
            "name": props.name,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "count": torch.cuda.device_count(),
            "driver": _command(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]),
        }
    env["git_commit"] = _command(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    status = _command(["git", "-C", str(REPO), "status", "--porcelain"])
    env["git_dirty"] = bool(status) if status is not None else None
    return env


def _where(env: dict[str, Any]) -> str:
    return (env["gpu"] or {}).get("name") or "CPU"


def _command(argv: list[str]) -> str | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return out.splitlines()[0] if out else ""


def table(rows: list[dict[str, Any]]) -> str:
    """The rows as a fixed-width text table."""
    head = ("section", "steps", "batch", "clients", "requests", "p50 ms", "p99 ms", "img/s", "floor share")
    lines = [head]
    for r in rows:
        share = f"{100 * r['floor_share']:.1f} %" if r["floor_share"] is not None else "n/a"
        clients = str(r["clients"]) if r["clients"] is not None else "-"
        lines.append(
            (
                r["section"],
                str(r["steps"]),
                str(r["batch"]),
                clients,
                str(r["requests"]),
                f"{r['p50_ms']:.1f}",
                f"{r['p99_ms']:.1f}",
                f"{r['images_per_s']:.2f}",
                share,
            )
        )
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = [
        "  ".join(cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(line, widths, strict=True)))
        for line in lines
    ]
    out.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(out)


def floors(arch_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """TFLOP per image for each step count: perf-anchors.md at full size and 1024x1024, else counted."""
    components = counted_tflop(architecture(arch_name), args.width, args.height)
    counted = {n: _sig(floor_tflop(components, n)) for n in args.steps}
    anchored = arch_name == "full" and (args.width, args.height) == (1024, 1024)
    return {
        "source": "perf-anchors.md §3 (1024x1024)" if anchored else "counted (FlopCounterMode on the meta device)",
        "tflop_per_image": {n: ANCHOR_TFLOP_1024[n] if anchored else counted[n] for n in args.steps},
        "counted_tflop_per_image": counted,
        "counted_components_tflop": {k: _sig(v) for k, v in components.items()},
    }


def _sig(value: float, digits: int = 5) -> float:
    """``value`` to ``digits`` significant digits (tiny models have FLOP counts far below 1 TFLOP)."""
    return float(f"{value:.{digits}g}")


def naive_phase(
    args: argparse.Namespace, models: ModelSet, inputs: Inputs, device: torch.device, out: Results
) -> dict[int, tuple[Output, Output]]:
    """The stock pipeline: its timed rows (to ``out``) and, for the equivalence check, its outputs at two seeds."""
    sections = set(args.sections)
    references: dict[int, tuple[Output, Output]] = {}
    log(f"loading the naive pipeline ({args.naive_dtype})")
    pipe = load_naive(models, device, DTYPES[args.naive_dtype])
    for n in args.steps:
        pipe.scheduler = naive_scheduler(models, n)
        if "naive" in sections:
            row = bench_naive(pipe, inputs, n, args.warmup, args.iterations, args.seed)
            out.add(row)
            log(f"naive {n} steps: p50 {row.p50_ms:.1f} ms")
        if "equivalence" in sections:
            references[n] = (naive_output(pipe, inputs, n, args.seed), naive_output(pipe, inputs, n, args.seed + 1))
    del pipe
    free()
    return references


def equivalence_phase(
    args: argparse.Namespace, engine: Engine, inputs: Inputs, references: dict[int, tuple[Output, Output]]
) -> list[dict[str, Any]]:
    """One check per step count against the naive outputs from :func:`naive_phase`."""
    checks = []
    tol = Tolerances(args.latent_tol, args.pixel_tol)
    for n in args.steps:
        reference, contrast = references[n]
        check = check_equivalence(reference, contrast, engine_output(engine, inputs, n, args.seed), inputs, n, tol)
        same = check["engine_vs_naive"]
        verdict = "ok" if check["passed"] else "FAILED"
        log(f"equivalence {n} steps: latents {same['latent_rel_l2']:.4f}, pixel rms {same['pixel_rms']:.2f}: {verdict}")
        checks.append(check)
    return checks


def engine_phase(args: argparse.Namespace, engine: Engine, inputs: Inputs, section: str, out: Any) -> None:
    """One row per (step count, batch size), each written out as soon as it is measured."""
    for n in args.steps:
        for b in args.batch_sizes:
            row = bench_engine(engine, inputs, n, b, args.warmup, args.iterations, args.seed, args.safety_checker)
            row.section = section
            row.extra["speed"] = speed_label(engine.speed)
            log(f"{section} {n} steps, batch {b}: p50 {row.p50_ms:.1f} ms")
            out.add(row)


def eager_speed(args: argparse.Namespace, device: torch.device, models: ModelSet) -> Any:
    """The engine without compiling (the server with ``--compile false``): fused QKV and channels_last on CUDA."""
    return replace(
        speed_options("auto", device, compile_cache(models), args.compile_backend), compile=False, cuda_graphs=False
    )


def lever_sets(device: torch.device) -> list[str]:
    """The lever sweep's engines: none, then each lever of LEVERS added in turn, then (on CUDA) cuDNN
    attention and FP8 each on top of all of them."""
    sets = [",".join(LEVERS[:k]) or "none" for k in range(len(LEVERS) + 1)]
    if device.type == "cuda":
        sets += [",".join((*LEVERS, extra)) for extra in OPTIONAL_LEVERS]
    else:  # no CUDA graphs on a CPU: the last set would repeat the one before
        sets.pop()
    return sets


def lever_sweep(args: argparse.Namespace, models: ModelSet, inputs: Inputs, device: torch.device, out: Any) -> None:
    """The engine section once per lever set (:func:`lever_sets`), each on a freshly loaded engine: the gain
    of each lever, measured side by side in one run. A set that cannot load (FP8 failing its gate, say) is
    recorded with its error and the sweep goes on."""
    for text in lever_sets(device):
        speed = speed_options(text, device, compile_cache(models), args.compile_backend)
        label = f"levers:{speed_label(speed)}"
        log(f"lever sweep: loading the engine with {speed_label(speed)}")
        try:
            engine = load_engine(
                models, args.steps, device, DTYPES[args.engine_dtype], args.safety_checker, speed, args.resolution
            )
        except Exception as exc:
            out.note(label, error=f"{type(exc).__name__}: {str(exc)[:300]}")
            log(f"{label}: {exc}")
            free()
            continue
        out.engine(label, engine)
        engine_phase(args, engine, inputs, label, out)
        del engine
        free()


class Results:
    """The run's results, written to ``--json`` after every row (a run cut short keeps what it measured)."""

    def __init__(self, args: argparse.Namespace, env: dict[str, Any], rate: float, floor: dict, models: ModelSet):
        self.args, self.env, self.rate, self.floor, self.models = args, env, rate, floor, models
        self.rows: list[Row] = []
        self.checks: list[dict[str, Any]] = []
        self.engines: list[dict[str, Any]] = []
        self.notes: list[dict[str, Any]] = []
        self.peak = rate if torch.device(args.device).type == "cuda" else None  # a CPU's matmul rate is no peak

    def add(self, row: Row) -> None:
        self.rows.append(row)
        self.write()

    def engine(self, label: str, engine: Engine) -> None:
        """How long an engine took to load and warm up (compile, record CUDA graphs): time to ready."""
        from torch._dynamo.utils import counters

        times = getattr(engine, "bench_times", {})
        graphs = {"dynamo_graphs": counters["stats"]["unique_graphs"], "cuda_graphs": len(engine.graphs)}
        self.engines.append({"label": label, "speed": speed_label(engine.speed), **times, **graphs})
        self.write()

    def note(self, label: str, **values: Any) -> None:
        self.notes.append({"label": label, **values})
        self.write()

    def summaries(self) -> list[dict[str, Any]]:
        return [r.summary(self.floor["tflop_per_image"][r.steps], self.peak) for r in self.rows]

    def passed(self) -> bool | None:
        return all(c["passed"] for c in self.checks) if self.checks else None

    def write(self) -> None:
        args = self.args
        results = {
            "benchmark": "scripts/bench.py",
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "environment": self.env,
            "settings": {k: v for k, v in vars(args).items() if k not in ("serve_child", "data_dir")},
            "models": {"folder": str(self.models.root), "architecture": args.arch, "weights_seed": args.weights_seed},
            "matmul": {
                "dtype": args.engine_dtype,
                "n": args.matmul_size,
                "tflops": round(self.rate, 3),
                "used": self.peak is not None,
            },
            "floor": {
                k: {str(n): v for n, v in val.items()} if k.endswith("per_image") else val
                for k, val in self.floor.items()
            },
            "engines": self.engines,
            "rows": self.summaries(),
            "notes": self.notes,
            "equivalence": {
                "ran": bool(self.checks),
                "passed": self.passed(),
                "tolerances": {"latent_rel_l2": args.latent_tol, "pixel_rms": args.pixel_tol},
                "engine_dtype": args.engine_dtype,
                "naive_dtype": args.naive_dtype,
                "checks": self.checks,
            },
        }
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        partial.write_text(json.dumps(results, indent=2) + "\n")
        partial.replace(path)


def run(args: argparse.Namespace) -> int:
    """Every requested section, results written as they come; prints the table. 1 if the equivalence failed."""
    quiet_libraries()
    device = torch.device(args.device)
    sections = set(args.sections)
    models = ensure_model_set(Path(args.models_dir), architecture(args.arch), args.weights_seed, device)
    inputs = make_inputs(args.width, args.height)
    env = environment(device)
    size = f"{args.width}x{args.height}"
    log(f"{_where(env)}: {args.arch} models, {size}, naive {args.naive_dtype}, engine {args.engine_dtype}")
    rate = matmul_tflops(device, DTYPES[args.engine_dtype], args.matmul_size, args.matmul_repeats)
    log(f"dense {args.matmul_size}^3 matmul in {args.engine_dtype}: {rate:.2f} TFLOP/s")
    out = Results(args, env, rate, floors(args.arch, args), models)
    out.write()

    references: dict[int, tuple[Output, Output]] = {}
    if sections & {"naive", "equivalence"}:
        references = naive_phase(args, models, inputs, device, out)
    dtype = DTYPES[args.engine_dtype]
    if "eager" in sections:
        engine = load_engine(models, args.steps, device, dtype, args.safety_checker, eager_speed(args, device, models))
        out.engine("eager", engine)
        engine_phase(args, engine, inputs, "eager", out)
        del engine
        free()
    engine = None
    if sections & {"engine", "equivalence"} or ("server" in sections and args.server_mode == "thread"):
        log(f"loading the engine ({args.engine_dtype}, {len(args.steps)} variant(s))")
        speed = speed_options(args.speed, device, compile_cache(models), args.compile_backend)
        engine = load_engine(models, args.steps, device, dtype, args.safety_checker, speed, args.resolution)
        out.engine("engine", engine)
    if "equivalence" in sections:
        out.checks = equivalence_phase(args, engine, inputs, references)
        out.write()
    if "engine" in sections:
        engine_phase(args, engine, inputs, "engine", out)
    if "levers" in sections:
        engine = None
        free()
        lever_sweep(args, models, inputs, device, out)
    if "ready" in sections:
        engine = None
        free()
        for row in ready_rows(args, models, inputs):
            out.add(row)
    if "server" in sections:
        if args.server_mode == "process":
            engine = None  # the child process loads its own; give the device memory back first
            free()
        for row in server_rows(args, models, engine, inputs):
            out.add(row)
    return report(out)


def report(out: Results) -> int:
    """Print the table (the JSON is written already); the exit status (1 if the equivalence check failed)."""
    args, env = out.args, out.env
    passed = out.passed()
    cuda = f" (CUDA {env['cuda']})" if env["cuda"] else ""
    print(
        f"{_where(env)}, torch {env['torch']}{cuda}, diffusers {env['diffusers']}: {args.arch} SDXL, random weights, "
        f"{args.width}x{args.height}, half-image mask; naive {args.naive_dtype}, engine {args.engine_dtype}"
    )
    print(table(out.summaries()))
    for e in out.engines:
        print(
            f"engine {e['label']} ({e['speed']}): load {e.get('load_s')} s, warm-up {e.get('warmup_s')} s, "
            f"{e['dynamo_graphs']} dynamo graphs, {e['cuda_graphs']} CUDA graphs"
        )
    for note in out.notes:
        print(f"{note['label']}: {note.get('error')}")
    if out.checks:
        print(f"equivalence (engine vs naive, same weights and seed): {'passed' if passed else 'FAILED'}")
    used = "" if out.peak is not None else "; floor share n/a: not on a GPU"
    print(f"floor: {out.floor['source']}; matmul {out.rate:.2f} TFLOP/s ({args.engine_dtype}){used}")
    print(f"wrote {args.json}")
    return 1 if passed is False else 0


# -- command line -------------------------------------------------------------------------------------


def _ints(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def _sections(text: str) -> list[str]:
    names = [v.strip() for v in text.split(",") if v.strip()]
    unknown = sorted(set(names) - set(SECTIONS) - set(EXTRA_SECTIONS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"sections are {', '.join(SECTIONS + EXTRA_SECTIONS)}; got {text!r}")
    return names


def _resolution(text: str) -> tuple[int, int]:
    width, _, height = text.lower().partition("x")
    try:
        size = (int(width), int(height or width))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or WxH, got {text!r}") from None
    if min(size) < 8 or any(v % 8 for v in size):
        raise argparse.ArgumentTypeError(f"width and height must be multiples of 8, got {text!r}")
    return size


# Defaults that differ between a full-size GPU run and --tiny (CPU-friendly).
FULL_DEFAULTS: dict[str, Any] = {
    "resolution": (1024, 1024),
    "iterations": 10,
    "warmup": 2,
    "requests_per_client": 2,
    "server_requests": 16,
    "matmul_size": 8192,
    "matmul_repeats": 50,
}
TINY_DEFAULTS: dict[str, Any] = {
    **FULL_DEFAULTS,
    "resolution": (64, 64),
    "iterations": 3,
    "warmup": 1,
    "requests_per_client": 1,
    "server_requests": 2,
    "matmul_size": 2048,
    "matmul_repeats": 2,
}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The command line; per-mode defaults (full size vs ``--tiny``) are filled in after parsing."""
    full, tiny = FULL_DEFAULTS, TINY_DEFAULTS

    def per_mode(name: str) -> str:
        return f"default {full[name]}; {tiny[name]} with --tiny"

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--tiny", action="store_true", help="the tiny test models at 64x64 (same as --arch tiny)")
    add("--arch", choices=("full", "tiny"), default="full", help="model architecture (default full)")
    add("--device", help="cuda[:N] or cpu (default: cuda when available)")
    add("--engine-dtype", choices=(*DTYPES, "auto"), default="auto", help="auto: bf16 on CUDA, fp32 on CPU")
    add("--naive-dtype", choices=(*DTYPES, "auto"), default="auto", help="auto: fp16 on CUDA (model cards), else fp32")
    add(
        "--sections",
        type=_sections,
        default=list(SECTIONS),
        help="comma-separated (default " + ",".join(SECTIONS) + "; also " + ",".join(EXTRA_SECTIONS) + ")",
    )
    add(
        "--speed",
        default="auto",
        help="the engine's levers: auto (the server's choice: all on CUDA, none on CPU), none, or some of "
        + ",".join(LEVERS),
    )
    add(
        "--compile-backend",
        choices=("inductor", "eager"),
        default="inductor",
        help="torch.compile backend (default inductor; eager traces without code generation, for smoke tests)",
    )
    add("--steps", type=_ints, default=[1, 4], help="SDXL-Lightning step counts, of 1,2,4,8 (default 1,4)")
    add("--batch-sizes", type=_ints, default=[1, 8], help="engine batch sizes, at most 8 (default 1,8)")
    add("--clients", type=_ints, default=[1, 16, 64], help="concurrent HTTP clients (default 1,16,64)")
    add("--resolution", type=_resolution, help="N or WxH, multiples of 8 (default 1024; 64 with --tiny)")
    add("--iterations", type=int, help="timed calls per naive/engine row (" + per_mode("iterations") + ")")
    add("--warmup", type=int, help="untimed calls before each row (" + per_mode("warmup") + ")")
    add(
        "--requests-per-client",
        type=int,
        help="requests each client sends, at least (" + per_mode("requests_per_client") + ")",
    )
    add("--server-requests", type=int, help="requests per server row, at least (" + per_mode("server_requests") + ")")
    add(
        "--server-mode",
        choices=("process", "thread"),
        default="process",
        help="server in a child process (default) or a thread",
    )
    add("--server-max-batch-size", type=int, default=8, help="the server's max_batch_size (default 8)")
    add("--wait", choices=("poll", "stream"), default="poll", help="poll the status (default) or read its event stream")
    add("--poll-interval", type=float, default=0.01, help="seconds between status polls (default 0.01)")
    add("--safety-checker", action="store_true", help="also run the (random-weight) safety checker")
    add("--ready-timeout", type=float, default=3600.0, help="ready section: longest wait for a start (default 3600 s)")
    add(
        "--matmul-size",
        type=int,
        help="n of the n^3 matmul that measures the peak rate (" + per_mode("matmul_size") + ")",
    )
    add("--matmul-repeats", type=int, help="products per timing of that matmul (" + per_mode("matmul_repeats") + ")")
    add("--latent-tol", type=float, default=0.05, help="equivalence: largest relative L2 of latents (default 0.05)")
    add("--pixel-tol", type=float, default=4.0, help="equivalence: largest pixel RMS, 0-255 (default 4)")
    add("--seed", type=int, default=SEED, help=f"request seed; each request adds its index (default {SEED})")
    add("--weights-seed", type=int, default=0, help="seed of the random weights (default 0)")
    add("--models-dir", help="where the random-weight models are written once (default under ~/.cache)")
    add("--json", help="results file (default bench-<arch>.json)")
    add("--serve-child", type=int, help=argparse.SUPPRESS)  # internal: the server section's child process
    add("--data-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.tiny:
        args.arch = "tiny"
    defaults = TINY_DEFAULTS if args.arch == "tiny" else FULL_DEFAULTS
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.width, args.height = args.resolution
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = torch.device(args.device).type == "cuda"
    if args.engine_dtype == "auto":
        args.engine_dtype = "bf16" if cuda else "fp32"
    if args.naive_dtype == "auto":
        args.naive_dtype = "fp16" if cuda else "fp32"
    args.models_dir = args.models_dir or str(default_models_dir(args.arch, args.weights_seed))
    try:
        speed_options(args.speed, torch.device(args.device), None)
    except ValueError as exc:
        parser.error(str(exc))
    args.json = args.json or f"bench-{args.arch}.json"
    bad = sorted(set(args.steps) - set(ANCHOR_TFLOP_1024))
    if bad:
        parser.error(f"--steps: SDXL-Lightning offers 1, 2, 4 and 8 steps, not {bad}")
    if max(args.batch_sizes) > 8:
        parser.error("--batch-sizes: a GPU batch holds at most 8 image rows (larger ones run as several)")
    counts = (args.iterations, args.requests_per_client, args.server_requests, args.matmul_size, args.matmul_repeats)
    if min(counts) < 1 or args.warmup < 0:
        parser.error("--iterations, the request counts and the matmul settings must be >= 1, --warmup >= 0")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.serve_child is not None:
        return serve_child(args)
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
