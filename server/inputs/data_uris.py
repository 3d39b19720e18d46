"""Reading user-named inputs for the CLI: a local path, an http(s) URL or a data URI."""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from urllib.parse import unquote_to_bytes

import httpx

MAX_BYTES = 64 * 1024 * 1024


class SourceError(ValueError):
    """An input could not be read; the message says which and why."""


class DataUriTooLarge(SourceError):
    """A data URI holds more than the byte limit (found from its length, before decoding)."""


def data_uri_min_bytes(uri: str) -> int:
    """A lower bound of the bytes a data URI decodes to, from its length alone (exact for valid base64)."""
    comma = uri.find(",")
    if comma < 0:
        return 0
    size = len(uri) - comma - 1
    if uri[:comma].endswith(";base64"):
        return size // 4 * 3 - (2 if uri.endswith("==") else 1 if uri.endswith("=") else 0)
    return size // 3  # percent-encoding: at most three characters per byte


def read_data_uri(uri: str, max_bytes: int | None = None) -> bytes:
    """Decode ``data:[<mime>][;base64],<data>``; with ``max_bytes``, refuse a larger one before decoding it."""
    if max_bytes is not None and data_uri_min_bytes(uri) > max_bytes:
        raise DataUriTooLarge(f"data URI is larger than {max_bytes} bytes")
    header, sep, payload = uri.partition(",")
    if not sep:
        raise SourceError("malformed data URI (no comma)")
    if header.endswith(";base64"):
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SourceError(f"malformed base64 in data URI: {exc}") from exc
    else:
        data = unquote_to_bytes(payload)
    if max_bytes is not None and len(data) > max_bytes:
        raise DataUriTooLarge(f"data URI is larger than {max_bytes} bytes")
    return data


def read_source(source: str, allow_local: bool = True, timeout: float = 30.0) -> bytes:
    """Bytes of a data URI, an http(s) URL or (only when ``allow_local``) a local file."""
    if source.startswith("data:"):
        return read_data_uri(source, MAX_BYTES)
    if source.startswith(("http://", "https://")):
        try:
            with httpx.stream("GET", source, timeout=timeout, follow_redirects=True) as response:
                response.raise_for_status()
                chunks, size = [], 0
                for chunk in response.iter_bytes():
                    size += len(chunk)
                    if size > MAX_BYTES:
                        raise SourceError(f"{source}: larger than {MAX_BYTES} bytes")
                    chunks.append(chunk)
                return b"".join(chunks)
        except httpx.HTTPError as exc:
            raise SourceError(f"{source}: {exc}") from exc
    if not allow_local:
        raise SourceError("only http(s) URLs and data URIs are accepted")
    path = Path(source).expanduser()
    try:
        return path.read_bytes()
    except OSError as exc:
        raise SourceError(f"{source}: {exc.strerror or exc}") from exc
