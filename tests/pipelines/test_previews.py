"""Step previews: the latent-to-RGB projection, and the engine handing them out only to requests that asked."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from pipelines.previews import SDXL_LATENT_RGB_BIAS, SDXL_LATENT_RGB_FACTORS, LatentProjection, StepPreview
from pipelines.types import InpaintRequest
from tests.helpers import box_mask, noise_image, png

APP = "fal-ai/fast-lightning-sdxl/inpainting"


def expected_rgb(latent: list[float]) -> list[int]:
    """What one latent pixel must become, computed by hand from the published factors."""
    out = []
    for r in range(3):
        value = sum(latent[c] * SDXL_LATENT_RGB_FACTORS[c][r] for c in range(4)) + SDXL_LATENT_RGB_BIAS[r]
        out.append(round(min(max((value + 1) * 127.5, 0), 255)))
    return out


def test_projection_maps_known_latents_to_the_expected_rgb() -> None:
    projection = LatentProjection()
    pixels = [[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0], [0.5, -0.5, 1.5, -2.0]]
    latents = torch.tensor(pixels).T.reshape(1, 4, 2, 2)  # channel c of pixel k at latents[0, c].flatten()[k]
    rgb = projection.to_rgb(latents)
    assert rgb.dtype == torch.uint8 and rgb.shape == (1, 3, 2, 2)
    got = rgb[0].reshape(3, 4).T.tolist()
    assert got == [expected_rgb(p) for p in pixels]
    assert got[0] == [141, 125, 127]  # zero latents: the bias alone, (b + 1) * 127.5
    assert got[1] == [188, 179, 183]  # channel 0 is luminance: brighter in every colour


def test_projection_saturates_to_the_uint8_range() -> None:
    rgb = LatentProjection().to_rgb(torch.tensor([50.0, -50.0, 50.0, -50.0]).reshape(1, 4, 1, 1))
    assert rgb.flatten().tolist() == [255, 255, 255]
    rgb = LatentProjection().to_rgb(torch.full((1, 4, 1, 1), float("-inf")).nan_to_num(-1e4))
    assert rgb.min() >= 0 and rgb.max() <= 255


def test_projection_refuses_other_latent_shapes() -> None:
    with pytest.raises(ValueError, match="4 latent channels"):
        LatentProjection().to_rgb(torch.zeros(1, 16, 2, 2))


def test_step_preview_encodes_one_jpeg_per_row() -> None:
    pixels = torch.zeros(3, 3, 6, 8, dtype=torch.uint8)
    pixels[1, 0] = 255  # the second image is red
    preview = StepPreview.capture(pixels).rows(1, 3)
    jpegs = preview.jpegs()
    assert [(j.width, j.height) for j in jpegs] == [(8, 6), (8, 6)]
    with Image.open(io.BytesIO(jpegs[0].data)) as image:
        assert image.format == "JPEG" and image.size == (8, 6)
        red, green, blue = np.asarray(image.convert("RGB")).reshape(-1, 3).mean(axis=0)
        assert red > 200 and green < 50 and blue < 50


def _request(request_id: str, previews: bool, num_images: int = 1) -> InpaintRequest:
    return InpaintRequest(
        app_id=APP,
        image=png(noise_image(64, 48, seed=3)),
        mask=png(box_mask(64, 48)),
        prompt="a red boat",
        steps=2,
        seed=11,
        num_images=num_images,
        image_size=(64, 48),
        request_id=request_id,
        previews=previews,
    )


def test_only_requests_that_asked_get_previews_and_the_images_do_not_change(engine) -> None:
    calls: list[tuple] = []
    with_previews, without = _request("with", True, num_images=2), _request("without", False)
    results = engine.run([with_previews, without], on_progress=lambda *args: calls.append(args))
    assert [(c[0], c[1], c[2], len(c)) for c in calls] == [
        ("with", 1, 2, 4),
        ("without", 1, 2, 3),
        ("with", 2, 2, 4),
        ("without", 2, 2, 3),
    ]
    for *_, preview in (c for c in calls if len(c) == 4):
        jpegs = preview.jpegs()
        assert len(jpegs) == 2  # one per image of the request
        assert all((j.width, j.height) == (8, 6) for j in jpegs)  # the latent resolution: 1/8 of 64x48
    # Previews change nothing: the same request without them gives the same pixels.
    (plain,) = engine.run([_request("with", False, num_images=2)])
    for a, b in zip(results[0].images, plain.images, strict=True):
        assert np.array_equal(np.asarray(a), np.asarray(b))
