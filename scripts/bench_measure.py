"""The naive and engine sections of scripts/bench.py, and the equivalence check between them."""

from __future__ import annotations

import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from bench_models import APP
from PIL import Image

from pipelines.engine import Engine
from pipelines.types import InpaintRequest

if TYPE_CHECKING:
    from diffusers import StableDiffusionXLInpaintPipeline

PROMPT = "a red brick lighthouse on a rocky coast at dusk, detailed"


def prompt_for(seed: int) -> str:
    """A distinct prompt per request (by its seed): the engine's prompt cache never helps a timed request,
    as with real traffic where prompts seldom repeat; the naive run at the same seed gets the same text."""
    return f"{PROMPT}, variation {seed}"


# -- inputs -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Inputs:
    """The same picture and mask for every section: encoded bytes for HTTP, decoded images for the rest."""

    width: int
    height: int
    image_bytes: bytes
    mask_bytes: bytes
    image: Image.Image
    mask: Image.Image

    @property
    def size(self) -> tuple[int, int]:
        return (self.width, self.height)

    def repainted(self) -> np.ndarray:
        """Boolean (H, W): where the mask asks for new pixels."""
        return np.asarray(self.mask) >= 128


def make_inputs(width: int, height: int) -> Inputs:
    """A smooth synthetic photo (JPEG, like a user upload) and a half-image mask (PNG, right half white)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    r = 128 + 100 * np.sin(x / width * 6.0) * np.cos(y / height * 3.0)
    g = 255 * y / max(height - 1, 1)
    b = 128 + 120 * np.cos((x + y) / (width + height) * 9.0)
    pixels = np.clip(np.stack([r, g, b], axis=-1), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buf, format="JPEG", quality=90)
    image_bytes = buf.getvalue()
    mask = np.zeros((height, width), dtype=np.uint8)
    mask[:, width // 2 :] = 255
    buf = io.BytesIO()
    Image.fromarray(mask, mode="L").save(buf, format="PNG")
    mask_bytes = buf.getvalue()
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    return Inputs(width, height, image_bytes, mask_bytes, image, Image.open(io.BytesIO(mask_bytes)).convert("L"))


def engine_request(inputs: Inputs, steps: int, seed: int, name: str, safety_checker: bool) -> InpaintRequest:
    """The engine's form of the same request: PIL inputs, ``strength=1.0``, one image."""
    return InpaintRequest(
        app_id=APP,
        image=inputs.image,
        mask=inputs.mask,
        prompt=prompt_for(seed),
        steps=steps,
        strength=1.0,
        seed=seed,
        image_size=inputs.size,
        enable_safety_checker=safety_checker,
        request_id=name,
    )


def naive_call(
    pipe: StableDiffusionXLInpaintPipeline, inputs: Inputs, steps: int, seed: int, output_type: str = "pil"
) -> Any:
    """One request as the model card runs it, with ``strength=1.0`` so all ``steps`` UNet calls happen."""
    return pipe(
        prompt=prompt_for(seed),
        image=inputs.image,
        mask_image=inputs.mask,
        height=inputs.height,
        width=inputs.width,
        num_inference_steps=steps,
        guidance_scale=0.0,
        strength=1.0,
        generator=torch.Generator(pipe.device).manual_seed(seed),
        output_type=output_type,
    ).images


# -- measuring ----------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (CUDA kernels run asynchronously), so timings cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class Row:
    """One measured configuration: per-request latencies and the wall time of the whole timed section."""

    section: str
    steps: int
    batch: int
    clients: int | None
    images: int
    wall_s: float
    latencies_s: list[float]
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def p50_ms(self) -> float:
        """Median latency in milliseconds."""
        return float(np.percentile(self.latencies_s, 50) * 1000)

    def summary(self, tflop_per_image: float | None, rate_tflops: float | None) -> dict[str, Any]:
        """The JSON row; ``floor_share`` = TFLOP per image x images/s / ``rate_tflops`` (None without a rate)."""
        lat = np.asarray(self.latencies_s) * 1000
        images_per_s = self.images / self.wall_s if self.wall_s > 0 else float("nan")
        share = None
        if tflop_per_image is not None and rate_tflops:
            share = tflop_per_image * images_per_s / rate_tflops
        return {
            "section": self.section,
            "steps": self.steps,
            "batch": self.batch,
            "clients": self.clients,
            "requests": len(self.latencies_s),
            "images": self.images,
            "wall_s": round(self.wall_s, 4),
            "p50_ms": round(float(np.percentile(lat, 50)), 2),
            "p99_ms": round(float(np.percentile(lat, 99)), 2),
            "mean_ms": round(float(lat.mean()), 2),
            "images_per_s": round(images_per_s, 3),
            "floor_tflop_per_image": tflop_per_image,
            "floor_share": round(share, 6) if share is not None else None,
            **self.extra,
        }


def timed_loop(
    device: torch.device, warmup: int, iterations: int, call: Callable[[int], int]
) -> tuple[float, list[float], int]:
    """``warmup`` untimed calls, then ``iterations`` timed ones; ``call(i)`` returns the images it made.

    Returns (wall seconds of the timed part, per-call latencies, images made in the timed part).
    """
    for i in range(warmup):
        call(-1 - i)
    sync(device)
    latencies = []
    images = 0
    started = time.perf_counter()
    for i in range(iterations):
        t0 = time.perf_counter()
        images += call(i)
        sync(device)
        latencies.append(time.perf_counter() - t0)
    return time.perf_counter() - started, latencies, images


def matmul_tflops(device: torch.device, dtype: torch.dtype, n: int, repeats: int) -> float:
    """Dense ``n``x``n`` matmul rate (TFLOP/s): the best of 3 runs of ``repeats`` back-to-back products."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(3):
        sync(device)
        t0 = time.perf_counter()
        for _ in range(repeats):
            a @ b
        sync(device)
        best = min(best, (time.perf_counter() - t0) / repeats)
    return 2 * n**3 / best / 1e12


# -- naive and engine sections ------------------------------------------------------------------------


def bench_naive(
    pipe: StableDiffusionXLInpaintPipeline, inputs: Inputs, steps: int, warmup: int, iterations: int, seed: int
) -> Row:
    """The stock pipeline, one request at a time (the scheduler for ``steps`` must already be set)."""

    def call(i: int) -> int:
        return len(naive_call(pipe, inputs, steps, seed + 1 + i))

    wall, latencies, images = timed_loop(pipe.device, warmup, iterations, call)
    return Row("naive", steps, 1, None, images, wall, latencies)


def bench_engine(
    engine: Engine, inputs: Inputs, steps: int, batch: int, warmup: int, iterations: int, seed: int, safety: bool
) -> Row:
    """``engine.run`` on ``batch`` requests at once (distinct seeds, one shared UNet batch)."""

    def call(i: int) -> int:
        requests = [
            engine_request(inputs, steps, seed + 1 + (i + warmup) * batch + k, f"bench-{i}-{k}", safety)
            for k in range(batch)
        ]
        results = engine.run(requests)
        failed = [r for r in results if r.error is not None]
        if failed:
            raise RuntimeError(f"engine request failed: {failed[0].error!r}")
        return sum(len(r.images) for r in results)

    wall, latencies, images = timed_loop(engine.device, warmup, iterations, call)
    return Row("engine", steps, batch, None, images, wall, latencies)


# -- equivalence --------------------------------------------------------------------------------------


@dataclass
class Output:
    """Final latents (before the VAE decode) and the RGB pixels of one image."""

    latents: torch.Tensor
    pixels: np.ndarray


@dataclass(frozen=True)
class Tolerances:
    """Largest allowed difference in the repainted half: latents (relative L2) and pixels (RMS, 0-255)."""

    latent_rel: float
    pixel_rms: float


def naive_output(pipe: StableDiffusionXLInpaintPipeline, inputs: Inputs, steps: int, seed: int) -> Output:
    """The stock pipeline's final latents (``output_type="latent"``) and image, from two identical calls."""
    latents = naive_call(pipe, inputs, steps, seed, output_type="latent")
    image = naive_call(pipe, inputs, steps, seed)[0]
    return Output(latents.float().cpu(), np.asarray(image.convert("RGB")))


def engine_output(engine: Engine, inputs: Inputs, steps: int, seed: int) -> Output:
    """One request through ``engine.run``, catching the latents it hands to the VAE decode."""
    pipe = engine.pipeline(engine.variants[(APP, steps)])
    seen: list[torch.Tensor] = []
    decode = pipe.decode

    def spy(latents: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.append(latents.detach().float().cpu())
        return decode(latents, *args, **kwargs)

    pipe.decode = spy
    try:
        (result,) = engine.run([engine_request(inputs, steps, seed, "equivalence", False)])
    finally:
        del pipe.decode
    if result.error is not None:
        raise RuntimeError(f"engine request failed: {result.error!r}")
    return Output(seen[0], np.asarray(result.images[0].convert("RGB")))


def difference(reference: Output, other: Output, repainted: np.ndarray) -> dict[str, float]:
    """How far ``other`` is from ``reference`` where the mask repaints (outside, the engine pastes the input)."""
    where = torch.from_numpy(np.ascontiguousarray(repainted[4::8, 4::8]))  # the centre of each latent's 8x8 block
    if tuple(where.shape) != tuple(reference.latents.shape[-2:]):
        raise ValueError(f"latents {tuple(reference.latents.shape)} do not match a {repainted.shape} mask")
    ref_lat, oth_lat = reference.latents[..., where], other.latents[..., where]
    ref_px = reference.pixels[repainted].astype(np.float64)
    diff = other.pixels[repainted].astype(np.float64) - ref_px
    return {
        "latent_rel_l2": float((oth_lat - ref_lat).norm() / ref_lat.norm().clamp_min(1e-12)),
        "pixel_rms": float(np.sqrt((diff**2).mean())),
        "pixel_max_abs": float(np.abs(diff).max()),
        "pixel_std_reference": float(ref_px.std()),
    }


def check_equivalence(
    reference: Output, contrast: Output, engine_out: Output, inputs: Inputs, steps: int, tol: Tolerances
) -> dict[str, Any]:
    """Engine vs naive at the same seed must be within ``tol``; naive at another seed must not be.

    The second half keeps the check honest: if a different seed (different noise, so a different
    image) also passed, the tolerance could not tell computations apart and the check fails.
    """
    repainted = inputs.repainted()
    same = difference(reference, engine_out, repainted)
    other = difference(reference, contrast, repainted)
    within = same["latent_rel_l2"] <= tol.latent_rel and same["pixel_rms"] <= tol.pixel_rms
    discriminates = other["latent_rel_l2"] > tol.latent_rel and other["pixel_rms"] > tol.pixel_rms
    return {
        "steps": steps,
        "engine_vs_naive": same,
        "naive_other_seed": other,
        "within_tolerance": within,
        "tolerance_discriminates": discriminates,
        "passed": bool(within and discriminates),
    }
