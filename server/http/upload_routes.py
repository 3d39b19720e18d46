"""Storage emulation, so the fal clients' uploads land on this server.

* JS (``@fal-ai/client`` auto-upload of Blobs): ``POST /storage/upload/initiate`` returns an
  ``upload_url`` on this server with an unguessable token in its path, then ``PUT upload_url`` with
  the bytes (no Authorization, as the client sends none) and the input carries ``file_url``.
* Python (``fal_client.upload*``): ``POST /storage/auth/token`` returns a short-lived signed token,
  then ``POST /files/upload`` with the bytes and ``Authorization: Bearer <token>`` returns
  ``access_url``.

Uploaded files are served at ``GET /uploads/<token>/<name>`` and expire with the result retention. While a disk
is full (:mod:`server.disk_space`), uploads get 507 ``insufficient_storage`` and leave nothing behind.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import logging
import mimetypes
import secrets
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from starlette.requests import ClientDisconnect

from ..delivery.file_store import FileStore, file_response, safe_name
from ..disk_space import DiskSpace, is_disk_full
from ..jobs.store.base import JobStore, StoreUnavailable, UploadRow
from .errors import BadRequest, InsufficientStorage, NotFound, PayloadTooLarge, Unauthorized
from .openapi_responses import FILES_UPLOAD, UPLOAD_INITIATE, UPLOAD_TOKEN

log = logging.getLogger("inpaint-server.uploads")

TOKEN_TTL_S = 3600
# Raster images (inputs) and octet-stream (textual-inversion safetensors). No SVG or HTML: uploads are
# served from this origin, and those could carry script.
ALLOWED_UPLOAD_TYPES = (
    "image/png",
    "image/jpeg",
    "image/webp",
    "image/gif",
    "image/bmp",
    "image/tiff",
    "application/octet-stream",
)
SERVE_HEADERS = {"X-Content-Type-Options": "nosniff", "Content-Security-Policy": "sandbox"}


class UploadTokens:
    """Stateless tokens ``<payload>.<hmac>``: they survive restarts, which the Python client's cache needs."""

    def __init__(self, secret: bytes) -> None:
        self._secret = secret  # shared by every API node (the store keeps it): any node accepts any node's token

    def issue(self, owner: str, now: float) -> tuple[str, float]:
        expires = now + TOKEN_TTL_S
        payload = base64.urlsafe_b64encode(json.dumps({"o": owner, "e": expires}).encode()).decode().rstrip("=")
        return f"{payload}.{self._sign(payload)}", expires

    def owner(self, token: str, now: float) -> str | None:
        """The owner a valid, unexpired token was issued to; None for anything else."""
        payload, _, mac = token.partition(".")
        try:
            if not mac or not hmac.compare_digest(mac.encode(), self._sign(payload).encode()):
                return None
            data = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except (UnicodeEncodeError, ValueError):
            return None
        return data["o"] if data["e"] > now else None

    def _sign(self, payload: str) -> str:
        return hmac.new(self._secret, payload.encode(), hashlib.sha256).hexdigest()


def storage_router(
    store: JobStore,
    files: FileStore,
    tokens: UploadTokens,
    owner_of: Callable[..., str],
    base_url_of: Callable[[Request], str],
    max_bytes: int,
    retention_s: float,
    clock: Callable[[], float],
    disk: DiskSpace | None = None,
) -> APIRouter:
    router = APIRouter(tags=["storage"])

    def check_disk() -> None:
        if disk is not None:
            disk.check()

    def no_space(token: str, exc: OSError) -> InsufficientStorage:
        """A write of an upload found the disk full (what it wrote is gone by now)."""
        if disk is not None:
            disk.failed_files()
        log.error("upload %s... not stored: %s", token[:8], exc)
        return InsufficientStorage("the server's disk is full: the upload was not stored; retry once space is freed")

    def reserve(owner: str, file_name: str, content_type: str) -> UploadRow:
        check_disk()
        now = clock()
        row = UploadRow(
            secrets.token_urlsafe(24), owner, safe_name(file_name), content_type, None, now, now + retention_s
        )
        store.add_upload(row)
        return row

    async def receive_body(request: Request, token: str) -> int:
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > max_bytes:
            raise PayloadTooLarge(f"uploads are limited to {max_bytes} bytes")
        size = 0
        try:
            spool = files.spool_upload(token)
        except OSError as exc:
            if is_disk_full(exc):
                raise no_space(token, exc) from None
            raise
        full: OSError | None = None
        try:
            try:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > max_bytes:
                        raise PayloadTooLarge(f"uploads are limited to {max_bytes} bytes")
                    spool.file.write(chunk)
            except ClientDisconnect:
                raise BadRequest("the client disconnected before the upload finished") from None
            await asyncio.to_thread(spool.commit)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            full = exc
        finally:
            spool.close()  # an upload not committed is removed
        if full is not None:
            raise no_space(token, full) from None
        return size

    async def finish(token: str, size: int) -> None:
        """Record a stored upload's size (it is served from now on); if the store cannot, remove the file."""
        try:
            store.set_upload_size(token, size)
        except StoreUnavailable:
            await asyncio.to_thread(files.delete_upload, token)
            raise

    def release(token: str) -> None:
        try:
            store.release_upload(token)
        except StoreUnavailable as exc:  # the client starts again from initiate (a new URL) anyway
            log.warning("upload %s... not released for another PUT: %s", token[:8], exc)

    def content_type_of(value: object) -> str:
        text = (value if isinstance(value, str) and value else "application/octet-stream").split(";")[0]
        text = text.strip().lower()
        if text not in ALLOWED_UPLOAD_TYPES:
            raise BadRequest(f"uploads must be one of {', '.join(ALLOWED_UPLOAD_TYPES)}, not {text!r}")
        return text

    @router.post("/storage/upload/initiate", responses=UPLOAD_INITIATE)
    async def initiate(request: Request, owner: str = Depends(owner_of)) -> dict[str, str]:
        try:
            body: dict[str, Any] = await request.json()
        except ValueError:
            raise BadRequest("expected a JSON body with content_type and file_name") from None
        if not isinstance(body, dict):
            raise BadRequest("expected a JSON object with content_type and file_name")
        content_type = content_type_of(body.get("content_type"))
        ext = mimetypes.guess_extension(content_type) or ""
        row = reserve(owner, str(body.get("file_name") or f"upload{ext}"), content_type)
        url = f"{base_url_of(request)}/uploads/{row.token}/{row.file_name}"
        return {"upload_url": url, "file_url": url}

    @router.put("/uploads/{token}/{name}", include_in_schema=False)
    async def put_upload(token: str, name: str, request: Request) -> dict[str, Any]:
        row = store.get_upload(token)
        if row is None or name != row.file_name or row.expires_at <= clock():
            raise NotFound("no such upload")
        check_disk()
        if not store.claim_upload(token):  # one PUT per upload URL, even when two race
            raise BadRequest("this upload URL has already been used")
        try:
            size = await receive_body(request, token)
            await finish(token, size)
        except BaseException:
            release(token)  # a failed PUT may be retried
            raise
        return {"file_url": str(request.url), "size": size}

    @router.post("/storage/auth/token", responses=UPLOAD_TOKEN)
    async def auth_token(request: Request, owner: str = Depends(owner_of)) -> dict[str, str]:
        token, expires = tokens.issue(owner, clock())
        return {
            "token": token,
            "token_type": "Bearer",
            "base_url": base_url_of(request),
            "expires_at": dt.datetime.fromtimestamp(expires, dt.UTC).isoformat(),
        }

    @router.post("/files/upload", responses=FILES_UPLOAD)
    async def files_upload(request: Request) -> JSONResponse:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        owner = tokens.owner(token.strip(), clock()) if scheme.lower() == "bearer" else None
        if owner is None:
            raise Unauthorized("missing or expired upload token; get one from POST /storage/auth/token")
        content_type = content_type_of(request.headers.get("content-type"))
        row = reserve(owner, request.headers.get("x-fal-file-name") or "upload", content_type)
        try:
            size = await receive_body(request, row.token)
            await finish(row.token, size)
        except BaseException:
            with contextlib.suppress(StoreUnavailable):  # else it expires unused, like any reservation
                store.delete_uploads([row.token])
            raise
        return JSONResponse({"access_url": f"{base_url_of(request)}/uploads/{row.token}/{row.file_name}"})

    @router.get("/uploads/{token}/{name}", include_in_schema=False)
    async def get_upload(token: str, name: str) -> Response:
        row = store.get_upload(token)
        complete = row is not None and row.size is not None and row.size >= 0
        if not complete or name != row.file_name:
            raise NotFound("no such file")
        if row.expires_at <= clock():
            raise NotFound("no such file (expired)")
        body = await asyncio.to_thread(files.open_upload, token)  # a directory: symlinks resolved, only its own file
        if body is None:
            raise NotFound("no such file")
        return file_response(body, row.content_type, SERVE_HEADERS)

    return router
