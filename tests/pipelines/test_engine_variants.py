"""Every (app, steps) variant: exactly N UNet evaluations at any strength, the right output size."""

from __future__ import annotations

import contextlib

import numpy as np
import pytest
import torch

from pipelines.types import InpaintRequest
from tests.helpers import box_mask, noise_image

VARIANTS = [
    ("fal-ai/fast-lightning-sdxl/inpainting", 1),
    ("fal-ai/fast-lightning-sdxl/inpainting", 2),
    ("fal-ai/fast-lightning-sdxl/inpainting", 4),
    ("fal-ai/fast-lightning-sdxl/inpainting", 8),
    ("fal-ai/hyper-sdxl/inpainting", 1),
    ("fal-ai/hyper-sdxl/inpainting", 2),
    ("fal-ai/hyper-sdxl/inpainting", 4),
]


@contextlib.contextmanager
def count_calls(module: torch.nn.Module):
    calls: list[int] = []
    handle = module.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape[0]))
    try:
        yield calls
    finally:
        handle.remove()


def test_configs_offer_the_fal_step_counts(spec):
    assert spec.app("fal-ai/hyper-sdxl/inpainting").steps == (1, 2, 4)
    assert spec.app("fal-ai/fast-lightning-sdxl/inpainting").steps == (1, 2, 4, 8)


@pytest.mark.parametrize(("app_id", "steps"), VARIANTS)
@pytest.mark.parametrize("strength", [1.0, 0.95, 0.3])
def test_exactly_n_unet_evaluations(engine, app_id, steps, strength):
    variant = engine.variants[(app_id, steps)]
    pipe = engine.pipeline(variant)
    request = InpaintRequest(
        app_id=app_id,
        image=noise_image(),
        mask=box_mask(),
        prompt="a red apple",
        steps=steps,
        strength=strength,
        seed=3,
        num_images=2,
        image_size=(64, 48),
    )
    with count_calls(pipe.unet) as calls:
        (result,) = engine.run([request])
    assert result.error is None
    assert calls == [2] * steps  # one batched evaluation per step, both images in it
    assert [im.size for im in result.images] == [(64, 48), (64, 48)]
    assert result.has_nsfw_concepts == [False, False]
    assert result.timings["inference"] > 0


def test_one_step_at_strength_095_changes_the_masked_region(engine):
    image = noise_image()
    (result,) = engine.run(
        [
            InpaintRequest(
                app_id="fal-ai/fast-lightning-sdxl/inpainting",
                image=image,
                mask=box_mask(),
                prompt="a cat",
                steps=1,
                strength=0.95,
                seed=1,
                image_size=(64, 48),
            )
        ]
    )
    out = np.asarray(result.images[0]).astype(int)
    inside = np.asarray(box_mask()) >= 128
    assert np.abs(out[inside] - np.asarray(image).astype(int)[inside]).mean() > 1.0


def test_lightning_and_hyper_variants_have_distinct_weights(engine):
    unets = {key: engine.pipeline(v).unet for key, v in engine.variants.items()}
    assert len({id(u) for u in unets.values()}) == len(VARIANTS)
    text = {id(engine.pipeline(v).text_encoder) for v in engine.variants.values()}
    vaes = {id(engine.pipeline(v).vae) for v in engine.variants.values()}
    assert len(text) == 1 and len(vaes) == 1  # shared between every variant of both apps


def test_lora_variants_are_fused_and_unloaded(engine, spec):
    base_state = engine.store._base_unet_state(spec.app("hyper-sdxl").variants[2].base)
    for steps in (2, 4):
        unet = engine.pipeline(engine.variants[("fal-ai/hyper-sdxl/inpainting", steps)]).unet
        names = [n for n, _ in unet.named_parameters()]
        assert not [n for n in names if "lora" in n]
        assert not getattr(unet, "peft_config", None)
        changed = [k for k, v in unet.state_dict().items() if not torch.equal(v, base_state[k].to(v.dtype))]
        assert changed and all("attn" in k for k in changed)  # only attention projections moved


def test_default_steps_and_strength_follow_the_app(engine):
    hyper = engine.prepare(
        InpaintRequest(app_id="hyper-sdxl", image=noise_image(), mask=box_mask(), prompt="x", image_size=(64, 48))
    )
    assert (hyper.variant.steps, hyper.strength, hyper.timesteps) == (1, 0.95, [800])
    lightning = engine.prepare(
        InpaintRequest(
            app_id="fast-lightning-sdxl", image=noise_image(), mask=box_mask(), prompt="x", image_size=(64, 48)
        )
    )
    assert (lightning.variant.steps, lightning.timesteps) == (4, [949, 711, 474, 237])


def test_no_image_size_keeps_the_input_size(engine, small_work):
    image = noise_image(50, 30)
    (result,) = engine.run(
        [InpaintRequest(app_id="hyper-sdxl", image=image, mask=box_mask(50, 30), prompt="x", seed=0)]
    )
    assert result.images[0].size == (50, 30)
    prepared = engine.prepare(InpaintRequest(app_id="hyper-sdxl", image=image, mask=box_mask(50, 30), prompt="x"))
    w, h = prepared.inputs.work_size
    assert w % 8 == 0 and h % 8 == 0 and abs(w / h - 50 / 30) < 0.2


def test_default_work_size_is_about_one_megapixel(engine):
    prepared = engine.prepare(
        InpaintRequest(app_id="hyper-sdxl", image=noise_image(400, 300), mask=box_mask(400, 300), prompt="x")
    )
    w, h = prepared.inputs.work_size
    assert (w * h) / 2**20 == pytest.approx(1.0, rel=0.02)
    assert prepared.inputs.output_size == (400, 300)


def test_image_size_gives_exact_output_size(engine):
    (result,) = engine.run(
        [
            InpaintRequest(
                app_id="hyper-sdxl", image=noise_image(64, 48), mask=box_mask(), prompt="x", image_size=(70, 45)
            )
        ]
    )
    assert result.images[0].size == (70, 45)
