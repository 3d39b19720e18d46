"""Fetching a request's inputs: data URIs, this server's own file URLs, and http(s) URLs.

Fetching happens after the request is acknowledged and before the job reaches the GPU, off the
GPU lane; every fetch is capped in bytes and time. A failure names the input field.

Remote URLs go through :mod:`server.inputs.url_guard` (SSRF guard, pinned connections). Redirects are followed by
hand, at most :data:`MAX_REDIRECTS` times, each hop checked again; a connection reset is retried
:data:`MAX_RETRIES` times with backoff; the whole fetch, redirects and retries included, has one deadline.
Local paths are never read from a request: only this server's own ``/files/...`` and ``/uploads/...``
URLs, which is how uploaded blobs come back in.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..delivery.file_store import FileStore, FilesUnavailable, own_file
from ..http.schemas import image_size_of
from ..jobs.job import Job
from .data_uris import SourceError, read_data_uri
from .url_guard import FetchError, FetchGuard, FetchTimeout, GuardedTransport

log = logging.getLogger("inpaint-server.inputs")

MAX_REDIRECTS = 3
MAX_RETRIES = 2  # after a connection reset or refusal; then the input fails
RETRYABLE = (httpx.ConnectError, httpx.ReadError, httpx.WriteError, httpx.RemoteProtocolError)
IMAGE_FIELDS = ("image_url", "mask_url")
# data: URI types accepted for images (the decoder checks the bytes themselves); no MIME type is fine too.
IMAGE_DATA_TYPES = ("image/", "application/octet-stream")
USER_AGENT = "inpaint-server-fetch"


class InputFetchError(ValueError):
    """An input could not be fetched or decoded; ``field`` names it as in the request.

    ``error_type`` is ``input_fetch_error`` or ``input_fetch_timeout`` (both answered as 422).
    """

    def __init__(self, field: str, message: str, error_type: str = "input_fetch_error") -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.message = message
        self.error_type = error_type


class InputFetcher:
    def __init__(
        self,
        files: FileStore,
        max_bytes: int,
        timeout_s: float,
        guard: FetchGuard | None = None,
        connect_timeout_s: float = 5.0,
        retry_base_s: float = 0.5,
    ) -> None:
        self.files = files
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s
        self.guard = guard or FetchGuard(resolve_timeout_s=connect_timeout_s)
        self.connect_timeout_s = connect_timeout_s
        self.retry_base_s = retry_base_s
        self._client: httpx.AsyncClient | None = None

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(
                transport=GuardedTransport(self.guard),
                follow_redirects=False,
                trust_env=False,
                timeout=httpx.Timeout(self.timeout_s, connect=self.connect_timeout_s),
            )
        return self._client

    def is_remote(self, source: Any) -> bool:
        """True when ``source`` is downloaded over the network (not a data URI, not one of this server's files)."""
        if not isinstance(source, str):
            return False
        try:
            parts = urlsplit(source)
        except ValueError:
            return False
        return parts.scheme in ("http", "https") and own_file(parts.path) is None

    async def fetch(self, source: str, field: str) -> bytes:
        """The bytes behind ``source``; raises :class:`InputFetchError` naming ``field``."""
        if not isinstance(source, str) or not source:
            raise InputFetchError(field, "must be a non-empty URL or data URI")
        if source.startswith("data:"):
            return self._data_uri(source, field)
        try:
            parts = urlsplit(source)
        except ValueError:
            raise InputFetchError(field, "is not a valid URL") from None
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise InputFetchError(field, "must be an http(s) URL or a data URI")
        own = own_file(parts.path)
        if own is not None:  # this server's own result or upload: read from the file store, not fetched
            try:
                data = await asyncio.to_thread(self.files.read_own, own, self.max_bytes)
            except ValueError as exc:
                raise InputFetchError(field, str(exc)) from None
            except FilesUnavailable:
                raise InputFetchError(field, "this server's file store is unavailable; retry shortly") from None
            if data is not None:
                return data
        try:
            async with asyncio.timeout(self.timeout_s):
                return await self._download(source, field)
        except TimeoutError:
            raise InputFetchError(
                field, f"fetching the URL took longer than {self.timeout_s:g} s", "input_fetch_timeout"
            ) from None

    def _data_uri(self, source: str, field: str) -> bytes:
        mime = source[5:].partition(",")[0].split(";")[0].strip().lower()
        if field in IMAGE_FIELDS and mime and not mime.startswith(IMAGE_DATA_TYPES):
            raise InputFetchError(field, f"data URI must hold an image, not {mime[:60]!r}")
        try:
            return read_data_uri(source, self.max_bytes)  # refused by its length before any decoding
        except SourceError as exc:
            raise InputFetchError(field, str(exc)) from None

    async def _download(self, source: str, field: str) -> bytes:
        url: str | httpx.URL = source
        for hop in range(MAX_REDIRECTS + 1):
            try:
                got = await self._get_with_retries(self.guard.check_url(url), field)
            except FetchError as exc:
                error_type = "input_fetch_timeout" if isinstance(exc, FetchTimeout) else "input_fetch_error"
                message = f"redirected to a URL that {exc}" if hop else str(exc)
                raise InputFetchError(field, message, error_type) from None
            if isinstance(got, bytes):
                return got
            url = got
        raise InputFetchError(field, f"the URL redirected more than {MAX_REDIRECTS} times")

    async def _get_with_retries(self, url: httpx.URL, field: str) -> bytes | httpx.URL:
        """One hop; FetchError (refused, unresolvable) passes through for :meth:`_download` to word."""
        for attempt in range(MAX_RETRIES + 1):
            try:
                return await self._get(url, field)
            except RETRYABLE as exc:
                if attempt == MAX_RETRIES:
                    raise InputFetchError(
                        field, f"could not be fetched: the connection failed {attempt + 1} times ({type(exc).__name__})"
                    ) from None
                log.info("fetching %s for %s failed (%s); retrying", url.host, field, type(exc).__name__)
                await asyncio.sleep(self.retry_base_s * 2**attempt)
            except httpx.TimeoutException:
                raise InputFetchError(
                    field, "could not be fetched: the host did not answer in time", "input_fetch_timeout"
                ) from None
            except httpx.HTTPError as exc:
                raise InputFetchError(field, f"could not be fetched ({type(exc).__name__})") from None
        raise AssertionError("unreachable")

    async def _get(self, url: httpx.URL, field: str) -> bytes | httpx.URL:
        """The body, or the redirect target. Raw bytes (no decompression), so the byte cap bounds memory."""
        headers = {"Accept-Encoding": "identity", "User-Agent": USER_AGENT}
        async with self._http().stream("GET", url, headers=headers) as response:
            if response.is_redirect:
                try:
                    return url.join(response.headers["location"])
                except (httpx.InvalidURL, ValueError):
                    raise InputFetchError(field, "the URL redirected to an invalid location") from None
            if not 200 <= response.status_code < 300:
                raise InputFetchError(field, f"fetching the URL gave HTTP {response.status_code}")
            declared = response.headers.get("content-length", "")
            if declared.isdigit() and int(declared) > self.max_bytes:
                raise InputFetchError(field, f"the file is larger than {self.max_bytes} bytes")
            chunks, size = [], 0
            async for chunk in response.aiter_raw():
                size += len(chunk)
                if size > self.max_bytes:
                    raise InputFetchError(field, f"the file is larger than {self.max_bytes} bytes")
                chunks.append(chunk)
            return b"".join(chunks)


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


def batch_key_of(app_id: str, payload: dict[str, Any], job_id: str) -> str:
    """The store's batch key, from the request JSON alone: requests with equal keys may be claimed as one
    batch (same variant, strength and output size; a request with textual inversions runs alone). The engine
    still groups a claimed batch by its exact key (the mask, for one, is only known once decoded)."""
    try:
        width, height = image_size_of_json(payload.get("image_size") or "square_hd")
    except (KeyError, TypeError, ValueError):
        width = height = 0
    key = f"{app_id}|{payload.get('num_inference_steps')}|{payload.get('strength')}|{width}x{height}"
    return f"{key}|solo:{job_id}" if payload.get("embeddings") else key


def rows_of(payload: dict[str, Any]) -> int:
    """The image rows a request adds to a batch (its ``num_images``)."""
    try:
        return max(1, int(payload.get("num_images") or 1))
    except (TypeError, ValueError):
        return 1
