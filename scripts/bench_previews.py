"""What step previews cost: the same batch through the engine with and without previews, step time of each.

A preview adds, per step and only for the requests that asked, the predicted clean latents (x0) of the
preview rows, the 3x4 latent-to-RGB projection, a uint8 cast and an asynchronous copy to pinned host memory
(pipelines/previews.py); the JPEG encoding runs on another thread, as in the server's worker
(server/jobs/step_previews.py), so its CPU time and GIL share are counted here too. The step time is the
engine's own ``inference`` stage (the denoising loop; timed with CUDA events on a GPU) divided by the steps.
Runs alternate with and without previews so that drift (clocks, other load) hits both alike.

    python scripts/bench_previews.py                       # tiny random models on the CPU, 512x512
    python scripts/bench_previews.py --arch full --batch 4 # full-size SDXL (random weights) on the GPU, 1024x1024

The target is < 1 % of the step time on a GPU at full size (docs/performance.md). On a CPU with the tiny
models the ratio says little about a GPU: a tiny UNet step costs about as much as the projection.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

SCRIPTS = Path(__file__).resolve().parent
REPO = SCRIPTS.parent
for _path in (SCRIPTS, REPO):
    if str(_path) not in sys.path:
        sys.path.insert(0, str(_path))

import torch  # noqa: E402
from bench_measure import engine_request, make_inputs, sync  # noqa: E402
from bench_models import (  # noqa: E402
    architecture,
    compile_cache,
    default_models_dir,
    ensure_model_set,
    load_engine,
    quiet_libraries,
    speed_options,
)


def measure(engine: Any, requests: list[Any], previews: bool, encoder: ThreadPoolExecutor) -> dict[str, Any]:
    """One timed batch: seconds per denoising step, and what the previews cost on the encoder thread."""
    batch = [replace(r, previews=previews) for r in requests]
    encodes: list[float] = []
    sizes: list[int] = []

    def encode(preview: Any) -> None:
        started = time.perf_counter()
        jpegs = preview.jpegs()
        encodes.append(time.perf_counter() - started)
        sizes.extend(len(j.data) for j in jpegs)

    pending = []

    def on_progress(request_id: str, step: int, total: int, *preview: Any) -> None:
        if preview:
            pending.append(encoder.submit(encode, preview[0]))

    device = engine.device
    sync(device)
    results = engine.run(batch, on_progress=on_progress)
    sync(device)
    for future in pending:
        future.result()
    errors = [r.error for r in results if r.error is not None]
    if errors:
        raise RuntimeError(f"the batch failed: {errors[0]}")
    steps = batch[0].steps
    return {
        "step_s": statistics.median(r.timings["inference"] for r in results) / steps,
        "previews": len(encodes),
        "encode_ms": 1000 * statistics.median(encodes) if encodes else None,
        "jpeg_bytes": int(statistics.median(sizes)) if sizes else None,
    }


def preview_op_ms(device: torch.device, dtype: torch.dtype, rows: int, side: int, repeats: int = 200) -> float:
    """The preview's device work alone, per step: x0 (an Euler epsilon step's arithmetic), the blend with the
    input outside the mask, the projection, the uint8 cast and the copy to pinned memory (milliseconds)."""
    from pipelines.inpaint import PROJECTION
    from pipelines.previews import StepPreview

    shape = (rows, 4, side // 8, side // 8)
    latents, noise_pred, image = (torch.randn(shape, device=device, dtype=dtype) for _ in range(3))
    mask = (torch.rand((rows, 1, *shape[2:]), device=device) > 0.5).to(dtype)

    def once() -> StepPreview:
        x0 = latents.to(torch.float32) - 0.5 * noise_pred
        return StepPreview.capture(PROJECTION.to_rgb((1 - mask) * image + mask * x0))

    for _ in range(10):
        once()
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        last = once()
    if last.ready is not None:
        last.ready.synchronize()
    sync(device)
    return 1000 * (time.perf_counter() - started) / repeats


def run(args: argparse.Namespace) -> dict[str, Any]:
    quiet_libraries()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    arch = architecture(args.arch)
    models = ensure_model_set(Path(args.models_dir or default_models_dir(args.arch, 0)), arch, 0, device)
    speed = speed_options(args.speed, device, compile_cache(models))
    inputs = make_inputs(args.resolution, args.resolution)
    engine = load_engine(models, [args.steps], device, dtype, False, speed, (args.resolution, args.resolution))
    requests = [
        replace(engine_request(inputs, args.steps, seed, f"r{seed}", False), num_images=args.num_images)
        for seed in range(args.batch)
    ]
    encoder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="previews")
    for previews in (False, True):  # warm-up: first calls allocate, pin memory, pick kernels
        measure(engine, requests, previews, encoder)
    runs: dict[bool, list[dict[str, Any]]] = {False: [], True: []}
    for _ in range(args.repeats):
        for previews in (False, True):
            runs[previews].append(measure(engine, requests, previews, encoder))
    without = statistics.median(r["step_s"] for r in runs[False])
    with_previews = statistics.median(r["step_s"] for r in runs[True])
    latent = args.resolution // 8
    op_ms = preview_op_ms(device, dtype, args.batch * args.num_images, args.resolution)
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "arch": args.arch,
        "resolution": args.resolution,
        "preview_size": f"{latent}x{latent}",
        "steps": args.steps,
        "batch": args.batch,
        "num_images": args.num_images,
        "repeats": args.repeats,
        "step_ms_without": round(1000 * without, 3),
        "step_ms_with": round(1000 * with_previews, 3),
        "ratio": round(with_previews / without, 4),
        "overhead_pct": round(100 * (with_previews / without - 1), 2),
        "preview_op_ms": round(op_ms, 4),
        "preview_op_pct_of_step": round(100 * op_ms / (1000 * without), 3),
        "encode_ms_per_request": round(statistics.median(r["encode_ms"] for r in runs[True]), 3),
        "jpeg_bytes_per_image": statistics.median(r["jpeg_bytes"] for r in runs[True]),
    }


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--arch", choices=("tiny", "full"), default="tiny", help="model size (default tiny: the test models)")
    add("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
    add("--resolution", type=int, help="square side in pixels, a multiple of 8 (default 1024 full, 512 tiny)")
    add("--steps", type=int, default=4, choices=(1, 2, 4, 8), help="SDXL-Lightning steps (default 4)")
    add("--batch", type=int, default=1, help="requests in the batch, every one with previews or none (default 1)")
    add("--num-images", type=int, default=1, help="images per request (default 1)")
    add("--repeats", type=int, default=10, help="timed batches of each kind (default 10)")
    add("--speed", default=None, help="engine levers as scripts/bench.py takes them (default: auto full, none tiny)")
    add("--models-dir", help="where the random-weight models are written (default: the bench cache)")
    add("--json", type=Path, help="also write the numbers to this file")
    args = parser.parse_args(argv)
    if args.resolution is None:
        args.resolution = 1024 if args.arch == "full" else 512
    if args.speed is None:
        args.speed = "auto" if args.arch == "full" else "none"
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    numbers = run(args)
    print(
        f"{numbers['device']}, {numbers['arch']} {args.resolution}x{args.resolution}, {args.steps} steps, "
        f"batch {args.batch} x {args.num_images} image(s): step {numbers['step_ms_without']} ms without previews, "
        f"{numbers['step_ms_with']} ms with (ratio {numbers['ratio']}, {numbers['overhead_pct']:+.2f} %); "
        f"the preview's device work alone {numbers['preview_op_ms']} ms per step "
        f"({numbers['preview_op_pct_of_step']} % of a step); "
        f"JPEG {numbers['encode_ms_per_request']} ms per request on the encoder thread, "
        f"{numbers['jpeg_bytes_per_image']} bytes per {numbers['preview_size']} preview"
    )
    if args.json:
        args.json.write_text(json.dumps(numbers, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
