"""The engine's error hierarchy. The server maps ``error_type`` to HTTP status in one place."""

from __future__ import annotations


class EngineError(Exception):
    """Base of every error the engine raises on purpose."""

    error_type = "engine_error"


class ConfigError(EngineError):
    """A config file or an override is wrong; fix the configuration and restart."""

    error_type = "config_error"


class ModelFileError(EngineError):
    """A model file is missing (not cached and cannot be fetched) or is not a valid checkpoint."""

    error_type = "model_file_error"


class InputError(EngineError, ValueError):
    """A request field is invalid. ``field`` names it the way the fal schema does."""

    error_type = "invalid_input"

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class NonFiniteOutputError(EngineError):
    """The VAE decode produced NaN/inf values, even when decoded again in fp32."""

    error_type = "nan_output"


class RequestCancelled(EngineError):
    """``should_stop`` asked the engine to stop this request between two denoising steps."""

    error_type = "cancelled"


class GpuOutOfMemory(EngineError):
    """The request did not fit in GPU memory even alone and with VAE tiling (its batch-mates still ran)."""

    error_type = "gpu_oom"


class GpuFatalError(EngineError):
    """The CUDA context is broken (illegal memory access, device-side assert...); only a new process helps."""

    error_type = "cuda_fatal"
