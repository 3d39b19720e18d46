"""Where generated images (``/files/...``) and client uploads (``/uploads/...``) live: a directory, or an
S3-compatible bucket (``--files s3://BUCKET/PREFIX``) when several hosts serve one queue.

Every name is chosen by the server (request ids, random tokens, ``<n>.<ext>``) and checked against a strict
pattern before it becomes a path or a key, so no user text ever does. The URLs the server returns are always
its own (``BASE/files/<id>/<name>``): any API node answers them by reading the file store, so they keep
working whichever node a client reaches and across restarts. Files in a bucket are proxied, not redirected
to presigned URLs: a URL then lives exactly as long as its request (the result retention) instead of a
signature's lifetime, the bucket needs no public endpoint, and clients never see the storage behind it.

In a directory, a file is read only if its real path (symlinks resolved) is exactly where the server put
it: a symlink planted there is refused, wherever it points. Writes are atomic (a temporary file renamed
into place) and durable (``fsync``) before the job row that names them is committed.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from starlette.responses import FileResponse, Response, StreamingResponse

_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_PART = re.compile(r"^(\d{5})-([0-9a-f]{32})$")
CHUNK = 256 * 1024


def safe_name(name: str, default: str = "file") -> str:
    """A client-proposed file name reduced to ``[A-Za-z0-9._-]``, no leading dot, at most 100 chars."""
    cleaned = _UNSAFE.sub("_", name).lstrip("._")[:100]
    return cleaned or default


class FilesUnavailable(RuntimeError):
    """The file store cannot be reached (a bucket's endpoint is down): retry soon."""


@dataclass
class FileBody:
    """A stored file to answer with: a local path (sent by the web server) or chunks read from a bucket."""

    size: int
    path: Path | None = None
    chunks: Iterator[bytes] | None = None


@dataclass(frozen=True)
class StoredPart:
    """One stored part of a multipart upload."""

    size: int
    etag: str


@dataclass(frozen=True)
class OwnFile:
    """One of this server's own file URLs: ``files/<request id>/<name>`` or ``uploads/<token>/<name>``."""

    kind: str  # "files" or "uploads"
    ident: str
    name: str


def own_file(url_path: str) -> OwnFile | None:
    """The file behind one of this server's own URL paths (with an optional prefix, such as a reverse-proxy
    path), by its shape alone; None for any other path."""
    parts = [p for p in url_path.split("/") if p]
    if len(parts) < 3:
        return None
    kind, ident, name = parts[-3:]
    if kind in ("files", "uploads") and _ID.match(ident) and _NAME.match(name):
        return OwnFile(kind, ident, name)
    return None


class UploadSpool:
    """An upload (or one part of one) arriving: ``file`` takes its bytes, :meth:`commit` (blocking: call it off the
    event loop) stores them atomically and durably and returns what the store says of them (a part's etag),
    :meth:`close` discards whatever was not committed."""

    def __init__(
        self,
        file: IO[bytes],
        commit: Callable[[IO[bytes]], str | None],
        discard: Callable[[], None] | None = None,
    ) -> None:
        self.file = file
        self._commit = commit
        self._discard = discard
        self._committed = False

    def commit(self) -> str | None:
        result = self._commit(self.file)
        self._committed = True
        return result

    def close(self) -> None:
        if self._committed:
            self.file.close()
            return
        with contextlib.suppress(OSError):  # bytes still buffered for a file that goes anyway (a full disk)
            self.file.close()
        if self._discard is not None:
            self._discard()


class FileStore(ABC):
    """Generated images and uploads, by request id / upload token (see the module)."""

    @abstractmethod
    def write_result(self, request_id: str, name: str, data: bytes) -> None:
        """Store a generated file, durably, before the job row naming it is committed."""

    @abstractmethod
    def open_result(self, request_id: str, name: str) -> FileBody | None:
        """A generated file to serve, or None (bad name, missing)."""

    @abstractmethod
    def delete_results(self, request_id: str) -> None: ...

    @abstractmethod
    def spool_upload(self, token: str) -> UploadSpool:
        """Where an upload's bytes go while they arrive; :meth:`UploadSpool.commit` stores them."""

    @abstractmethod
    def open_upload(self, token: str) -> FileBody | None:
        """A finished upload to serve, or None."""

    @abstractmethod
    def delete_upload(self, token: str, parts_ref: str | None = None) -> None:
        """Delete an upload, and the parts of an unfinished multipart upload (``parts_ref``)."""

    # Multipart uploads: parts arrive (in any order, on any node, each possibly more than once), then are joined.

    @abstractmethod
    def begin_parts(self, token: str) -> str:
        """Get ready for an upload in parts; returns the store's handle on them (kept with the upload's row)."""

    @abstractmethod
    def spool_part(self, token: str, parts_ref: str, number: int) -> UploadSpool:
        """Where part ``number``'s bytes go; its commit stores the part (replacing an earlier try of the same number)
        and returns its etag. ``FileNotFoundError`` if the upload's parts are gone."""

    @abstractmethod
    def list_parts(self, token: str, parts_ref: str) -> dict[int, StoredPart]:
        """The parts stored so far, by number (empty if none or gone)."""

    @abstractmethod
    def join_parts(self, token: str, parts_ref: str, parts: list[tuple[int, str]]) -> None:
        """Make the upload from these ``(number, etag)`` parts in this order, atomically; the parts are then gone.
        ``ValueError`` if the store refuses them (a bucket's minimum part size)."""

    @abstractmethod
    def drop_parts(self, token: str, parts_ref: str) -> None:
        """Forget an unfinished upload's parts."""

    def read_own(self, own: OwnFile, max_bytes: int) -> bytes | None:
        """The bytes of one of this server's own files (an input that is an earlier result or an upload), or
        None if there is no such file; ``ValueError`` past ``max_bytes``."""
        body = self.open_result(own.ident, own.name) if own.kind == "files" else self.open_upload(own.ident)
        if body is None:
            return None
        if body.size > max_bytes:
            raise ValueError(f"the file is larger than {max_bytes} bytes")
        if body.path is not None:
            return body.path.read_bytes()
        return b"".join(body.chunks or ())

    def close(self) -> None:  # noqa: B027 - most stores hold nothing to release
        """Release connections (a bucket's client)."""


class LocalFileStore(FileStore):
    """A directory: ``files/<request id>/<name>`` and ``uploads/<token>``."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.results = root / "files"
        self.uploads = root / "uploads"
        self.results.mkdir(parents=True, exist_ok=True)
        self.uploads.mkdir(parents=True, exist_ok=True)

    def write_result(self, request_id: str, name: str, data: bytes) -> None:
        path = self._result_path(request_id, name)
        if path is None:
            raise ValueError(f"bad result file name {request_id}/{name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(4)}.part")
        try:
            with tmp.open("wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())  # durable before the job row that names it is committed
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)

    def open_result(self, request_id: str, name: str) -> FileBody | None:
        path = self._result_path(request_id, name)
        found = None if path is None else _regular_file(path, self.results, request_id, name)
        return None if found is None else FileBody(size=found.stat().st_size, path=found)

    def delete_results(self, request_id: str) -> None:
        if _ID.match(request_id):
            shutil.rmtree(self.results / request_id, ignore_errors=True)

    def spool_upload(self, token: str) -> UploadSpool:
        path = self._upload_path(token)
        if path is None:
            raise ValueError(f"bad upload token {token!r}")
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(8)}.part")

        def commit(fh: IO[bytes]) -> None:
            fh.flush()
            os.fsync(fh.fileno())
            tmp.replace(path)

        return UploadSpool(tmp.open("w+b"), commit, lambda: tmp.unlink(missing_ok=True))

    def open_upload(self, token: str) -> FileBody | None:
        path = self._upload_path(token)
        found = None if path is None else _regular_file(path, self.uploads, token)
        return None if found is None else FileBody(size=found.stat().st_size, path=found)

    def delete_upload(self, token: str, parts_ref: str | None = None) -> None:
        path = self._upload_path(token)
        if path is not None:
            path.unlink(missing_ok=True)
            shutil.rmtree(self._parts_dir(path), ignore_errors=True)  # parts a late PUT left behind, too

    # Parts live in ``uploads/<token>.parts/<number>-<md5>`` until they are joined into ``uploads/<token>``.

    def begin_parts(self, token: str) -> str:
        path = self._upload_path(token)
        if path is None:
            raise ValueError(f"bad upload token {token!r}")
        self._parts_dir(path).mkdir()
        return ""

    def spool_part(self, token: str, parts_ref: str, number: int) -> UploadSpool:
        parts = self._existing_parts_dir(token)
        tmp = parts / f".{number}.{secrets.token_hex(8)}.tmp"

        def commit(fh: IO[bytes]) -> str:
            fh.flush()
            os.fsync(fh.fileno())
            fh.seek(0)
            etag = hashlib.file_digest(fh, lambda: hashlib.md5(usedforsecurity=False)).hexdigest()
            final = parts / f"{number:05d}-{etag}"
            tmp.replace(final)
            for older in parts.glob(f"{number:05d}-*"):  # an earlier try of this part with other bytes
                if older != final:
                    older.unlink(missing_ok=True)
            return etag

        return UploadSpool(tmp.open("w+b"), commit, lambda: tmp.unlink(missing_ok=True))

    def list_parts(self, token: str, parts_ref: str) -> dict[int, StoredPart]:
        try:
            parts = self._existing_parts_dir(token)
            entries = list(os.scandir(parts))
        except FileNotFoundError:
            return {}
        found: dict[int, StoredPart] = {}
        for entry in entries:
            match = _PART.match(entry.name)
            if match and entry.is_file(follow_symlinks=False):
                with contextlib.suppress(FileNotFoundError):  # replaced by another try meanwhile
                    found[int(match[1])] = StoredPart(entry.stat().st_size, match[2])
        return found

    def join_parts(self, token: str, parts_ref: str, parts: list[tuple[int, str]]) -> None:
        path = self._upload_path(token)
        if path is None:
            raise ValueError(f"bad upload token {token!r}")
        folder = self._existing_parts_dir(token)
        tmp = path.with_name(f"{path.name}.{secrets.token_hex(8)}.part")
        try:
            with tmp.open("wb") as out:
                for number, etag in parts:
                    with (folder / f"{number:05d}-{etag}").open("rb") as part:
                        shutil.copyfileobj(part, out, CHUNK * 4)
                out.flush()
                os.fsync(out.fileno())
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        shutil.rmtree(folder, ignore_errors=True)

    def drop_parts(self, token: str, parts_ref: str) -> None:
        path = self._upload_path(token)
        if path is not None:
            shutil.rmtree(self._parts_dir(path), ignore_errors=True)

    def _parts_dir(self, upload_path: Path) -> Path:
        return upload_path.with_name(f"{upload_path.name}.parts")

    def _existing_parts_dir(self, token: str) -> Path:
        """The upload's parts folder: a real folder, not a symlink; ``FileNotFoundError`` if it is gone."""
        path = self._upload_path(token)
        folder = None if path is None else self._parts_dir(path)
        if folder is None or folder.is_symlink() or not folder.is_dir():
            raise FileNotFoundError(f"no parts for upload {token!r}")
        return folder

    def _result_path(self, request_id: str, name: str) -> Path | None:
        if not (_ID.match(request_id) and _NAME.match(name)):
            return None
        return self.results / request_id / name

    def _upload_path(self, token: str) -> Path | None:
        return self.uploads / token if _ID.match(token) else None


class S3FileStore(FileStore):
    """An S3-compatible bucket (AWS S3, MinIO, Ceph, R2...) through boto3: keys ``PREFIX/files/<id>/<name>`` and
    ``PREFIX/uploads/<token>``. The endpoint, region and credentials come from boto3's usual sources
    (``AWS_ENDPOINT_URL``, ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_REGION``, ``~/.aws``). With a
    custom endpoint, path-style addressing is used (what S3-compatible servers expect)."""

    def __init__(self, url: str, spool_dir: Path, client: Any = None) -> None:
        bucket, _, prefix = url.removeprefix("s3://").partition("/")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.spool_dir = spool_dir
        spool_dir.mkdir(parents=True, exist_ok=True)
        self._client = client or _s3_client()
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors = (BotoCoreError, ClientError)
        self._client_error = ClientError

    def _key(self, *parts: str) -> str:
        return "/".join(p for p in (self.prefix, *parts) if p)

    def write_result(self, request_id: str, name: str, data: bytes) -> None:
        if not (_ID.match(request_id) and _NAME.match(name)):
            raise ValueError(f"bad result file name {request_id}/{name}")
        with self._link():
            self._client.put_object(Bucket=self.bucket, Key=self._key("files", request_id, name), Body=data)

    def open_result(self, request_id: str, name: str) -> FileBody | None:
        if not (_ID.match(request_id) and _NAME.match(name)):
            return None
        return self._get(self._key("files", request_id, name))

    def delete_results(self, request_id: str) -> None:
        if not _ID.match(request_id):
            return
        with self._link():
            listed = self._client.list_objects_v2(Bucket=self.bucket, Prefix=self._key("files", request_id) + "/")
            keys = [{"Key": item["Key"]} for item in listed.get("Contents", [])]
            if keys:
                self._client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})

    def spool_upload(self, token: str) -> UploadSpool:
        if not _ID.match(token):
            raise ValueError(f"bad upload token {token!r}")

        def commit(fh: IO[bytes]) -> None:
            fh.seek(0)
            with self._link():
                self._client.upload_fileobj(fh, self.bucket, self._key("uploads", token))

        return UploadSpool(tempfile.TemporaryFile(dir=self.spool_dir), commit)

    def open_upload(self, token: str) -> FileBody | None:
        return self._get(self._key("uploads", token)) if _ID.match(token) else None

    def delete_upload(self, token: str, parts_ref: str | None = None) -> None:
        if _ID.match(token):
            with self._link():
                self._client.delete_object(Bucket=self.bucket, Key=self._key("uploads", token))
            if parts_ref:
                self.drop_parts(token, parts_ref)

    # Multipart uploads use the bucket's own multipart API: each part goes to the bucket as it arrives (spooled to
    # a local temporary file first), any node can take any part, and completing joins them in the bucket.

    def begin_parts(self, token: str) -> str:
        if not _ID.match(token):
            raise ValueError(f"bad upload token {token!r}")
        with self._link():
            answer = self._client.create_multipart_upload(Bucket=self.bucket, Key=self._key("uploads", token))
        return str(answer["UploadId"])

    def spool_part(self, token: str, parts_ref: str, number: int) -> UploadSpool:
        if not _ID.match(token):
            raise ValueError(f"bad upload token {token!r}")

        def commit(fh: IO[bytes]) -> str:
            fh.seek(0)
            try:
                with self._link():
                    answer = self._client.upload_part(
                        Bucket=self.bucket,
                        Key=self._key("uploads", token),
                        PartNumber=number,
                        UploadId=parts_ref,
                        Body=fh,
                    )
            except FilesUnavailable as exc:
                if _code(exc.__cause__) == "NoSuchUpload":
                    raise FileNotFoundError(f"no parts for upload {token!r}") from None
                raise
            return str(answer["ETag"]).strip('"')

        return UploadSpool(tempfile.TemporaryFile(dir=self.spool_dir), commit)

    def list_parts(self, token: str, parts_ref: str) -> dict[int, StoredPart]:
        found: dict[int, StoredPart] = {}
        try:
            with self._link():
                pages = self._client.get_paginator("list_parts").paginate(
                    Bucket=self.bucket, Key=self._key("uploads", token), UploadId=parts_ref
                )
                for page in pages:
                    for part in page.get("Parts", []):
                        found[int(part["PartNumber"])] = StoredPart(int(part["Size"]), str(part["ETag"]).strip('"'))
        except FilesUnavailable as exc:
            if _code(exc.__cause__) == "NoSuchUpload":
                return {}
            raise
        return found

    def join_parts(self, token: str, parts_ref: str, parts: list[tuple[int, str]]) -> None:
        listed = [{"PartNumber": number, "ETag": f'"{etag}"'} for number, etag in parts]
        try:
            with self._link():
                self._client.complete_multipart_upload(
                    Bucket=self.bucket,
                    Key=self._key("uploads", token),
                    UploadId=parts_ref,
                    MultipartUpload={"Parts": listed},
                )
        except FilesUnavailable as exc:
            code = _code(exc.__cause__)
            if code == "EntityTooSmall":
                raise ValueError("every part but the last must be at least 5 MiB (the bucket's minimum)") from None
            if code in ("InvalidPart", "InvalidPartOrder", "NoSuchUpload"):
                raise ValueError(f"the bucket refused the parts ({code})") from None
            raise

    def drop_parts(self, token: str, parts_ref: str) -> None:
        try:
            with self._link():
                self._client.abort_multipart_upload(
                    Bucket=self.bucket, Key=self._key("uploads", token), UploadId=parts_ref
                )
        except FilesUnavailable as exc:
            if _code(exc.__cause__) != "NoSuchUpload":
                raise

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._client.close()

    def _get(self, key: str) -> FileBody | None:
        try:
            with self._link():
                answer = self._client.get_object(Bucket=self.bucket, Key=key)
        except FilesUnavailable as exc:
            if isinstance(exc.__cause__, self._client_error) and _missing(exc.__cause__):
                return None
            raise
        body = answer["Body"]
        return FileBody(size=int(answer["ContentLength"]), chunks=_chunks(body))

    @contextlib.contextmanager
    def _link(self) -> Iterator[None]:
        try:
            yield
        except self._errors as exc:
            raise FilesUnavailable(f"the file store s3://{self.bucket} failed: {exc}") from exc


def _missing(exc: Any) -> bool:
    return _code(exc) in ("NoSuchKey", "404", "NotFound")


def _code(exc: Any) -> str:
    """A botocore ClientError's error code ("" for anything else)."""
    response = getattr(exc, "response", None)
    return str(response.get("Error", {}).get("Code", "")) if isinstance(response, dict) else ""


def _chunks(body: Any) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(CHUNK)
    finally:
        body.close()


def _s3_client() -> Any:
    try:
        import boto3
        from botocore.config import Config
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError("--files s3://... needs boto3: pip install 'inpaint-server[s3]'") from exc
    custom = bool(os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL"))
    config = Config(
        s3={"addressing_style": "path" if custom else "auto"},
        retries={"mode": "standard", "max_attempts": 3},
        connect_timeout=5,
        read_timeout=30,
    )
    return boto3.client("s3", config=config)


def file_response(body: FileBody, media_type: str, headers: dict[str, str]) -> Response:
    """The HTTP answer for a stored file: sent from disk, or streamed through from a bucket."""
    if body.path is not None:
        return FileResponse(body.path, media_type=media_type, headers=headers)
    return StreamingResponse(
        body.chunks or iter(()), media_type=media_type, headers={**headers, "Content-Length": str(body.size)}
    )


def open_files(spec: str | None, data_dir: Path) -> FileStore:
    """The file store a ``--files`` value names: None (``DATA_DIR``), a directory, or ``s3://BUCKET/PREFIX``."""
    if spec and spec.startswith("s3://"):
        return S3FileStore(spec, data_dir / "spool")
    return LocalFileStore(Path(spec).expanduser() if spec else data_dir)


def _regular_file(path: Path, root: Path, *parts: str) -> Path | None:
    """``path`` resolved, if it is a regular file at exactly ``root/parts`` (no symlink below ``root``)."""
    try:
        resolved = path.resolve(strict=True)
        expected = root.resolve(strict=True).joinpath(*parts)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        return None
    return resolved if resolved == expected and resolved.is_file() else None
