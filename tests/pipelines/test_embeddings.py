"""Textual inversion per request: it changes the image, and leaves tokenizers and encoders exactly as before."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from safetensors.torch import save

from pipelines.embeddings import ParsedEmbedding, textual_inversion
from pipelines.errors import InputError
from pipelines.types import Embedding, InpaintRequest
from tests.helpers import box_mask, noise_image, png

APP = "fal-ai/fast-lightning-sdxl/inpainting"
SIZE = (64, 48)


@pytest.fixture(scope="module")
def pipe(engine):
    return engine.pipeline(engine.variants[(APP, 4)])


@pytest.fixture(scope="module")
def widths(pipe) -> tuple[int, int]:
    return pipe.text_encoder.config.hidden_size, pipe.text_encoder_2.config.hidden_size


def vectors(widths, n: int = 2, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, widths[0], generator=g) * 5, torch.randn(n, widths[1], generator=g) * 5


def clip_file(widths) -> bytes:
    v1, v2 = vectors(widths)
    return save({"clip_l": v1, "clip_g": v2})


def cog_file(widths) -> bytes:
    v1, v2 = vectors(widths, seed=1)
    return save({"text_encoders_0": v1, "text_encoders_1": v2})


def request(embeddings=(), prompt: str = "a photo of <s0> <s1>", **kw) -> InpaintRequest:
    fields = dict(
        app_id=APP,
        image=png(noise_image(64, 48, seed=3)),
        mask=png(box_mask(64, 48)),
        prompt=prompt,
        steps=4,
        seed=7,
        image_size=SIZE,
        embeddings=list(embeddings),
    )
    fields.update(kw)
    return InpaintRequest(**fields)


def snapshot(pipe) -> dict:
    return {
        "vocab": [dict(t.get_vocab()) for t in (pipe.tokenizer, pipe.tokenizer_2)],
        "len": [len(t) for t in (pipe.tokenizer, pipe.tokenizer_2)],
        "added": [
            {k: (v.content, v.special) for k, v in t.added_tokens_decoder.items()}
            for t in (pipe.tokenizer, pipe.tokenizer_2)
        ],
        "weights": [e.get_input_embeddings().weight.detach().clone() for e in (pipe.text_encoder, pipe.text_encoder_2)],
        "num_embeddings": [e.get_input_embeddings().num_embeddings for e in (pipe.text_encoder, pipe.text_encoder_2)],
    }


def assert_unchanged(pipe, before: dict) -> None:
    after = snapshot(pipe)
    assert after["vocab"] == before["vocab"]
    assert after["len"] == before["len"]
    assert after["added"] == before["added"]
    assert after["num_embeddings"] == before["num_embeddings"]
    for w_after, w_before in zip(after["weights"], before["weights"], strict=True):
        assert w_after.shape == w_before.shape
        assert torch.equal(w_after, w_before)


def assert_serves(engine) -> None:
    (result,) = engine.run([request(prompt="a photo")])
    assert result.error is None
    assert result.images[0].size == SIZE


@pytest.mark.parametrize("maker", [clip_file, cog_file], ids=["clip_l-clip_g", "text_encoders_0-1"])
def test_embedding_changes_the_image_and_leaves_no_trace(engine, pipe, widths, maker):
    before = snapshot(pipe)
    (plain,) = engine.run([request()])
    (with_ti,) = engine.run([request([Embedding(data=maker(widths), tokens=["<s0>", "<s1>"])])])
    assert plain.error is None and with_ti.error is None
    assert with_ti.images[0].size == SIZE
    assert not np.array_equal(np.asarray(plain.images[0]), np.asarray(with_ti.images[0]))
    assert_unchanged(pipe, before)
    # The same embedding again gives the same image (it was fully unloaded, then loaded afresh).
    (again,) = engine.run([request([Embedding(data=maker(widths), tokens=["<s0>", "<s1>"])])])
    assert np.array_equal(np.asarray(again.images[0]), np.asarray(with_ti.images[0]))
    assert_unchanged(pipe, before)
    # R20: a plain request after one with an embedding, same seed, equals the plain run before it.
    (plain_after,) = engine.run([request()])
    assert np.array_equal(np.asarray(plain_after.images[0]), np.asarray(plain.images[0]))


def test_single_token_for_several_vectors(engine, pipe, widths):
    before = snapshot(pipe)
    (result,) = engine.run([request([Embedding(data=clip_file(widths), tokens=["<t>"])], prompt="a <t>")])
    assert result.error is None
    assert_unchanged(pipe, before)


def existing_token(pipe) -> str:
    token = "a</w>"
    assert token in pipe.tokenizer.get_vocab() and token in pipe.tokenizer_2.get_vocab()
    return token


def bad_embeddings(pipe, widths) -> dict[str, list[Embedding]]:
    v1, v2 = vectors(widths)
    pickled = io.BytesIO()
    torch.save({"clip_l": v1, "clip_g": v2}, pickled)
    return {
        "existing-token": [Embedding(data=clip_file(widths), tokens=[existing_token(pipe), "<s1>"])],
        "unknown-keys": [Embedding(data=save({"clip_l": v1, "clip_g": v2, "emb_params": v1.clone()}))],
        "only-unknown-keys": [Embedding(data=save({"emb_params": v1.clone()}))],
        "missing-second": [Embedding(data=save({"clip_l": v1}))],
        "wrong-width-1": [Embedding(data=save({"clip_l": torch.zeros(2, widths[0] + 1), "clip_g": v2}))],
        "wrong-width-2": [Embedding(data=save({"clip_l": v1, "clip_g": torch.zeros(2, widths[1] - 1)}))],
        "vector-count-mismatch": [Embedding(data=save({"clip_l": v1, "clip_g": v2[:1]}))],
        "token-count-mismatch": [Embedding(data=clip_file(widths), tokens=["<a>", "<b>", "<c>"])],
        "duplicate-tokens": [Embedding(data=clip_file(widths), tokens=["<a>", "<a>"])],
        "nan": [Embedding(data=save({"clip_l": v1 * float("nan"), "clip_g": v2}))],
        "pickle": [Embedding(data=pickled.getvalue())],
        "garbage": [Embedding(data=b"not a safetensors file")],
        "empty": [Embedding(data=b"")],
        "two-embeddings": [Embedding(data=clip_file(widths)), Embedding(data=cog_file(widths), tokens=["<x>", "<y>"])],
    }


BAD = [
    "existing-token",
    "unknown-keys",
    "only-unknown-keys",
    "missing-second",
    "wrong-width-1",
    "wrong-width-2",
    "vector-count-mismatch",
    "token-count-mismatch",
    "duplicate-tokens",
    "nan",
    "pickle",
    "garbage",
    "empty",
    "two-embeddings",
]


@pytest.mark.parametrize("kind", BAD)
def test_bad_embedding_is_an_input_error_and_leaves_no_trace(engine, pipe, widths, kind):
    before = snapshot(pipe)
    bad = request(bad_embeddings(pipe, widths)[kind])
    with pytest.raises(InputError) as info:
        engine.prepare(bad)
    assert info.value.field == "embeddings"
    (result,) = engine.run([bad])
    assert isinstance(result.error, InputError)
    assert result.error.field == "embeddings"
    assert result.images == []
    assert_unchanged(pipe, before)
    assert_serves(engine)
    assert_unchanged(pipe, before)


def test_bad_embedding_next_to_a_good_request(engine, pipe, widths):
    before = snapshot(pipe)
    bad = request(bad_embeddings(pipe, widths)["wrong-width-2"])
    good = request(prompt="a photo")
    results = engine.run([bad, good])
    assert isinstance(results[0].error, InputError) and results[0].error.field == "embeddings"
    assert results[1].error is None and len(results[1].images) == 1
    assert_unchanged(pipe, before)


def test_failure_half_way_through_loading_is_rolled_back(pipe, widths):
    """The first encoder takes the vectors, the second refuses them: both must end up as before."""
    before = snapshot(pipe)
    v1, _ = vectors(widths)
    parsed = ParsedEmbedding(vectors_1=v1, vectors_2=torch.zeros(2, widths[1] + 3), tokens=["<s0>", "<s1>"])
    with pytest.raises(InputError) as info, textual_inversion(pipe, parsed):
        pytest.fail("the block must not run")
    assert info.value.field == "embeddings"
    assert_unchanged(pipe, before)


def test_error_inside_the_block_still_unloads(pipe, widths):
    before = snapshot(pipe)
    v1, v2 = vectors(widths)
    parsed = ParsedEmbedding(vectors_1=v1, vectors_2=v2, tokens=["<s0>", "<s1>"])
    with pytest.raises(RuntimeError, match="boom"), textual_inversion(pipe, parsed):
        assert "<s0>" in pipe.tokenizer.get_vocab() and "<s1>" in pipe.tokenizer_2.get_vocab()
        raise RuntimeError("boom")
    assert_unchanged(pipe, before)
