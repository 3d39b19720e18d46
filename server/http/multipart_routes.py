"""Multipart uploads, the two flows the fal clients use for large files, on one set of part routes.

* JS (``@fal-ai/client``, Blobs over 90 MB): ``POST /storage/upload/initiate-multipart`` (API key; body
  ``{content_type, file_name}``) returns ``upload_url`` and ``file_url``; then ``PUT {upload_url}/{n}`` per 10 MB
  part, answered ``{"partNumber", "etag"}``, and ``POST {upload_url}/complete`` with ``{"parts": [...]}``.
* Python (``fal_client.upload*``, over 100 MiB): ``POST /files/upload/multipart`` (upload token from
  ``/storage/auth/token``; ``Content-Type``, ``X-Fal-File-Name``) returns ``access_url`` and ``uploadId``; then
  ``PUT {access_url}/multipart/{uploadId}/{n}``, whose ``ETag`` header it reads, and ``POST .../complete``.

Both land on ``/uploads/<token>/<name>/multipart/<upload id>/...``: the part and complete routes need no key,
like the single PUT (the JS client sends none); the upload id in their path is the secret, which the file's
own URL does not reveal. Parts may come in any order, more than once (the last try counts) and to any API node;
each is spooled to disk (a bucket gets it as a part of its own multipart upload) and never held in memory.
The upload, all parts together, is capped at ``upload_max_bytes``: the part that passes it is refused with 413
and the whole upload is discarded. Completing needs parts 1..N, each with the etag its PUT answered.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse

from ..delivery.file_store import StoredPart
from ..disk_space import is_disk_full
from ..jobs.store.base import UploadRow
from .errors import BadRequest, NotFound, PayloadTooLarge
from .openapi_responses import FILES_UPLOAD, UPLOAD_INITIATE
from .upload_routes import (
    Uploads,
    UploadTokens,
    bearer_owner,
    content_type_of,
    file_url,
    initiate_name,
    json_object,
)

MAX_PARTS = 10_000  # S3's limit, and more than any client's upload_max_bytes needs at 10 MB a part
PART_ROUTE = "/uploads/{token}/{name}/multipart/{upload_id}"


def add_multipart_routes(
    router: APIRouter,
    uploads: Uploads,
    tokens: UploadTokens,
    owner_of: Callable[..., str],
    base_url_of: Callable[[Request], str],
) -> None:
    files, store = uploads.files, uploads.store

    @router.post("/storage/upload/initiate-multipart", responses=UPLOAD_INITIATE)
    async def initiate_multipart(request: Request, owner: str = Depends(owner_of)) -> dict[str, str]:
        body = await json_object(request)
        content_type = content_type_of(body.get("content_type"))
        row = await uploads.reserve(request, owner, initiate_name(body, content_type), content_type, multipart=True)
        url = file_url(base_url_of(request), row)
        return {"upload_url": f"{url}/multipart/{row.multipart_id}", "file_url": url}

    @router.post("/files/upload/multipart", responses=FILES_UPLOAD)
    async def files_upload_multipart(request: Request) -> dict[str, str]:
        owner = bearer_owner(request, tokens, uploads.clock())
        content_type = content_type_of(request.headers.get("content-type"))
        name = request.headers.get("x-fal-file-name") or "upload"
        row = await uploads.reserve(request, owner, name, content_type, multipart=True)
        return {"access_url": file_url(base_url_of(request), row), "uploadId": str(row.multipart_id)}

    def unfinished(token: str, name: str, upload_id: str) -> UploadRow:
        row = _multipart_row(uploads, token, name, upload_id)
        if row.size is not None:
            raise BadRequest("this upload is already complete" if row.size >= 0 else "this upload is being completed")
        return row

    async def discard(row: UploadRow) -> None:
        await asyncio.to_thread(files.drop_parts, row.token, str(row.parts_ref))
        store.delete_uploads([row.token])

    @router.put(PART_ROUTE + "/{part}", include_in_schema=False)
    async def put_part(token: str, name: str, upload_id: str, part: str, request: Request) -> JSONResponse:
        number = _part_number(part)
        row = unfinished(token, name, upload_id)
        uploads.check_disk()
        ref = str(row.parts_ref)
        stored = await asyncio.to_thread(files.list_parts, token, ref)
        room = uploads.max_bytes - sum(p.size for n, p in stored.items() if n != number)
        try:
            spool = await asyncio.to_thread(files.spool_part, token, ref, number)
            size, etag = await uploads.receive(request, token, spool, room, "")
        except FileNotFoundError:
            raise NotFound("no such upload") from None
        except OSError as exc:  # no room for the part's spool file
            if not is_disk_full(exc):
                raise
            raise uploads.no_space(token, exc) from None
        except PayloadTooLarge:
            await discard(row)
            raise PayloadTooLarge(
                f"uploads are limited to {uploads.max_bytes} bytes; this part takes the upload past that, so it "
                "was discarded",
                headers={"Connection": "close"},
            ) from None
        return JSONResponse({"partNumber": number, "etag": etag, "size": size}, headers={"ETag": f'"{etag}"'})

    @router.post(PART_ROUTE + "/complete", include_in_schema=False)
    async def complete(token: str, name: str, upload_id: str, request: Request) -> dict[str, Any]:
        row = _multipart_row(uploads, token, name, upload_id)
        url = file_url(base_url_of(request), row)
        if row.size is not None and row.size >= 0:  # completed before (a retried complete): the same answer
            return {"access_url": url, "file_url": url, "size": row.size}
        listed = _listed_parts(await _json(request))
        if not store.claim_upload(token):
            raise BadRequest("this upload is being completed")
        try:
            stored = await asyncio.to_thread(files.list_parts, token, str(row.parts_ref))
            parts = _matching(listed, stored)
            total = sum(stored[n].size for n, _ in parts)
            if total > uploads.max_bytes:
                await discard(row)
                raise PayloadTooLarge(f"uploads are limited to {uploads.max_bytes} bytes; this one was discarded")
            await asyncio.to_thread(files.join_parts, token, str(row.parts_ref), parts)
        except ValueError as exc:
            store.release_upload(token)
            raise BadRequest(str(exc)) from None
        except BaseException:
            store.release_upload(token)  # fix the parts and complete again
            raise
        await uploads.stored(row, total)
        return {"access_url": url, "file_url": url, "size": total}


def _multipart_row(uploads: Uploads, token: str, name: str, upload_id: str) -> UploadRow:
    row = uploads.live(token, name)
    if row.multipart_id is None or not secrets.compare_digest(row.multipart_id.encode(), upload_id.encode()):
        raise NotFound("no such upload")
    return row


def _part_number(text: str) -> int:
    number = int(text) if text.isdigit() and len(text) <= 6 else 0
    if not 1 <= number <= MAX_PARTS:
        raise BadRequest(f"part numbers go from 1 to {MAX_PARTS}, not {text[:20]!r}")
    return number


async def _json(request: Request) -> Any:
    try:
        return await request.json()
    except ValueError:
        raise BadRequest('expected a JSON body {"parts": [{"partNumber": 1, "etag": "..."}, ...]}') from None


def _listed_parts(body: Any) -> dict[int, str]:
    """The parts a complete names, by number: their etags (quotes and a weak ``W/`` dropped)."""
    parts = body.get("parts") if isinstance(body, dict) else None
    if not isinstance(parts, list) or not parts or len(parts) > MAX_PARTS:
        raise BadRequest(f'expected {{"parts": [{{"partNumber": n, "etag": "..."}}, ...]}} with 1 to {MAX_PARTS} parts')
    listed: dict[int, str] = {}
    for item in parts:
        number = item.get("partNumber") if isinstance(item, dict) else None
        etag = item.get("etag") if isinstance(item, dict) else None
        if isinstance(number, bool) or not isinstance(number, int) or not isinstance(etag, str):
            raise BadRequest(f"each part needs an integer partNumber and a string etag, not {str(item)[:80]}")
        if not 1 <= number <= MAX_PARTS:
            raise BadRequest(f"part numbers go from 1 to {MAX_PARTS}, not {number}")
        if number in listed:
            raise BadRequest(f"part {number} is listed twice")
        listed[number] = etag.removeprefix("W/").strip('"').lower()
    return listed


def _matching(listed: dict[int, str], stored: dict[int, StoredPart]) -> list[tuple[int, str]]:
    """The listed parts as ``(number, etag)`` in order, if they are exactly parts 1..N as stored; 400 otherwise."""
    gaps = sorted(set(range(1, max(listed) + 1)) - set(listed))
    if gaps:
        raise BadRequest(f"parts must be numbered 1 to {max(listed)} without gaps; missing: {_some(gaps)}")
    missing = [n for n in sorted(listed) if n not in stored]
    if missing:
        raise BadRequest(f"these parts were never uploaded (or did not finish): {_some(missing)}")
    wrong = [n for n in sorted(listed) if stored[n].etag.lower() != listed[n]]
    if wrong:
        raise BadRequest(f"these parts' etags are not the ones their upload answered: {_some(wrong)}")
    return [(n, stored[n].etag) for n in sorted(listed)]


def _some(numbers: list[int]) -> str:
    shown = ", ".join(str(n) for n in numbers[:10])
    return shown + (f" and {len(numbers) - 10} more" if len(numbers) > 10 else "")
