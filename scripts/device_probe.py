#!/usr/bin/env python3
"""One-shot GPU probe for a lent device (15 minutes of device time in all, start-up included).

Adapted from ``../shared/tools/device_probe.py`` to the engine as it is now (issue 10): regional
compile with dynamic shapes, whole-UNet CUDA graphs recorded by the warm-up, host-precomputed
samplers, device-side pre/post-processing, FP8 behind a gate. Nothing is downloaded and nothing is
written to disk but the results: full-size SDXL modules are built with random weights on the device
and the real engine (``Engine.run``: PIL in, prompt encode, padding, denoise, decode, composite) runs on
them through a pre-filled ModelStore. Sections run in order of value; each is skipped when the time
left (``--budget``) is below its estimated cost, and every result is appended to ``OUT/probe.jsonl``
at once, so a timeout still leaves everything measured so far.

  S0  env: GPU, versions, bf16 dense matmul rate, FP8 rowwise rate
  S1  build: two UNets (SDXL-Lightning 4-step Euler, Hyper-SDXL 1-step LCM), VAE, both text encoders
  S4  naive StableDiffusionXLInpaintPipeline (fp16, stock force_upcast VAE), 4 steps, batch 1
  S5  engine eager: p50 at batch 1 (4 and 1 steps) and 8; stage timings; host syncs in the loop
  S6  engine compiled: the warm-up before ready (every variant x bucket at the size) = cold ready time;
      p50 at batch 1 (4 and 1 steps), batch 8 throughput; graph counts; host syncs
  S9  restart: a child process with the same inductor cache runs the same warm-up = warm ready time
  S3  kernels: SDPA backends (flash/cuDNN/efficient) on the UNet's shapes; FP8 rowwise vs bf16 GEMMs
  S11 FP8: the gate's numbers on one UNet and its step time against bf16
  S12 VAE decode of crops (what decoding only the masked tiles would save)
  S10 max-autotune vs default on one 1280-wide transformer block

    python scripts/device_probe.py --out results --budget 540        # on the GPU
    python scripts/device_probe.py --arch tiny --device cpu --size 64 --compile-backend eager --out /tmp/p
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
for _p in (REPO, REPO / "scripts"):
    if str(_p) not in sys.path:
        sys.path.insert(0, str(_p))

import torch  # noqa: E402

T0 = time.monotonic()
ARGS: argparse.Namespace
RESULTS: list[dict] = []
LIGHTNING, HYPER = "fal-ai/fast-lightning-sdxl/inpainting", "fal-ai/hyper-sdxl/inpainting"
VARIANTS = ((LIGHTNING, 4), (HYPER, 1))  # one Euler, one LCM UNet


def left() -> float:
    return ARGS.budget - (time.monotonic() - T0)


def record(section: str, **values: Any) -> None:
    row = {"section": section, "t": round(time.monotonic() - T0, 1), **values}
    RESULTS.append(row)
    with open(Path(ARGS.out) / "probe.jsonl", "a") as f:
        f.write(json.dumps(row, default=str) + "\n")
    print(json.dumps(row, default=str), flush=True)


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def timed(fn, reps: int = 5, warm: int = 2) -> float:
    """Median milliseconds of ``fn()`` (CUDA events on the GPU, perf_counter on the CPU)."""
    for _ in range(warm):
        fn()
    sync()
    times = []
    for _ in range(reps):
        if DEVICE.type == "cuda":
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t) * 1000)
    return round(statistics.median(times), 3)


@contextlib.contextmanager
def section(name: str, cost_s: float):
    """Run the block only if ``cost_s`` fits in the time left; record an exception instead of dying."""
    if left() < cost_s:
        record(name, skipped=f"{left():.0f} s left < {cost_s:.0f} s needed")
        yield False
        return
    try:
        yield True
    except Exception as exc:  # keep going: later sections are independent
        record(name, error=f"{type(exc).__name__}: {str(exc)[:400]}")
        gc.collect()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()


def mem() -> dict:
    if DEVICE.type != "cuda":
        return {}
    return {
        "alloc_gib": round(torch.cuda.memory_allocated() / 2**30, 2),
        "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
    }


def compile_stats() -> dict:
    from torch._dynamo.utils import counters

    return {
        "dynamo_graphs": counters["stats"]["unique_graphs"],
        "fxgraph_hit": counters["inductor"]["fxgraph_cache_hit"],
        "fxgraph_miss": counters["inductor"]["fxgraph_cache_miss"],
    }


# -- models and the engine ----------------------------------------------------------------------------


def build_models(arch, dtype, seed: int = 0, n_unets: int = len(VARIANTS)):
    """Tokenizers, both text encoders, ``n_unets`` UNets and the VAE, random weights, built on the device and
    frozen as pipelines/loading.py leaves them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    from pipelines import tiny
    from pipelines.loading import frozen

    tokdir = Path(tempfile.mkdtemp(prefix="probe-tok-"))
    toks = []
    for folder, pad in (("tokenizer", tiny.EOS), ("tokenizer_2", "!")):
        (tokdir / folder).mkdir()
        for name, content in tiny._clip_tokenizer_files(pad).items():
            (tokdir / folder / name).write_bytes(content)
        toks.append(CLIPTokenizer.from_pretrained(tokdir / folder))
    ids = {"bos_token_id": 0, "eos_token_id": 2, "pad_token_id": 1, "max_position_embeddings": 77}

    def text(cls, dims):
        return cls(CLIPTextConfig(**{**dims, "vocab_size": dims["vocab_size"] or len(toks[0])}, **ids))

    with torch.device(DEVICE):
        torch.manual_seed(seed)
        te1 = frozen(text(CLIPTextModel, arch.text_encoder).to(dtype))
        te2 = frozen(text(CLIPTextModelWithProjection, arch.text_encoder_2).to(dtype))
        unets = []
        for k in range(n_unets):
            torch.manual_seed(seed + 10 + k)
            unets.append(frozen(UNet2DConditionModel(**arch.unet).to(dtype)))
        torch.manual_seed(seed + 3)
        vae = frozen(AutoencoderKL(**arch.vae, force_upcast=False).to(dtype))
    return toks, te1, te2, unets, vae


def make_engine(toks, te1, te2, unets, vae, speed):
    """The real Engine around in-memory modules: VARIANTS[k] runs on unets[k]."""
    from pipelines import tiny
    from pipelines.engine import Engine
    from pipelines.hub import Resolver
    from pipelines.inpaint import FewStepInpaintPipeline
    from pipelines.loading import ModelStore, TextStack
    from pipelines.optimize import optimize_pipeline
    from pipelines.prompt_cache import PromptCache
    from pipelines.schedules import make_scheduler
    from pipelines.specs import load_serving_spec

    spec = load_serving_spec()
    store = ModelStore(DEVICE, DTYPE, Resolver(local_files_only=True))
    variants = {}
    for (app_id, steps), unet in zip(VARIANTS, unets, strict=False):
        v = spec.app(app_id).variants[steps]
        store._cache[("scheduler", v.base.key)] = dict(tiny.SDXL_SCHEDULER_CONFIG)
        store._cache[("text", v.base.key)] = TextStack(toks[0], toks[1], te1, te2)
        pipe = FewStepInpaintPipeline(
            vae=vae,
            text_encoder=te1,
            text_encoder_2=te2,
            tokenizer=toks[0],
            tokenizer_2=toks[1],
            unet=unet,
            scheduler=make_scheduler(v, dict(tiny.SDXL_SCHEDULER_CONFIG)),
            add_watermarker=False,
        )
        pipe.set_progress_bar_config(disable=True)
        store._cache[("pipeline", v.base.key, v.vae.key, v.checkpoint.key, v.scheduler_class)] = pipe
        variants[(v.app_id, steps)] = v
        optimize_pipeline(pipe, speed)
    return Engine(spec, store, variants, None, None, speed, PromptCache(0))


def requests(n: int, app: str, steps: int, seed: int):
    import numpy as np
    from PIL import Image

    from pipelines.types import InpaintRequest

    s = ARGS.size
    y, x = np.mgrid[0:s, 0:s].astype(np.float32)
    channels = [128 + 100 * np.sin(x / s * 6), 255 * y / (s - 1), 128 + 120 * np.cos((x + y) / s * 4.5)]
    image = Image.fromarray(np.clip(np.stack(channels, -1), 0, 255).astype(np.uint8), "RGB")
    m = np.zeros((s, s), np.uint8)
    m[:, s // 2 :] = 255  # right half repainted, as scripts/bench.py
    mask = Image.fromarray(m, "L")
    return [
        InpaintRequest(
            app_id=app,
            image=image,
            mask=mask,
            prompt=f"a lighthouse at dusk, variation {seed + k}",
            steps=steps,
            seed=seed + k,
            image_size=(s, s),
            enable_safety_checker=False,
            request_id=f"p{seed}-{k}",
        )
        for k in range(n)
    ]


def run_engine(engine, n: int, app: str, steps: int, seed: int) -> tuple[float, dict]:
    """Wall seconds of one Engine.run of ``n`` requests, and the first result's stage timings (ms)."""
    reqs = requests(n, app, steps, seed)
    sync()
    t = time.perf_counter()
    results = engine.run(reqs)
    sync()
    elapsed = time.perf_counter() - t
    bad = [r.error for r in results if r.error is not None]
    if bad:
        raise RuntimeError(f"engine error: {bad[0]!r}")
    return elapsed, {k: round(v * 1000, 2) for k, v in results[0].timings.items()}


def engine_rows(engine, label: str, n: int, app: str, steps: int, reps: int, seed: int) -> None:
    samples, stages = [], None
    for i in range(reps):
        s, stages = run_engine(engine, n, app, steps, seed + 100 * i)
        samples.append(s)
    p50 = statistics.median(samples)
    record(
        label,
        batch=n,
        app=app.split("/")[1],
        steps=steps,
        p50_ms=round(p50 * 1000, 1),
        img_per_s=round(n / p50, 2),
        all_ms=[round(x * 1000, 1) for x in samples],
        stages_ms=stages,
        **mem(),
    )


def loop_syncs(engine, app: str, steps: int, seed: int) -> dict:
    """Host syncs inside ``denoise`` (the loop) and in the whole run, by call site (CUDA sync-debug warnings)."""
    if DEVICE.type != "cuda":
        return {}
    pipe = engine.pipeline(engine.variants[(app, steps)])
    inside: list[int] = []
    original = pipe.denoise

    def counted(batch, on_step=None, unet=None):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = original(batch, on_step, unet)
        inside.append(sum("synchroniz" in str(w.message) for w in caught))
        return out

    sites: dict[str, int] = {}
    pipe.denoise = counted
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            run_engine(engine, 1, app, steps, seed)
        finally:
            torch.cuda.set_sync_debug_mode("default")
            del pipe.denoise
    for w in caught:
        if "synchroniz" in str(w.message):
            key = f"{Path(w.filename).name}:{w.lineno}"
            sites[key] = sites.get(key, 0) + 1
    return {"in_denoise_loop": sum(inside), "whole_run_by_site": dict(sorted(sites.items(), key=lambda kv: -kv[1]))}


def warm(engine) -> float:
    """The warm-up the server runs before ready (every variant x bucket at the size); wall seconds."""
    from pipelines.warmup import plan_warmup, run_units

    sync()
    t = time.perf_counter()
    size = (ARGS.size, ARGS.size)
    run_units(engine, plan_warmup(engine, [size], size).ready, "probe")
    engine.seal_compiled_shapes()
    sync()
    return round(time.perf_counter() - t, 1)


# -- sections -----------------------------------------------------------------------------------------


def s0_env() -> None:
    env = {"torch": torch.__version__, "cuda": torch.version.cuda, "device": str(DEVICE), "cpus": os.cpu_count()}
    if DEVICE.type == "cuda":
        p = torch.cuda.get_device_properties(DEVICE)
        env.update(
            gpu=p.name,
            capability=f"{p.major}.{p.minor}",
            sms=p.multi_processor_count,
            mem_gib=round(p.total_memory / 2**30, 1),
            cudnn=torch.backends.cudnn.version(),
        )
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=10,
            ).stdout.strip()
        n = 8192
        a, b = (torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16) for _ in range(2))
        env["bf16_tflops"] = round(2 * n**3 / timed(lambda: a @ b, reps=10, warm=3) / 1e9, 1)
        try:
            af, bf = a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)
            sa, sb = torch.ones(n, 1, device=DEVICE), torch.ones(1, n, device=DEVICE)
            ms8 = timed(
                lambda: torch._scaled_mm(af, bf.t(), sa, sb, out_dtype=torch.bfloat16, use_fast_accum=True), reps=10
            )
            env["fp8_rowwise_tflops"] = round(2 * n**3 / ms8 / 1e9, 1)
        except Exception as exc:
            env["fp8_rowwise_tflops"] = f"n/a: {exc}"[:200]
        del a, b
    import diffusers

    env["diffusers"] = diffusers.__version__
    record("S0 env", **env)


def s4_naive(arch) -> None:
    from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLInpaintPipeline

    from pipelines import tiny

    toks, te1, te2, unets, _ = build_models(arch, torch.float16, seed=7, n_unets=1)
    with torch.device(DEVICE):
        vae = AutoencoderKL(**arch.vae, force_upcast=True).eval().half()  # the stock SDXL VAE settings
    pipe = StableDiffusionXLInpaintPipeline(
        vae=vae,
        text_encoder=te1,
        text_encoder_2=te2,
        tokenizer=toks[0],
        tokenizer_2=toks[1],
        unet=unets[0],
        scheduler=EulerDiscreteScheduler.from_config(dict(tiny.SDXL_SCHEDULER_CONFIG), timestep_spacing="trailing"),
        add_watermarker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    (r,) = requests(1, LIGHTNING, 4, 1)

    def call():
        pipe(
            prompt=r.prompt,
            image=r.image,
            mask_image=r.mask,
            height=ARGS.size,
            width=ARGS.size,
            num_inference_steps=4,
            guidance_scale=0.0,
            strength=1.0,
            generator=torch.Generator(DEVICE).manual_seed(1),
        )

    samples = []
    for _ in range(4):
        sync()
        t = time.perf_counter()
        call()
        sync()
        samples.append(time.perf_counter() - t)
    samples = samples[1:]
    record(
        "S4 naive",
        steps=4,
        batch=1,
        p50_ms=round(1000 * statistics.median(samples), 1),
        all_ms=[round(1000 * s, 1) for s in samples],
    )
    gc.collect()
    if DEVICE.type == "cuda":
        torch.cuda.empty_cache()


def s5_eager(engine) -> None:
    run_engine(engine, 1, LIGHTNING, 4, 1)  # first call: lazy init
    engine_rows(engine, "S5 engine eager", 1, LIGHTNING, 4, reps=5, seed=10)
    engine_rows(engine, "S5 engine eager", 1, HYPER, 1, reps=5, seed=15)
    engine_rows(engine, "S5 engine eager", 8, LIGHTNING, 4, reps=2, seed=20)
    record("S5 host syncs (eager)", **loop_syncs(engine, LIGHTNING, 4, 30))
    from pipelines.prompt_cache import PromptCache

    engine.prompt_cache = PromptCache(64)
    gc.collect()
    m0 = torch.cuda.memory_allocated() if DEVICE.type == "cuda" else 0
    for i in range(8):
        run_engine(engine, 1, LIGHTNING, 4, 500 + i)  # 8 distinct prompts -> 8 cache entries
    gc.collect()
    m1 = torch.cuda.memory_allocated() if DEVICE.type == "cuda" else 0
    e = next(iter(engine.prompt_cache._entries.values()))[0]
    record(
        "S5 prompt-cache retention",
        entries=len(engine.prompt_cache),
        mib_per_entry=round((m1 - m0) / 8 / 2**20, 2),
        cached_grad_fn=e.grad_fn is not None,
    )
    engine.prompt_cache = PromptCache(0)


def s6_compiled(parts, compiled_speed) -> Any:
    engine = make_engine(*parts, compiled_speed)
    ready_s = warm(engine)
    record(
        "S6 compiled: warm-up before ready (cold cache)",
        seconds=ready_s,
        cuda_graphs=len(engine.graphs),
        **compile_stats(),
        **mem(),
    )
    engine_rows(engine, "S6 engine compiled", 1, LIGHTNING, 4, reps=7, seed=60)
    engine_rows(engine, "S6 engine compiled", 1, HYPER, 1, reps=7, seed=65)
    engine_rows(engine, "S6 engine compiled", 8, LIGHTNING, 4, reps=3, seed=70)
    engine_rows(engine, "S6 engine compiled", 8, HYPER, 1, reps=3, seed=75)
    record("S6 host syncs (compiled)", replays=engine.graphs.replays, **loop_syncs(engine, LIGHTNING, 4, 80))
    return engine


def s3_kernels() -> None:
    if DEVICE.type != "cuda":
        record("S3 kernels", skipped="cpu")
        return
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backends = {
        "flash": SDPBackend.FLASH_ATTENTION,
        "cudnn": SDPBackend.CUDNN_ATTENTION,
        "efficient": SDPBackend.EFFICIENT_ATTENTION,
    }
    shapes = {
        "unet L1 self b1": (1, 10, 4096, 4096, 64),
        "unet L2 self b1": (1, 20, 1024, 1024, 64),
        "unet L2 cross b1": (1, 20, 1024, 77, 64),
        "unet L1 self b8": (8, 10, 4096, 4096, 64),
        "unet L2 self b8": (8, 20, 1024, 1024, 64),
        "vae mid b1": (1, 1, 16384, 16384, 512),
    }
    for name, (b, h, sq, sk, d) in shapes.items():
        q = torch.randn(b, h, sq, d, device=DEVICE, dtype=DTYPE)
        k, v = (torch.randn(b, h, sk, d, device=DEVICE, dtype=DTYPE) for _ in range(2))
        row = {}
        for bname, be in backends.items():
            try:
                with sdpa_kernel(be):
                    row[bname] = timed(
                        lambda q=q, k=k, v=v: torch.nn.functional.scaled_dot_product_attention(q, k, v), reps=5
                    )
            except RuntimeError:
                row[bname] = None
        record("S3 sdpa", shape=name, ms=row)
    for m_tok, kk, nn_ in ((1024, 1280, 10240), (1024, 5120, 1280), (1024, 1280, 3840), (4096, 640, 5120)):
        for b in (1, 8):
            m = m_tok * b
            a = torch.randn(m, kk, device=DEVICE, dtype=DTYPE)
            w = torch.randn(nn_, kk, device=DEVICE, dtype=DTYPE)
            bf = timed(lambda a=a, w=w: a @ w.t(), reps=10)
            wf, sw = w.to(torch.float8_e4m3fn), torch.ones(1, nn_, device=DEVICE)
            af, sa = a.to(torch.float8_e4m3fn), torch.ones(m, 1, device=DEVICE)
            gemm = timed(
                lambda af=af, wf=wf, sa=sa, sw=sw: torch._scaled_mm(
                    af, wf.t(), sa, sw, out_dtype=DTYPE, use_fast_accum=True
                ),
                reps=10,
            )
            record("S3 gemm", mkn=[m, kk, nn_], bf16_ms=bf, fp8_gemm_ms=gemm)


def s11_fp8(unet) -> None:
    """The FP8 gate's numbers on a copy of one UNet, and the UNet step in FP8 against bf16 (eager)."""
    from pipelines.fp8 import probe_inputs, quantize_unet

    inputs = probe_inputs(unet, latent=ARGS.size // 8)
    with torch.inference_mode():
        bf16_ms = timed(lambda: unet(**inputs, return_dict=False), reps=5)
    quantized = copy.deepcopy(unet)
    report = quantize_unet(quantized, max_error=1.0)
    with torch.inference_mode():
        fp8_ms = timed(lambda: quantized(**inputs, return_dict=False), reps=5)
    record(
        "S11 fp8",
        relative_l2=round(report.relative_l2, 5),
        psnr_db=round(report.psnr_db, 2),
        layers=report.layers,
        unet_step_bf16_ms=bf16_ms,
        unet_step_fp8_ms=fp8_ms,
        **mem(),
    )


def s12_crop_decode(vae) -> None:
    """VAE decode time of the whole latent vs crops of it: what decoding only the tiles under the mask saves."""
    lat = ARGS.size // 8
    row = {}
    with torch.inference_mode():
        for share in (1.0, 0.5, 0.25):
            w = max(8, int(lat * share) // 8 * 8)
            z = torch.randn(1, 4, lat, w, device=DEVICE, dtype=DTYPE)
            row[f"width_{share:g}_ms"] = timed(lambda z=z: vae.decode(z), reps=3)
    record("S12 crop decode (batch 1)", **row)


def s10_block_autotune(unet) -> None:
    """Compile cost and speed of max-autotune vs default on one level-2 BasicTransformerBlock (b=1)."""
    from diffusers.models.attention import BasicTransformerBlock

    blocks = [m for m in unet.modules() if isinstance(m, BasicTransformerBlock)]
    blk = max(blocks, key=lambda m: m.norm1.normalized_shape[0])
    dim = blk.norm1.normalized_shape[0]
    x = torch.randn(1, (ARGS.size // 32) ** 2, dim, device=DEVICE, dtype=DTYPE)
    ctx = torch.randn(1, 77, ARCH.unet["cross_attention_dim"], device=DEVICE, dtype=DTYPE)
    with torch.inference_mode():
        row = {"dim": dim, "tokens": x.shape[1], "eager_ms": timed(lambda: blk(x, encoder_hidden_states=ctx), reps=10)}
        for mode in ("default", "max-autotune-no-cudagraphs"):
            torch._dynamo.reset()
            use_mode = None if mode == "default" or ARGS.compile_backend != "inductor" else mode
            fn = torch.compile(copy.deepcopy(blk), mode=use_mode, fullgraph=True, backend=ARGS.compile_backend)
            t = time.perf_counter()
            fn(x, encoder_hidden_states=ctx)
            sync()
            row[f"{mode}_compile_s"] = round(time.perf_counter() - t, 1)
            row[f"{mode}_ms"] = timed(lambda fn=fn: fn(x, encoder_hidden_states=ctx), reps=10)
    record("S10 block autotune", **row)


def main() -> int:
    global ARGS, DEVICE, DTYPE, ARCH
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--budget", type=float, default=540, help="seconds this process may use")
    ap.add_argument("--arch", default="full", choices=("full", "tiny"))
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--size", type=int, default=1024)
    ap.add_argument("--compile-backend", default="inductor")
    ap.add_argument("--cache-dir", default=None, help="inductor cache (default: a fresh one under --out)")
    ap.add_argument("--phase", default="main", choices=("main", "restart"))
    ARGS = ap.parse_args()
    Path(ARGS.out).mkdir(parents=True, exist_ok=True)
    from bench_models import architecture

    from pipelines.optimize import SpeedOptions

    DEVICE = torch.device(ARGS.device)
    DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
    ARCH = architecture(ARGS.arch)
    cache_dir = Path(ARGS.cache_dir or Path(ARGS.out) / "inductor-cache")
    eager_speed = SpeedOptions.for_device(DEVICE, compile=False)
    compiled_speed = SpeedOptions.for_device(
        DEVICE, compile=True, cache_dir=cache_dir, compile_backend=ARGS.compile_backend
    )

    if ARGS.phase == "restart":  # S9 child: the same warm-up in a fresh process, on the warm cache
        t = time.perf_counter()
        parts = build_models(ARCH, DTYPE)
        built = round(time.perf_counter() - t, 1)
        engine = make_engine(*parts, compiled_speed)
        ready_s = warm(engine)
        first = [round(run_engine(engine, 1, LIGHTNING, 4, 50 + i)[0] * 1000, 1) for i in range(3)]
        record(
            "S9 restart (child)",
            build_s=built,
            warmup_before_ready_s=ready_s,
            first_three_requests_ms=first,
            **compile_stats(),
        )
        return 0

    with section("S0 env", 20) as ok:
        if ok:
            s0_env()
    with section("S1 build", 60) as ok:
        if not ok:
            return 1
        t = time.perf_counter()
        parts = build_models(ARCH, DTYPE)
        eager = make_engine(*parts, eager_speed)
        record("S1 build", seconds=round(time.perf_counter() - t, 1), **mem())
    with section("S4 naive", 45) as ok:
        if ok:
            s4_naive(ARCH)
    with section("S5 engine eager", 45) as ok:
        if ok:
            s5_eager(eager)
    with section("S6 engine compiled", 240) as ok:
        if ok:
            s6_compiled(parts, compiled_speed)
    with section("S9 restart", 120) as ok:
        if ok:
            t = time.perf_counter()
            cmd = [
                sys.executable,
                __file__,
                "--phase",
                "restart",
                "--out",
                ARGS.out,
                "--arch",
                ARGS.arch,
                "--device",
                ARGS.device,
                "--size",
                str(ARGS.size),
                "--compile-backend",
                ARGS.compile_backend,
                "--cache-dir",
                str(cache_dir),
            ]
            proc = subprocess.run(cmd, timeout=max(30, left() - 10), capture_output=True, text=True)
            record(
                "S9 restart",
                wall_s=round(time.perf_counter() - t, 1),
                rc=proc.returncode,
                tail=(proc.stdout[-400:] + proc.stderr[-400:]) if proc.returncode else "",
            )
    with section("S3 kernels", 40) as ok:
        if ok:
            s3_kernels()
    with section("S11 fp8", 60) as ok:
        if ok:
            s11_fp8(parts[3][0])
    with section("S12 crop decode", 20) as ok:
        if ok:
            s12_crop_decode(parts[4])
    with section("S10 max-autotune on one transformer block", 90) as ok:
        if ok:
            s10_block_autotune(parts[3][0])
    print("\nsummary (section: key numbers)")
    for r in RESULTS:
        keys = {k: v for k, v in r.items() if k not in ("section", "t", "tail", "all_ms")}
        print(f"{r['section']:44s} {json.dumps(keys, default=str)[:240]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
