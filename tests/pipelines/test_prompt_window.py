"""A long prompt is tokenized only as far as CLIP reads it (issue 13, item 21): a 10 MB prompt took seconds of
tokenizing and gigabytes of memory, for the 75 tokens CLIP uses."""

from __future__ import annotations

from typing import Any

import pytest

from pipelines.inpaint import FIRST_WINDOW_CHARS, prompt_window
from pipelines.types import InpaintRequest
from tests.helpers import box_mask, noise_image, png

LIMIT = 77  # CLIP's model_max_length, start and end tokens included


class RecordingTokenizer:
    """A real tokenizer that records the length of every text it is given."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.model_max_length = tokenizer.model_max_length
        self.lengths: list[int] = []

    def __call__(self, text: str, **kwargs: Any) -> Any:
        self.lengths.append(len(text))
        return self.tokenizer(text, **kwargs)


@pytest.fixture(scope="module")
def tokenizer(engine) -> Any:
    return engine.pipeline(next(iter(engine.variants.values()))).tokenizer


def clip_ids(tokenizer: Any, text: str) -> list[int]:
    """The token ids CLIP reads for ``text`` (what ``encode_prompt`` gives the text encoder)."""
    return tokenizer(text, truncation=True, max_length=LIMIT, padding="max_length").input_ids


def whole_prompt_ignored(tokenizer: Any, prompt: str) -> str | None:
    """The ignored part as computed from the whole prompt's tokens (the way it was done before)."""
    encoded = tokenizer(prompt, truncation=False, return_offsets_mapping=True)
    return prompt[encoded.offset_mapping[LIMIT - 1][0] :].strip() if len(encoded.input_ids) > LIMIT else None


WORDS = " ".join(f"red door {i}" for i in range(2000))
PROMPTS = {
    "words": WORDS[:9999],
    "punctuation": ", ".join(f"a{i};b!c?(d)" for i in range(1500))[:9999],
    "newlines-tabs-unicode": "\n".join(f"باب\tأحمر 🚪 door-{i}" for i in range(800))[:9999],
    "long-words": " ".join("x" * 300 for _ in range(30)),  # few tokens per window, still bounded
    "no-spaces": "ab" * 4000,  # no word boundary: tokenized whole (at most max_prompt_chars on the server)
    "spaces-first": " " * 3000 + WORDS[:4000],  # whitespace CLIP collapses: the window grows
    "short": "a red door",
}


@pytest.mark.parametrize("name", list(PROMPTS))
def test_the_window_reads_and_ignores_what_the_whole_prompt_would(tokenizer: Any, name: str) -> None:
    prompt = PROMPTS[name]
    recorder = RecordingTokenizer(tokenizer)
    window = prompt_window(recorder, prompt)
    assert prompt.startswith(window.read)
    assert clip_ids(tokenizer, window.read) == clip_ids(tokenizer, prompt)  # the same 77 tokens for the encoder
    assert window.ignored == whole_prompt_ignored(tokenizer, prompt)
    if name in ("words", "punctuation", "newlines-tabs-unicode"):
        assert recorder.lengths == [len(window.read)] and len(window.read) <= FIRST_WINDOW_CHARS, recorder.lengths
    if name == "short":
        assert window.read == prompt and recorder.lengths == [len(prompt)]
    assert max(recorder.lengths) <= len(prompt)


def test_the_engine_encodes_a_bounded_prefix_of_a_long_prompt(engine) -> None:
    """Through ``prepare``: what the text encoders get is the window, not the 10,000 characters."""
    prompt = " ".join(f"blue window {i}" for i in range(2000))[:10_000]  # not in the prompt cache yet
    request = InpaintRequest(
        app_id="fal-ai/fast-lightning-sdxl/inpainting",
        image=png(noise_image(64, 48, seed=1)),
        mask=png(box_mask(64, 48)),
        prompt=prompt,
        steps=2,
        seed=3,
        image_size=(64, 48),
        request_id="long",
    )
    prepared = engine.prepare(request)
    assert prepared.read is not None and len(prepared.read) <= FIRST_WINDOW_CHARS
    assert prepared.cut is not None and prompt.endswith(prepared.cut) and len(prepared.cut) > 9000
    calls: list[list[str]] = []
    pipe = engine.pipeline(prepared.variant)
    original = pipe.encode_prompts
    pipe.encode_prompts = lambda texts: calls.append(texts) or original(texts)
    try:
        (result,) = engine.run([prepared])
    finally:
        del pipe.encode_prompts
    assert result.error is None and result.prompt == prompt  # the whole prompt is what the result reports
    assert calls and all(len(text) <= FIRST_WINDOW_CHARS for texts in calls for text in texts), calls


def test_a_prompt_that_fills_clips_window_is_not_expanded(engine) -> None:
    """``expand_prompt`` with a prompt longer than CLIP reads: the addition would be ignored, and the expansion
    model's own context (GPT-2: 1024 tokens) overflowed (IndexError, the whole batch failed)."""
    prompt = " ".join(f"green gate {i}" for i in range(2000))[:10_000]
    request = InpaintRequest(
        app_id="fal-ai/fast-lightning-sdxl/inpainting",
        image=png(noise_image(64, 48, seed=1)),
        mask=png(box_mask(64, 48)),
        prompt=prompt,
        steps=2,
        seed=3,
        image_size=(64, 48),
        expand_prompt=True,
        request_id="expand-long",
    )
    (result,) = engine.run([request])
    assert result.error is None and result.prompt == prompt
    assert any("not expanded" in warning for warning in result.warnings), result.warnings
