"""Fetching a request's inputs: data URIs, this server's own file URLs, and http(s) URLs.

Fetching happens after the request is acknowledged and before the job reaches the GPU, off the
GPU lane; every fetch is capped in bytes and time. A failure names the input field.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from .files import FileStore
from .jobs import Job
from .schemas import image_size_of
from .sources import SourceError, read_data_uri


class InputFetchError(ValueError):
    """An input could not be fetched or decoded; ``field`` names it as in the request."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message


class InputFetcher:
    def __init__(self, files: FileStore, max_bytes: int, timeout_s: float) -> None:
        self.files = files
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self._client: httpx.AsyncClient | None = None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                follow_redirects=True, timeout=httpx.Timeout(self.timeout_s), max_redirects=5
            )
        return self._client

    async def fetch(self, source: str, field: str) -> bytes:
        """The bytes behind ``source``; raises :class:`InputFetchError` naming ``field``."""
        if not isinstance(source, str) or not source:
            raise InputFetchError(field, "must be a non-empty URL or data URI")
        if source.startswith("data:"):
            # A data URI's length bounds its payload: base64 is 4/3 of the bytes.
            if len(source) > self.max_bytes * 4 // 3 + 1024:
                raise InputFetchError(field, f"data URI is larger than {self.max_bytes} bytes")
            try:
                return read_data_uri(source)
            except SourceError as exc:
                raise InputFetchError(field, str(exc)) from None
        parts = urlsplit(source)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputFetchError(field, "must be an http(s) URL or a data URI")
        local = self.files.local_file(parts.path)
        if local is not None:
            return await asyncio.to_thread(_read_capped, local, self.max_bytes, field)
        return await self._download(source, field)

    async def _download(self, url: str, field: str) -> bytes:
        try:
            async with asyncio.timeout(self.timeout_s):
                async with self._http().stream("GET", url) as response:
                    if response.status_code >= 400:
                        raise InputFetchError(field, f"fetching the URL gave HTTP {response.status_code}")
                    declared = response.headers.get("content-length")
                    if declared and declared.isdigit() and int(declared) > self.max_bytes:
                        raise InputFetchError(field, f"the file is larger than {self.max_bytes} bytes")
                    chunks, size = [], 0
                    async for chunk in response.aiter_bytes():
                        size += len(chunk)
                        if size > self.max_bytes:
                            raise InputFetchError(field, f"the file is larger than {self.max_bytes} bytes")
                        chunks.append(chunk)
                    return b"".join(chunks)
        except TimeoutError:
            raise InputFetchError(field, f"fetching the URL took longer than {self.timeout_s:g} s") from None
        except httpx.HTTPError as exc:
            raise InputFetchError(field, f"could not fetch the URL ({type(exc).__name__})") from None


def _read_capped(path: Path, max_bytes: int, field: str) -> bytes:
    if path.stat().st_size > max_bytes:
        raise InputFetchError(field, f"the file is larger than {max_bytes} bytes")
    return path.read_bytes()


def slim_input(job: Job) -> None:
    """Drop inline file data (data URIs, possibly MBs) from a job's in-memory input once it is decoded.

    The store keeps the full input (written once at submit), which is what a re-run after a restart reads.
    """
    data = dict(job.input)
    for key in ("image_url", "mask_url"):
        value = data.get(key)
        if isinstance(value, str) and value.startswith("data:"):
            data[key] = f"<data URI, {len(value)} characters>"
    embeddings = data.get("embeddings") or []
    data["embeddings"] = [
        {**e, "path": f"<data URI, {len(e['path'])} characters>"}
        if isinstance(e, dict) and isinstance(e.get("path"), str) and e["path"].startswith("data:")
        else e
        for e in embeddings
    ]
    job.input = data


def image_size_of_json(value: Any) -> tuple[int, int]:
    """``image_size`` as stored (a preset name or ``{"width", "height"}``) -> (width, height)."""
    if isinstance(value, dict):
        return int(value["width"]), int(value["height"])
    return image_size_of(value)
