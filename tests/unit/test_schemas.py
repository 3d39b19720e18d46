"""fal's input schemas per app: defaults, enums, integer-or-string steps, image_size forms."""

from __future__ import annotations

from typing import Any

import pytest
from pydantic import BaseModel, ValidationError

from server.http.schemas import input_model

REQUIRED = {"image_url": "https://example.com/i.png", "mask_url": "https://example.com/m.png", "prompt": "p"}


@pytest.fixture(scope="module")
def hyper(spec) -> type[BaseModel]:
    return input_model(spec.app("fal-ai/hyper-sdxl/inpainting"))


@pytest.fixture(scope="module")
def lightning(spec) -> type[BaseModel]:
    return input_model(spec.app("fal-ai/fast-lightning-sdxl/inpainting"))


def _dump(model: type[BaseModel], **fields: Any) -> dict[str, Any]:
    return model.model_validate({**REQUIRED, **fields}).model_dump(mode="json")


def test_defaults_follow_fal(hyper, lightning) -> None:
    shared = {
        "image_size": "square_hd",
        "strength": 0.95,
        "seed": None,
        "num_images": 1,
        "embeddings": [],
        "enable_safety_checker": True,
        "expand_prompt": False,
        "format": "jpeg",
        "sync_mode": False,
    }
    assert _dump(hyper) == {**REQUIRED, **shared, "num_inference_steps": "1"}
    assert _dump(lightning) == {
        **REQUIRED,
        **shared,
        "num_inference_steps": "4",
        "safety_checker_version": "v1",
        "request_id": "",
    }


@pytest.mark.parametrize(
    ("app", "value", "expected"),
    [
        ("hyper", "2", "2"),
        ("hyper", 4, "4"),
        ("lightning", "8", "8"),
        ("lightning", 1, "1"),
    ],
)
def test_steps_accept_strings_and_integers(request, app: str, value: Any, expected: str) -> None:
    model = request.getfixturevalue(app)
    assert _dump(model, num_inference_steps=value)["num_inference_steps"] == expected


@pytest.mark.parametrize(
    ("app", "value"),
    [
        ("hyper", "8"),
        ("hyper", 8),
        ("hyper", "3"),
        ("lightning", "3"),
        ("lightning", True),
        ("lightning", 4.0),
        ("lightning", "04"),
    ],
)
def test_steps_outside_the_enum_are_refused(request, app: str, value: Any) -> None:
    model = request.getfixturevalue(app)
    with pytest.raises(ValidationError) as info:
        model.model_validate({**REQUIRED, "num_inference_steps": value})
    assert all(err["loc"][0] == "num_inference_steps" for err in info.value.errors())


@pytest.mark.parametrize(
    ("value", "dumped"),
    [
        ("landscape_16_9", "landscape_16_9"),
        ({"width": 64, "height": 48}, {"width": 64, "height": 48}),
        ({"width": 640}, {"width": 640, "height": 512}),
    ],
)
def test_image_size_is_a_preset_or_an_object(lightning, value: Any, dumped: Any) -> None:
    assert _dump(lightning, image_size=value)["image_size"] == dumped


@pytest.mark.parametrize(
    "fields",
    [
        {"image_size": "huge"},
        {"image_size": {"width": 0, "height": 64}},
        {"image_size": {"width": 64, "height": 14143}},
        {"strength": 0},
        {"strength": 1.01},
        {"num_images": 0},
        {"num_images": 9},
        {"format": "webp"},
        {"safety_checker_version": "v3"},
        {"seed": 2**63},
        {"embeddings": [{"tokens": ["<a>"]}]},
    ],
)
def test_out_of_range_values_are_refused(lightning, fields: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        lightning.model_validate({**REQUIRED, **fields})


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_required_fields(hyper, missing: str) -> None:
    body = {k: v for k, v in REQUIRED.items() if k != missing}
    with pytest.raises(ValidationError) as info:
        hyper.model_validate(body)
    assert [(err["loc"], err["type"]) for err in info.value.errors()] == [((missing,), "missing")]


def test_family_specific_fields_and_unknown_fields(hyper, lightning) -> None:
    assert "safety_checker_version" not in _dump(hyper, safety_checker_version="v2")  # ignored, like any unknown
    assert _dump(lightning, safety_checker_version="v2")["safety_checker_version"] == "v2"
    assert "negative_prompt" not in _dump(lightning, negative_prompt="blurry")
    embedding = _dump(hyper, embeddings=[{"path": "https://example.com/e.safetensors"}])["embeddings"]
    assert embedding == [{"path": "https://example.com/e.safetensors", "tokens": ["<s0>", "<s1>"]}]
