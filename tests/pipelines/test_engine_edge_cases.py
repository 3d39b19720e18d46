"""Reliability cases M4 (all-white mask) and M11 (odd prompts) through the real engine on tiny models."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from pipelines.types import InpaintRequest
from tests.helpers import noise_image

SIZE = (64, 48)


def _request(mask: Image.Image, prompt: str = "a red door", **kw) -> InpaintRequest:
    fields = {"image_size": SIZE, "request_id": "edge", **kw}
    return InpaintRequest(
        app_id="fal-ai/fast-lightning-sdxl/inpainting",
        image=noise_image(*SIZE, seed=11),
        mask=mask,
        prompt=prompt,
        steps=2,
        seed=7,
        enable_safety_checker=False,
        **fields,
    )


def test_all_white_mask_regenerates_the_whole_frame(engine) -> None:
    """M4: white everywhere means repaint everything: the UNet runs and (almost) every pixel changes."""
    (result,) = engine.run([_request(Image.new("L", SIZE, 255), strength=1.0)])
    assert result.error is None and "inference" in result.timings and result.timings["inference"] > 0
    before = np.asarray(noise_image(*SIZE, seed=11), dtype=np.int16)
    after = np.asarray(result.images[0], dtype=np.int16)
    changed = np.any(before != after, axis=-1).mean()
    assert changed > 0.95, changed


@pytest.mark.parametrize(
    "prompt",
    [
        "",  # empty prompts are allowed
        " ".join(f"red door {i}" for i in range(300)),  # far past CLIP's 77 tokens: truncated
        "a door\x00with a NUL byte",
        "باب أحمر 🚪 דלת אדומה ✨",  # right-to-left scripts and emoji
    ],
    ids=["empty", "over-77-tokens", "nul", "rtl-emoji"],
)
def test_odd_prompts_are_served_not_500(engine, prompt: str) -> None:
    """M11: no error for empty, overlong, NUL or RTL/emoji prompts; the prompt is echoed as given."""
    mask = Image.new("L", SIZE, 0)
    mask.paste(255, (16, 12, 48, 36))
    (result,) = engine.run([_request(mask, prompt=prompt)])
    assert result.error is None, result.error
    assert result.prompt == prompt
    assert result.images[0].size == SIZE
    # Only the overlong prompt is reported as truncated, naming the words CLIP never saw.
    if prompt.count(" ") > 77:
        (warning,) = result.warnings
        assert "77 tokens" in warning
        ignored = warning.split("ignored: ", 1)[1].strip("'").rstrip("…")
        assert len(ignored) > 50 and prompt.find(ignored) > 0  # a later part of the prompt, verbatim
    else:
        assert result.warnings == []


def test_a_4096_square_input_is_processed_at_the_working_size(engine, small_work) -> None:
    """M10: a large input within limits works at the engine's working resolution and keeps its own size."""
    big = (4096, 4096)
    mask = Image.new("L", big, 0)
    mask.paste(255, (1024, 1024, 3072, 3072))
    request = InpaintRequest(
        app_id="fal-ai/fast-lightning-sdxl/inpainting",
        image=noise_image(*big, seed=3),
        mask=mask,
        prompt="a red door",
        steps=1,
        seed=1,
        enable_safety_checker=False,
        request_id="big",
    )
    prepared = engine.prepare(request)
    assert prepared.inputs.work_size[0] * prepared.inputs.work_size[1] <= 2 * engine.work_pixels
    (result,) = engine.run([prepared])
    assert result.error is None and result.images[0].size == big


def test_sizes_below_the_models_minimum_are_made_at_the_minimum_and_resized(engine) -> None:
    """Issue 13, item 20: image_size 1x1 to 16x16 (and 8x16, 16x8) failed in the tiny UNet's GroupNorm (a 1x1 map
    with one channel per group); they are made at 32 px per side and resized to the size asked for."""
    mask = Image.new("L", SIZE, 0)
    mask.paste(255, (16, 12, 48, 36))
    sizes = [(1, 1), (8, 16), (16, 8), (16, 16), (8, 4096)]
    results = engine.run([_request(mask, image_size=size, request_id=f"{size}") for size in sizes])
    for size, result in zip(sizes, results, strict=True):
        assert result.error is None, (size, result.error)
        assert result.images[0].size == size


def test_a_4x4_input_without_image_size_keeps_its_size(engine, small_work) -> None:
    """Without image_size (the CLI's generate) the output follows the input: a 4x4 input gives a 4x4 image."""
    request = InpaintRequest(
        app_id="fal-ai/fast-lightning-sdxl/inpainting",
        image=noise_image(4, 4, seed=3),
        mask=Image.new("L", (4, 4), 255),
        prompt="a red door",
        steps=2,
        seed=1,
        enable_safety_checker=False,
        request_id="tiny-input",
    )
    (result,) = engine.run([request])
    assert result.error is None and result.images[0].size == (4, 4)
