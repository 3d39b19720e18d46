"""fal's input and output schemas for the inpainting apps, built from the app specs in ``configs/``.

Field names, defaults and enums follow fal's published types: ``num_inference_steps`` is a string
enum (``"1"``, ``"2"``...) and an integer is accepted too; ``image_size`` is a preset name or
``{width, height}``. Unknown fields are ignored, as fal does.

What the model cannot take is refused here, with a 422 naming the field, before anything is stored: numbers that
are not finite (JSON's ``NaN``, ``Infinity``), text with an unpaired UTF-16 surrogate (``"\\ud800"``: no tokenizer or
encoder takes it), and a prompt longer than the server's ``max_prompt_chars``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, create_model

from pipelines.specs import AppSpec

from ..inputs.image_sizes import MAX_SIDE, PRESETS
from .errors import UNPAIRED_SURROGATE

ImageSizePreset = Literal["square_hd", "square", "portrait_4_3", "portrait_16_9", "landscape_4_3", "landscape_16_9"]
assert set(ImageSizePreset.__args__) == set(PRESETS)  # type: ignore[attr-defined]


DEFAULT_MAX_PROMPT_CHARS = 10_000
MAX_EMBEDDING_TOKENS = 75  # a prompt holds at most 75 tokens (CLIP's 77 less start and end)
MAX_TOKEN_CHARS = 100


def _whole_unicode(value: Any) -> Any:
    """Refuse text with an unpaired UTF-16 surrogate: JSON lets ``"\\ud800"`` through, but no tokenizer (nor UTF-8
    encoder) can take it. (Checked before pydantic's own check, whose message does not say what is wrong.)"""
    if not isinstance(value, str) or value.isascii():  # isascii: a data URI of megabytes in microseconds
        return value
    found = UNPAIRED_SURROGATE.search(value)
    if found is not None:
        raise ValueError(
            f"contains an unpaired UTF-16 surrogate (U+{ord(found.group()):04X}) at character {found.start()}; "
            "send valid Unicode text"
        )
    return value


Text = Annotated[str, BeforeValidator(_whole_unicode)]


class _Strict(BaseModel):
    """Numbers must be finite: JSON's NaN and Infinity (which Python's parser accepts) are a 422."""

    model_config = ConfigDict(allow_inf_nan=False)


class ImageSize(_Strict):
    width: int = Field(512, gt=0, le=MAX_SIDE, description="The width of the generated image.")
    height: int = Field(512, gt=0, le=MAX_SIDE, description="The height of the generated image.")


class Embedding(_Strict):
    path: Text = Field(description="URL or data URI of the textual-inversion weights (safetensors).")
    tokens: list[Annotated[Text, Field(min_length=1, max_length=MAX_TOKEN_CHARS)]] = Field(
        default_factory=lambda: ["<s0>", "<s1>"],
        max_length=MAX_EMBEDDING_TOKENS,
        description="The tokens to map the embedding weights to.",
    )


class Image(BaseModel):
    url: str
    content_type: str | None = None
    file_name: str | None = None
    file_size: int | None = None
    width: int | None = None
    height: int | None = None


class Output(BaseModel):
    images: list[Image] = Field(description="The generated image files info.")
    timings: dict[str, float]
    seed: int = Field(description="The seed used; the same seed and inputs give the same image.")
    has_nsfw_concepts: list[bool] = Field(description="Whether each generated image was flagged (and blacked out).")
    prompt: str = Field(description="The prompt used (after expansion when expand_prompt is set).")


def _steps_as_string(value: Any) -> Any:
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return value


class _InpaintingBase(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    image_url: Text = Field(description="The URL (or data URI) of the image to inpaint.")
    mask_url: Text = Field(description="The URL (or data URI) of the mask; white (opaque) areas are repainted.")
    prompt: Text = Field(description="The prompt to use for generating the image.")
    image_size: ImageSizePreset | ImageSize = Field(
        "square_hd", description="The size of the generated image: a preset or {width, height}."
    )
    strength: float = Field(
        0.95, gt=0, le=1, description="How much the masked area changes (0 = not at all, 1 = fully)."
    )
    seed: int | None = Field(None, ge=-(2**63), lt=2**63, description="The same seed and inputs give the same image.")
    num_images: int = Field(1, ge=1, le=8, description="The number of images to generate.")
    embeddings: list[Embedding] = Field(default_factory=list, description="Textual-inversion embeddings (at most one).")
    enable_safety_checker: bool = Field(True, description="Black out and flag images the safety checker finds NSFW.")
    expand_prompt: bool = Field(False, description="Enrich the prompt with a prompt-expansion model.")
    format: Literal["jpeg", "png"] = Field("jpeg", description="The format of the generated image.")
    sync_mode: bool = Field(False, description="Return the images inline as data URIs and keep no copy on the server.")


# Fields one family has and the other does not (fal's published types).
_EXTRA_FIELDS: dict[str, dict[str, Any]] = {
    "fast-lightning-sdxl": {
        "safety_checker_version": (
            Literal["v1", "v2"],
            Field("v1", description="Accepted for compatibility; this server runs the v1 (CompVis) checker."),
        ),
        "request_id": (
            Text,
            Field("", description="An id bound to the request; echoed nowhere, accepted for compatibility."),
        ),
    },
}


def input_model(app: AppSpec, max_prompt_chars: int = DEFAULT_MAX_PROMPT_CHARS) -> type[BaseModel]:
    """The pydantic model of one app's input, steps and defaults taken from its spec; a longer prompt than
    ``max_prompt_chars`` is refused."""
    steps = tuple(str(n) for n in app.steps)
    steps_type = Annotated[Literal[steps], BeforeValidator(_steps_as_string)]  # type: ignore[valid-type]
    fields: dict[str, Any] = {
        "prompt": (
            Text,
            Field(
                max_length=max_prompt_chars,
                description=f"The prompt to use for generating the image (at most {max_prompt_chars} characters; "
                "the model reads its first 75 tokens).",
            ),
        ),
        "num_inference_steps": (
            steps_type,
            Field(
                str(app.default_steps), description="The number of inference steps (a string; integers are accepted)."
            ),
        ),
        **_EXTRA_FIELDS.get(app.name, {}),
    }
    name = "".join(part.capitalize() for part in app.name.replace("_", "-").split("-")) + "InpaintingInput"
    return create_model(name, __base__=_InpaintingBase, **fields)


def image_size_of(value: str | ImageSize) -> tuple[int, int]:
    if isinstance(value, str):
        return PRESETS[value]
    return value.width, value.height
