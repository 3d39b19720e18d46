"""Storage emulation, so the fal clients' uploads land on this server.

* JS (``@fal-ai/client`` auto-upload of Blobs): ``POST /storage/upload/initiate`` returns an
  ``upload_url`` on this server with an unguessable token in its path, then ``PUT upload_url`` with
  the bytes (no Authorization, as the client sends none) and the input carries ``file_url``.
* Python (``fal_client.upload*``): ``POST /storage/auth/token`` returns a short-lived signed token,
  then ``POST /files/upload`` with the bytes and ``Authorization: Bearer <token>`` returns
  ``access_url``.
* Large files, in parts: :mod:`.multipart_routes`.

Uploaded files are served at ``GET /uploads/<token>/<name>``. They expire the result retention after they
were stored, or sooner when the upload asked for it (``X-Fal-Object-Lifecycle``: :mod:`.lifecycle`). While a
disk is full (:mod:`server.disk_space`), uploads get 507 ``insufficient_storage`` and leave nothing behind.
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

from ..delivery.file_store import FileStore, UploadSpool, file_response, safe_name
from ..disk_space import DiskSpace, is_disk_full
from ..jobs.store.base import JobStore, StoreUnavailable, UploadRow
from .errors import BadRequest, InsufficientStorage, NotFound, PayloadTooLarge, Unauthorized
from .lifecycle import UPLOAD_HEADERS, requested_lifetime, shorter_than_retention
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


class Uploads:
    """What every upload route does: reserve an upload, take its bytes under a cap, mark it stored."""

    def __init__(
        self,
        store: JobStore,
        files: FileStore,
        clock: Callable[[], float],
        max_bytes: int,
        retention_s: float,
        disk: DiskSpace | None = None,
    ) -> None:
        self.store = store
        self.files = files
        self.clock = clock
        self.max_bytes = max_bytes
        self.retention_s = retention_s
        self.disk = disk

    def check_disk(self) -> None:
        """507 while a disk is full (:mod:`server.disk_space`), before anything is written."""
        if self.disk is not None:
            self.disk.check()

    def no_space(self, token: str, exc: OSError) -> InsufficientStorage:
        """A write of an upload found the disk full (what it wrote is gone by now)."""
        if self.disk is not None:
            self.disk.failed_files()
        log.error("upload %s... not stored: %s", token[:8], exc)
        return InsufficientStorage("the server's disk is full: the upload was not stored; retry once space is freed")

    def spool(self, token: str) -> UploadSpool:
        """Where a whole upload's bytes go until committed; 507 when the disk has no room for it."""
        try:
            return self.files.spool_upload(token)
        except OSError as exc:
            if is_disk_full(exc):
                raise self.no_space(token, exc) from None
            raise

    def release(self, token: str) -> None:
        """Let the upload URL take another PUT (the last one failed)."""
        try:
            self.store.release_upload(token)
        except StoreUnavailable as exc:  # the client starts again from initiate (a new URL) anyway
            log.warning("upload %s... not released for another PUT: %s", token[:8], exc)

    async def reserve(
        self, request: Request, owner: str, file_name: str, content_type: str, multipart: bool = False
    ) -> UploadRow:
        """A new upload (in parts when ``multipart``), with the lifecycle the request asks for."""
        self.check_disk()
        lifetime = shorter_than_retention(requested_lifetime(request.headers, UPLOAD_HEADERS), self.retention_s)
        token = secrets.token_urlsafe(24)
        multipart_id = parts_ref = None
        if multipart:
            multipart_id = secrets.token_urlsafe(24)
            parts_ref = await asyncio.to_thread(self.files.begin_parts, token)
        now = self.clock()
        row = UploadRow(
            token,
            owner,
            safe_name(file_name),
            content_type,
            None,
            now,
            now + self.retention_s,
            lifetime,
            multipart_id,
            parts_ref,
        )
        try:
            self.store.add_upload(row)
        except BaseException:
            if parts_ref is not None:  # no row will ever name these parts: forget them now
                with contextlib.suppress(Exception):
                    await asyncio.to_thread(self.files.drop_parts, token, parts_ref)
            raise
        return row

    async def receive(
        self, request: Request, token: str, spool: UploadSpool, room: int, too_large: str
    ) -> tuple[int, str | None]:
        """Stream the body into ``spool`` and commit it: (its size, what the store said of it). ``room`` bytes at
        most (413 with ``too_large`` past it, nothing kept)."""
        declared = request.headers.get("content-length")
        size = 0
        try:
            if declared and declared.isdigit() and int(declared) > room:
                raise PayloadTooLarge(too_large, headers={"Connection": "close"})
            try:
                async for chunk in request.stream():
                    size += len(chunk)
                    if size > room:
                        raise PayloadTooLarge(too_large, headers={"Connection": "close"})
                    spool.file.write(chunk)
            except ClientDisconnect:
                raise BadRequest("the client disconnected before the upload finished") from None
            said = await asyncio.to_thread(spool.commit)
        except OSError as exc:
            if not is_disk_full(exc):
                raise
            full = exc
        else:
            return size, said
        finally:
            spool.close()  # an upload not committed is removed
        raise self.no_space(token, full) from None

    async def stored(self, row: UploadRow, size: int) -> None:
        """The upload's bytes are stored: it is served from now on, until its lifetime ends. If the store cannot
        record it, its file is removed (the client sees the error and uploads again)."""
        lifetime = row.lifetime_s if row.lifetime_s is not None else self.retention_s
        try:
            self.store.set_upload_size(row.token, size, self.clock() + lifetime)
        except StoreUnavailable:
            await asyncio.to_thread(self.files.delete_upload, row.token)
            raise

    def live(self, token: str, name: str) -> UploadRow:
        """The unexpired upload ``token`` named ``name``; 404 for anything else."""
        row = self.store.get_upload(token)
        if row is None or name != row.file_name or row.expires_at <= self.clock():
            raise NotFound("no such upload")
        return row

    def limit_message(self) -> str:
        return f"uploads are limited to {self.max_bytes} bytes"


def content_type_of(value: object) -> str:
    """An upload's content type, if uploads accept it; 400 otherwise."""
    text = (value if isinstance(value, str) and value else "application/octet-stream").split(";")[0]
    text = text.strip().lower()
    if text not in ALLOWED_UPLOAD_TYPES:
        raise BadRequest(f"uploads must be one of {', '.join(ALLOWED_UPLOAD_TYPES)}, not {text!r}")
    return text


async def json_object(request: Request) -> dict[str, Any]:
    """An initiate request's JSON body (``content_type``, ``file_name``)."""
    try:
        body = await request.json()
    except ValueError:
        raise BadRequest("expected a JSON body with content_type and file_name") from None
    if not isinstance(body, dict):
        raise BadRequest("expected a JSON object with content_type and file_name")
    return body


def initiate_name(body: dict[str, Any], content_type: str) -> str:
    ext = mimetypes.guess_extension(content_type) or ""
    return str(body.get("file_name") or f"upload{ext}")


def bearer_owner(request: Request, tokens: UploadTokens, now: float) -> str:
    """The owner of the upload token in ``Authorization: Bearer``; 401 without a valid one."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    owner = tokens.owner(token.strip(), now) if scheme.lower() == "bearer" else None
    if owner is None:
        raise Unauthorized("missing or expired upload token; get one from POST /storage/auth/token")
    return owner


def file_url(base_url: str, row: UploadRow) -> str:
    return f"{base_url}/uploads/{row.token}/{row.file_name}"


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
    from .multipart_routes import add_multipart_routes  # it builds on this module's helpers

    router = APIRouter(tags=["storage"])
    uploads = Uploads(store, files, clock, max_bytes, retention_s, disk)

    async def receive_whole(request: Request, row: UploadRow) -> int:
        spool = uploads.spool(row.token)
        size, _ = await uploads.receive(request, row.token, spool, max_bytes, uploads.limit_message())
        return size

    @router.post("/storage/upload/initiate", responses=UPLOAD_INITIATE)
    async def initiate(request: Request, owner: str = Depends(owner_of)) -> dict[str, str]:
        body = await json_object(request)
        content_type = content_type_of(body.get("content_type"))
        row = await uploads.reserve(request, owner, initiate_name(body, content_type), content_type)
        url = file_url(base_url_of(request), row)
        return {"upload_url": url, "file_url": url}

    @router.put("/uploads/{token}/{name}", include_in_schema=False)
    async def put_upload(token: str, name: str, request: Request) -> dict[str, Any]:
        row = uploads.live(token, name)
        if row.multipart_id is not None:
            raise BadRequest("this upload takes its bytes in parts (PUT .../multipart/<id>/<n>)")
        uploads.check_disk()
        if not store.claim_upload(token):  # one PUT per upload URL, even when two race
            raise BadRequest("this upload URL has already been used")
        try:
            size = await receive_whole(request, row)
            await uploads.stored(row, size)
        except BaseException:
            uploads.release(token)  # a failed PUT may be retried
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
        owner = bearer_owner(request, tokens, clock())
        content_type = content_type_of(request.headers.get("content-type"))
        name = request.headers.get("x-fal-file-name") or "upload"
        row = await uploads.reserve(request, owner, name, content_type)
        try:
            await uploads.stored(row, await receive_whole(request, row))
        except BaseException:
            with contextlib.suppress(StoreUnavailable):  # else it expires unused, like any reservation
                store.delete_uploads([row.token])
            raise
        return JSONResponse({"access_url": file_url(base_url_of(request), row)})

    add_multipart_routes(router, uploads, tokens, owner_of, base_url_of)

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
