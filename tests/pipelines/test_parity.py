"""At strength 1.0 the engine's latents equal the stock diffusers pipeline's (same weights, scheduler,
timesteps and seed), so the engine's speed-ups never compute something else."""

from __future__ import annotations

import pytest
import torch
from diffusers import StableDiffusionXLInpaintPipeline

from pipelines.schedules import make_scheduler
from pipelines.types import InpaintRequest
from tests.helpers import box_mask, noise_image

CASES = [
    ("fal-ai/fast-lightning-sdxl/inpainting", 1),  # Euler, prediction_type="sample"
    ("fal-ai/fast-lightning-sdxl/inpainting", 4),  # Euler trailing
    ("fal-ai/fast-lightning-sdxl/inpainting", 8),
    ("fal-ai/hyper-sdxl/inpainting", 1),  # LCM at t=800
    ("fal-ai/hyper-sdxl/inpainting", 2),  # TCD eta 0 (fused LoRA)
    ("fal-ai/hyper-sdxl/inpainting", 4),
]


def engine_latents(engine, request: InpaintRequest) -> torch.Tensor:
    """Run the real engine and capture the latents it hands to the VAE decode."""
    pipe = engine.pipeline(engine.variants[(request.app_id, request.steps)])
    seen: list[torch.Tensor] = []
    original = pipe.decode

    def spy(latents):
        seen.append(latents.clone())
        return original(latents)

    pipe.decode = spy
    try:
        (result,) = engine.run([request])
    finally:
        del pipe.decode
    assert result.error is None
    return seen[0]


@pytest.mark.parametrize(("app_id", "steps"), CASES)
def test_latents_match_stock_pipeline_at_strength_one(engine, app_id, steps):
    seed, prompt = 1234, "a lighthouse at dusk"
    request = InpaintRequest(
        app_id=app_id,
        image=noise_image(64, 48, seed=5),
        mask=box_mask(64, 48),
        prompt=prompt,
        steps=steps,
        strength=1.0,
        seed=seed,
        image_size=(64, 48),
        enable_safety_checker=False,
    )
    ours = engine_latents(engine, request)

    prepared = engine.prepare(request)
    variant = prepared.variant
    mine = engine.pipeline(variant)
    stock = StableDiffusionXLInpaintPipeline(
        vae=mine.vae,
        text_encoder=mine.text_encoder,
        text_encoder_2=mine.text_encoder_2,
        tokenizer=mine.tokenizer,
        tokenizer_2=mine.tokenizer_2,
        unet=mine.unet,
        scheduler=make_scheduler(variant, engine.store.scheduler_config(variant.base)),
        add_watermarker=False,
    )
    stock.set_progress_bar_config(disable=True)
    width, height = prepared.inputs.work_size
    kwargs = {"eta": variant.eta} if variant.eta is not None else {}
    theirs = stock(
        prompt=prompt,
        image=prepared.inputs.work_image,
        mask_image=prepared.inputs.work_mask,
        height=height,
        width=width,
        strength=1.0,
        timesteps=prepared.timesteps,
        guidance_scale=0.0,
        generator=[torch.Generator("cpu").manual_seed(seed)],
        # The documented way to skip the masked-image encode a 4-channel UNet never reads; it also keeps
        # the generator streams aligned (model-recipes.md §3.5).
        masked_image_latents=torch.zeros(1, 4, height // 8, width // 8),
        output_type="latent",
        **kwargs,
    ).images
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_stock_pipeline_cannot_do_one_step_at_095_but_the_engine_can(engine):
    """The reason for strength-scaled schedules: stock raises where fal's default request must work."""
    request = InpaintRequest(
        app_id="fal-ai/fast-lightning-sdxl/inpainting",
        image=noise_image(),
        mask=box_mask(),
        prompt="x",
        steps=1,
        strength=0.95,
        image_size=(64, 48),
    )
    prepared = engine.prepare(request)
    mine = engine.pipeline(prepared.variant)
    stock = StableDiffusionXLInpaintPipeline(**mine.components)
    stock.scheduler = make_scheduler(prepared.variant, engine.store.scheduler_config(prepared.variant.base))
    stock.set_progress_bar_config(disable=True)
    with pytest.raises(ValueError, match="num_inference_steps"):
        stock(
            prompt="x",
            image=prepared.inputs.work_image,
            mask_image=prepared.inputs.work_mask,
            height=48,
            width=64,
            strength=0.95,
            num_inference_steps=1,
            guidance_scale=0.0,
            output_type="latent",
        )
    (result,) = engine.run([request])
    assert result.error is None and prepared.timesteps == [949]
