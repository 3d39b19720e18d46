"""pipelines.embeddings.parse_embedding: validation of textual-inversion files (no model loaded)."""

from __future__ import annotations

import io

import pytest
import torch
from safetensors.torch import save

from pipelines.embeddings import parse_embedding
from pipelines.errors import InputError
from pipelines.types import Embedding

H1, H2 = 768, 1280


def st_bytes(**tensors: torch.Tensor) -> bytes:
    return save({k: v.contiguous() for k, v in tensors.items()})


def parse(data: bytes, tokens=None):
    embedding = Embedding(data=data) if tokens is None else Embedding(data=data, tokens=tokens)
    return parse_embedding(embedding, H1, H2)


def expect_input_error(data: bytes, tokens=None, match: str | None = None) -> InputError:
    with pytest.raises(InputError, match=match) as info:
        parse(data, tokens)
    assert info.value.field == "embeddings"
    return info.value


@pytest.mark.parametrize(
    ("key_1", "key_2"),
    [("clip_l", "clip_g"), ("text_encoders_0", "text_encoders_1"), ("text_encoder", "text_encoder_2")],
)
def test_accepted_key_pairs(key_1, key_2):
    v1, v2 = torch.randn(2, H1), torch.randn(2, H2)
    parsed = parse(st_bytes(**{key_1: v1, key_2: v2}))
    assert torch.equal(parsed.vectors_1, v1)
    assert torch.equal(parsed.vectors_2, v2)
    assert parsed.tokens == ["<s0>", "<s1>"]
    assert parsed.all_tokens == ["<s0>", "<s1>"]


def test_fp16_vectors_accepted():
    parsed = parse(st_bytes(clip_l=torch.zeros(2, H1, dtype=torch.float16), clip_g=torch.zeros(2, H2)))
    assert parsed.vectors_1.dtype == torch.float16


def test_single_token_with_several_vectors():
    parsed = parse(st_bytes(clip_l=torch.zeros(3, H1), clip_g=torch.zeros(3, H2)), tokens=["<cat>"])
    assert parsed.tokens == ["<cat>"]
    assert parsed.all_tokens == ["<cat>", "<cat>_1", "<cat>_2"]


def test_unknown_key():
    error = expect_input_error(
        st_bytes(clip_l=torch.zeros(2, H1), clip_g=torch.zeros(2, H2), emb_params=torch.zeros(2))
    )
    assert "emb_params" in str(error)


def test_missing_second_encoder():
    expect_input_error(st_bytes(clip_l=torch.zeros(2, H1)))


def test_both_naming_schemes_at_once_is_ambiguous():
    expect_input_error(
        st_bytes(
            clip_l=torch.zeros(2, H1),
            text_encoders_0=torch.zeros(2, H1),
            clip_g=torch.zeros(2, H2),
        )
    )


@pytest.mark.parametrize(
    ("v1", "v2"),
    [
        (torch.zeros(2, H2), torch.zeros(2, H1)),  # swapped
        (torch.zeros(2, 1024), torch.zeros(2, H2)),  # SD2 width
        (torch.zeros(2, H1), torch.zeros(2, 1024)),
        (torch.zeros(H1), torch.zeros(H2)),  # 1-D
        (torch.zeros(1, 2, H1), torch.zeros(1, 2, H2)),  # 3-D
        (torch.zeros(0, H1), torch.zeros(0, H2)),  # no vectors
    ],
    ids=["swapped", "wide-1", "wide-2", "1d", "3d", "empty"],
)
def test_wrong_shape(v1, v2):
    expect_input_error(st_bytes(clip_l=v1, clip_g=v2))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("which", [1, 2])
def test_non_finite(bad, which):
    v1, v2 = torch.zeros(2, H1), torch.zeros(2, H2)
    (v1 if which == 1 else v2)[1, 5] = bad
    expect_input_error(st_bytes(clip_l=v1, clip_g=v2), match="NaN or infinite")


def test_nan_in_fp16():
    v1 = torch.zeros(2, H1, dtype=torch.float16)
    v1[0, 0] = float("nan")
    expect_input_error(st_bytes(clip_l=v1, clip_g=torch.zeros(2, H2, dtype=torch.float16)))


def test_vector_count_mismatch_between_encoders():
    expect_input_error(st_bytes(clip_l=torch.zeros(2, H1), clip_g=torch.zeros(3, H2)))


@pytest.mark.parametrize("tokens", [["<a>", "<b>", "<c>"], ["<a>", "<b>", "<c>", "<d>"]])
def test_token_count_mismatch(tokens):
    expect_input_error(st_bytes(clip_l=torch.zeros(2, H1), clip_g=torch.zeros(2, H2)), tokens=tokens)


@pytest.mark.parametrize("tokens", [["<s0>", "<s0>"], [], ["", "<b>"], ["  ", "<b>"], ["<a>", 3]])
def test_bad_tokens(tokens):
    expect_input_error(st_bytes(clip_l=torch.zeros(2, H1), clip_g=torch.zeros(2, H2)), tokens=tokens)


def test_torch_pickle_is_rejected():
    buf = io.BytesIO()
    torch.save({"clip_l": torch.zeros(2, H1), "clip_g": torch.zeros(2, H2)}, buf)
    error = expect_input_error(buf.getvalue(), match="not a safetensors file")
    assert "embedding" in str(error)


@pytest.mark.parametrize(
    "data",
    [b"", b"\x00" * 8, b"garbage bytes that are not safetensors", (2**60).to_bytes(8, "little") + b"{}"],
    ids=["empty", "zero-header", "text", "huge-header"],
)
def test_garbage_is_rejected(data):
    expect_input_error(data)


def test_truncated_safetensors_is_rejected():
    data = st_bytes(clip_l=torch.zeros(2, H1), clip_g=torch.zeros(2, H2))
    expect_input_error(data[: len(data) - 100])


def test_error_names_the_file():
    with pytest.raises(InputError) as info:
        parse_embedding(Embedding(data=b"nope", name="my-style.safetensors"), H1, H2)
    assert "my-style.safetensors" in str(info.value)
