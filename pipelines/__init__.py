"""The GPU engine: loading, few-step SDXL inpainting, batching. Knows nothing of HTTP."""

from .errors import (
    ConfigError,
    EngineError,
    InputError,
    ModelFileError,
    NonFiniteOutputError,
    RequestCancelled,
)
from .types import Embedding, InpaintRequest, InpaintResult

__all__ = [
    "ConfigError",
    "Embedding",
    "EngineError",
    "InpaintRequest",
    "InpaintResult",
    "InputError",
    "ModelFileError",
    "NonFiniteOutputError",
    "RequestCancelled",
]
