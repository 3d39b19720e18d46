"""Textual inversion for one request: validate, load into both text encoders, unload after.

Accepted files (safetensors only): ``clip_l`` + ``clip_g`` (diffusers pivotal tuning), or
``text_encoders_0`` + ``text_encoders_1`` (cog-sdxl), each ``[n_vectors, hidden]``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from .errors import InputError
from .types import Embedding

ENCODER_1_KEYS = ("clip_l", "text_encoders_0", "text_encoder")
ENCODER_2_KEYS = ("clip_g", "text_encoders_1", "text_encoder_2")
FIELD = "embeddings"


@dataclass
class ParsedEmbedding:
    vectors_1: torch.Tensor
    vectors_2: torch.Tensor
    tokens: list[str]

    @property
    def all_tokens(self) -> list[str]:
        """Tokens as they end up in the vocabulary (one token with n vectors becomes tok, tok_1, ...)."""
        n = self.vectors_1.shape[0]
        if len(self.tokens) == 1 and n > 1:
            return [self.tokens[0]] + [f"{self.tokens[0]}_{i}" for i in range(1, n)]
        return list(self.tokens)


def _pick(tensors: dict[str, torch.Tensor], keys: tuple[str, ...], which: str) -> torch.Tensor:
    found = [k for k in keys if k in tensors]
    if len(found) != 1:
        raise InputError(FIELD, f"expected exactly one of {', '.join(keys)} for the {which} text encoder")
    return tensors[found[0]]


def parse_embedding(embedding: Embedding, hidden_1: int, hidden_2: int) -> ParsedEmbedding:
    """Check an embedding file against the text encoders' widths, before anything is loaded."""
    try:
        tensors = load_safetensors(embedding.data)
    except (SafetensorError, ValueError, RuntimeError, OSError) as exc:
        raise InputError(FIELD, f"{embedding.name} is not a safetensors file ({exc})") from exc
    unknown = sorted(set(tensors) - set(ENCODER_1_KEYS) - set(ENCODER_2_KEYS))
    if unknown:
        raise InputError(
            FIELD, f"{embedding.name} has unknown keys {unknown}; expected clip_l/clip_g or text_encoders_0/1"
        )
    v1 = _pick(tensors, ENCODER_1_KEYS, "first")
    v2 = _pick(tensors, ENCODER_2_KEYS, "second")
    for vec, hidden, name in ((v1, hidden_1, "first"), (v2, hidden_2, "second")):
        if vec.ndim != 2 or vec.shape[1] != hidden or vec.shape[0] == 0:
            raise InputError(
                FIELD, f"{embedding.name}: {name} encoder vectors must be [n, {hidden}], got {list(vec.shape)}"
            )
        if not torch.isfinite(vec.float()).all():
            raise InputError(FIELD, f"{embedding.name}: vectors contain NaN or infinite values")
    if v1.shape[0] != v2.shape[0]:
        raise InputError(FIELD, f"{embedding.name}: {v1.shape[0]} vs {v2.shape[0]} vectors for the two encoders")
    tokens = list(embedding.tokens)
    if not tokens or any(not isinstance(t, str) or not t.strip() for t in tokens) or len(set(tokens)) != len(tokens):
        raise InputError(FIELD, "tokens must be distinct, non-empty strings")
    if len(tokens) != 1 and len(tokens) != v1.shape[0]:
        raise InputError(FIELD, f"{len(tokens)} tokens given for {v1.shape[0]} vectors")
    return ParsedEmbedding(vectors_1=v1, vectors_2=v2, tokens=tokens)


def check_tokens_free(parsed: ParsedEmbedding, tokenizers) -> None:
    for tokenizer in tokenizers:
        vocab = tokenizer.get_vocab()
        taken = [t for t in parsed.all_tokens if t in vocab]
        if taken:
            raise InputError(FIELD, f"token {taken[0]!r} already exists in the vocabulary; choose other tokens")


@contextmanager
def _weights_editable() -> Iterator[None]:
    """Inference mode off (grad still off) while an encoder's embedding table is replaced.

    The engine runs under ``torch.inference_mode()``; weights made there would be inference tensors,
    which diffusers' load/unload cannot edit (``weight.data = ...`` needs a version counter). Tensors
    made here are ordinary ones, and later inference-mode calls read them as usual. diffusers builds
    the new embedding tables as trainable ``nn.Embedding``s: the caller freezes them again.
    """
    with torch.inference_mode(False), torch.no_grad():
        yield


@contextmanager
def textual_inversion(pipe, parsed: ParsedEmbedding | None) -> Iterator[None]:
    """Load ``parsed`` into both encoders for the duration of the block; always unload, even on error."""
    if parsed is None:
        yield
        return
    check_tokens_free(parsed, (pipe.tokenizer, pipe.tokenizer_2))
    pairs = (
        (parsed.vectors_1, pipe.text_encoder, pipe.tokenizer),
        (parsed.vectors_2, pipe.text_encoder_2, pipe.tokenizer_2),
    )
    loaded = []
    try:
        for vectors, encoder, tokenizer in pairs:
            try:
                with _weights_editable():
                    pipe.load_textual_inversion(
                        vectors.to(encoder.dtype), token=parsed.tokens, text_encoder=encoder, tokenizer=tokenizer
                    )
            except ValueError as exc:
                encoder.requires_grad_(False)
                raise InputError(FIELD, str(exc).splitlines()[0]) from exc
            encoder.requires_grad_(False)
            loaded.append((encoder, tokenizer))
        yield
    finally:
        for encoder, tokenizer in reversed(loaded):
            with _weights_editable():
                pipe.unload_textual_inversion(tokens=parsed.all_tokens, text_encoder=encoder, tokenizer=tokenizer)
            encoder.requires_grad_(False)
            encoder.config.vocab_size = encoder.get_input_embeddings().num_embeddings  # diffusers leaves it grown
