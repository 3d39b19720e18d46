"""pipelines/prompt_cache.py: cached text embeddings equal fresh ones, and only missing prompts are encoded."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from pipelines.prompt_cache import PromptCache

APP = "fal-ai/fast-lightning-sdxl/inpainting"


class CountingEncoder:
    """Wraps a real pipeline's encode_prompts and records each call's prompts."""

    def __init__(self, pipe: Any) -> None:
        self.pipe = pipe
        self.calls: list[list[str]] = []

    def __call__(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        self.calls.append(list(prompts))
        return self.pipe.encode_prompts(prompts)


@pytest.fixture
def encoder(engine: Any) -> CountingEncoder:
    return CountingEncoder(engine.pipeline(engine.variants[(APP, 4)]))


@torch.no_grad()
def test_cached_embeddings_equal_fresh_ones_row_for_row(encoder: CountingEncoder) -> None:
    cache = PromptCache(capacity=8)
    batch = ["a red door", "a blue car", "a red door", ""]
    embeds, pooled = cache.encode("base", batch, encoder)
    fresh_embeds, fresh_pooled = encoder.pipe.encode_prompts(batch)
    torch.testing.assert_close(embeds, fresh_embeds, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled, fresh_pooled, rtol=1e-5, atol=1e-6)
    assert encoder.calls == [["a red door", "a blue car", ""]]  # each distinct prompt once
    assert (cache.hits, cache.misses) == (1, 3)

    again, again_pooled = cache.encode("base", ["a blue car", "a green boat"], encoder)
    assert encoder.calls[-1] == ["a green boat"]  # only the new one
    torch.testing.assert_close(again[0], fresh_embeds[1])
    torch.testing.assert_close(again_pooled[0], fresh_pooled[1])


@torch.no_grad()
def test_keys_separate_text_encoders_and_the_lru_evicts_the_oldest(encoder: CountingEncoder) -> None:
    cache = PromptCache(capacity=2)
    cache.encode("base-a", ["one"], encoder)
    cache.encode("base-b", ["one"], encoder)  # same text, other encoders: encoded again
    assert encoder.calls == [["one"], ["one"]]
    cache.encode("base-a", ["one"], encoder)  # a hit, and now the most recent
    cache.encode("base-a", ["two"], encoder)  # evicts ("base-b", "one"), the least recently used
    assert len(cache) == 2
    cache.encode("base-a", ["one"], encoder)
    assert encoder.calls[-1] == ["two"]
    cache.encode("base-b", ["one"], encoder)
    assert encoder.calls[-1] == ["one"]


@torch.no_grad()
def test_entries_do_not_keep_the_batch_tensor_alive(encoder: CountingEncoder) -> None:
    cache = PromptCache(capacity=4)
    cache.encode("base", ["a", "b", "c"], encoder)
    for embeds, pooled in cache._entries.values():
        assert embeds.untyped_storage().nbytes() == embeds.numel() * embeds.element_size()
        assert pooled.untyped_storage().nbytes() == pooled.numel() * pooled.element_size()


def test_capacity_zero_turns_caching_off(encoder: CountingEncoder) -> None:
    cache = PromptCache(capacity=0)
    cache.encode("base", ["x"], encoder)
    cache.encode("base", ["x"], encoder)
    assert len(encoder.calls) == 2 and len(cache) == 0
    with pytest.raises(ValueError):
        PromptCache(capacity=-1)


def test_the_engine_caches_embeddings_without_autograd_graphs(engine: Any) -> None:
    """Issue 10 §1: an embedding the engine's prompt cache keeps holds no autograd graph (no grad_fn),
    and no module the engine loaded has a parameter that requires grad."""
    from pipelines.types import InpaintRequest
    from tests.helpers import box_mask, noise_image

    engine.prompt_cache.clear()
    request = InpaintRequest(
        app_id=APP,
        image=noise_image(),
        mask=box_mask(),
        prompt="a cached prompt",
        steps=4,
        image_size=(64, 48),
        enable_safety_checker=False,
    )
    assert engine.run([request])[0].error is None
    assert len(engine.prompt_cache) == 1
    for tensor in next(iter(engine.prompt_cache._entries.values())):
        assert tensor.grad_fn is None and not tensor.requires_grad

    modules = {id(m): m for m in engine.store._cache.values() if isinstance(m, torch.nn.Module)}
    for pipe in (engine.pipeline(v) for v in engine.variants.values()):
        modules.update({id(m): m for m in pipe.components.values() if isinstance(m, torch.nn.Module)})
    modules[id(engine.safety_checker.model)] = engine.safety_checker.model
    modules[id(engine.expander.model)] = engine.expander.model
    trainable = [type(m).__name__ for m in modules.values() if any(p.requires_grad for p in m.parameters())]
    assert len(modules) > 5 and trainable == []
