"""The safety checker's flagged path: flagged images come back black, at the requested size."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from pipelines.types import InpaintRequest
from tests.helpers import box_mask, noise_image, png

APP = "fal-ai/fast-lightning-sdxl/inpainting"
SIZE = (64, 48)


def request(**kw) -> InpaintRequest:
    fields = dict(
        app_id=APP,
        image=png(noise_image(64, 48, seed=5)),
        mask=png(box_mask(64, 48)),
        prompt="a photo",
        steps=2,
        seed=11,
        num_images=2,
        image_size=SIZE,
    )
    fields.update(kw)
    return InpaintRequest(**fields)


@pytest.fixture
def flag_everything(engine) -> Iterator[None]:
    """Make every concept threshold negative, so every image is flagged; restore the exact tensor after."""
    assert engine.safety_checker is not None
    weights = engine.safety_checker.model.concept_embeds_weights
    saved = weights.data.clone()
    try:
        weights.data.fill_(-1)
        yield
    finally:
        weights.data.copy_(saved)


def is_black(image) -> bool:
    return not np.asarray(image).any()


def test_nothing_is_flagged_with_the_original_weights(engine):
    (result,) = engine.run([request()])
    assert result.error is None
    assert result.has_nsfw_concepts == [False, False]
    assert [im.size for im in result.images] == [SIZE, SIZE]
    assert not any(is_black(im) for im in result.images)


def test_flagged_images_are_black_and_keep_their_size(engine, flag_everything):
    (result,) = engine.run([request()])
    assert result.error is None
    assert result.has_nsfw_concepts == [True, True]
    assert len(result.images) == 2
    for image in result.images:
        assert image.size == SIZE
        assert image.mode == "RGB"
        assert is_black(image)


def test_disabled_checker_returns_the_images_unflagged(engine, flag_everything):
    (result,) = engine.run([request(enable_safety_checker=False)])
    assert result.error is None
    assert result.has_nsfw_concepts == [False, False]
    assert [im.size for im in result.images] == [SIZE, SIZE]
    assert not any(is_black(im) for im in result.images)


def test_checker_is_per_request_within_one_batch(engine, flag_everything):
    checked, unchecked = engine.run([request(request_id="a"), request(request_id="b", enable_safety_checker=False)])
    assert checked.has_nsfw_concepts == [True, True] and all(is_black(im) for im in checked.images)
    assert unchecked.has_nsfw_concepts == [False, False] and not any(is_black(im) for im in unchecked.images)


def test_weights_are_restored_after_the_flagged_tests(engine):
    (result,) = engine.run([request(num_images=1)])
    assert result.has_nsfw_concepts == [False]
    assert not is_black(result.images[0])


@pytest.mark.parametrize("size", [(64, 48), (48, 64), (300, 200), (1024, 768)])
def test_tensor_preprocessing_matches_the_clip_processor(engine, size) -> None:
    """The checker preprocesses the composited uint8 tensors on their device; that equals CLIP's own
    (PIL) processor up to resampling rounding, and gives the same flags."""
    import torch

    from pipelines.tensors import pixels

    checker = engine.safety_checker
    images = [noise_image(*size, seed=s) for s in range(3)]
    ours = checker.clip_pixels(torch.stack([pixels(im) for im in images]))
    theirs = checker.processor(images=images, return_tensors="pt").pixel_values
    assert ours.shape == theirs.shape == (3, 3, 224, 224)
    # One grey level is 1 / (255 * std) ~ 0.015 after normalising. On average they differ by a third of one;
    # PIL rounds and clips to uint8 between its two resampling passes, which on pure noise (the worst
    # case) moves single pixels by up to ~20 levels.
    assert (ours - theirs).abs().mean() < 0.01 and (ours - theirs).abs().max() < 0.5
    model = checker.model
    _, ours_flags = model(images=[np.zeros(1)] * 3, clip_input=ours.to(checker.dtype))
    _, their_flags = model(images=[np.zeros(1)] * 3, clip_input=theirs.to(checker.dtype))
    assert list(ours_flags) == list(their_flags)
