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


def read_data_uri(uri: str) -> bytes:
    """Decode ``data:[<mime>][;base64],<data>``."""
    header, sep, payload = uri.partition(",")
    if not sep:
        raise SourceError("malformed data URI (no comma)")
    if header.endswith(";base64"):
        try:
            return base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SourceError(f"malformed base64 in data URI: {exc}") from exc
    return unquote_to_bytes(payload)


def read_source(source: str, allow_local: bool = True, timeout: float = 30.0) -> bytes:
    """Bytes of a data URI, an http(s) URL or (only when ``allow_local``) a local file."""
    if source.startswith("data:"):
        return read_data_uri(source)
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
