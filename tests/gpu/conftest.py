"""Shared by the CUDA tests: an engine on the GPU with the tiny models, without the checker or the expander."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


@pytest.fixture
def cuda_engine_for(spec: Any, resolver: Any) -> Callable[..., Any]:
    """``cuda_engine_for(variants, speed=None)``: a fresh engine on ``cuda`` for those variants."""
    from pipelines.engine import Engine

    def load(variants: list[tuple[str, int]], speed: Any = None) -> Engine:
        return Engine.load(
            spec,
            device="cuda",
            resolver=resolver,
            variants=variants,
            safety_checker=False,
            prompt_expansion=False,
            speed=speed,
        )

    return load
