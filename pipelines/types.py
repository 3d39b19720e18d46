"""The seam between the server and the engine: plain dataclasses, no pydantic, no HTTP."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from PIL import Image

    from .errors import EngineError

OutputFormat = Literal["jpeg", "png"]


@dataclass
class Embedding:
    """A textual-inversion file (safetensors bytes) and the tokens it defines in the prompt."""

    data: bytes
    tokens: list[str] = field(default_factory=lambda: ["<s0>", "<s1>"])
    name: str = "embedding"


@dataclass
class InpaintRequest:
    """One validated request. ``image`` and ``mask`` are encoded bytes or PIL images.

    ``image_size`` is ``(width, height)`` or None (keep the input image's own size).
    ``seed`` None means: draw one; the result reports it.
    ``max_image_pixels`` bounds each decoded input (None: ``pipelines.images.MAX_IMAGE_PIXELS``).
    """

    app_id: str
    image: bytes | Image.Image
    mask: bytes | Image.Image
    prompt: str
    steps: int | None = None
    strength: float | None = None
    seed: int | None = None
    num_images: int = 1
    image_size: tuple[int, int] | None = None
    embeddings: list[Embedding] = field(default_factory=list)
    enable_safety_checker: bool = True
    expand_prompt: bool = False
    request_id: str = ""
    max_image_pixels: int | None = None
    # Step previews: ``on_progress`` gets a 4th argument for this request, a ``pipelines.previews.StepPreview``.
    previews: bool = False


@dataclass
class InpaintResult:
    """What the engine returns for one request: images, or ``error`` when that request failed."""

    request_id: str
    images: list[Image.Image] = field(default_factory=list)
    has_nsfw_concepts: list[bool] = field(default_factory=list)
    seed: int = 0
    prompt: str = ""
    timings: dict[str, float] = field(default_factory=dict)
    error: EngineError | None = None
    # Things the user should know that did not stop the request (a truncated prompt...).
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None
