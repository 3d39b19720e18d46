"""Files on disk: generated images (``/files/...``) and client uploads (``/uploads/...``).

Every served name is chosen by the server (request ids, random tokens, ``<n>.<ext>``) and checked
against a strict pattern before it touches the file system, so no user text becomes a path. A file
is read only if its real path (symlinks resolved) is exactly where the server put it: a symlink
planted under the data directory is refused, wherever it points.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

_ID = re.compile(r"^[A-Za-z0-9_-]{8,64}$")
_NAME = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$")
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def safe_name(name: str, default: str = "file") -> str:
    """A client-proposed file name reduced to ``[A-Za-z0-9._-]``, no leading dot, at most 100 chars."""
    cleaned = _UNSAFE.sub("_", name).lstrip("._")[:100]
    return cleaned or default


class FileStore:
    def __init__(self, data_dir: Path) -> None:
        self.results = data_dir / "files"
        self.uploads = data_dir / "uploads"
        self.results.mkdir(parents=True, exist_ok=True)
        self.uploads.mkdir(parents=True, exist_ok=True)

    # ------------------------------------------------------------------ generated images

    def result_path(self, request_id: str, name: str) -> Path | None:
        if not (_ID.match(request_id) and _NAME.match(name)):
            return None
        return self.results / request_id / name

    def served_result(self, request_id: str, name: str) -> Path | None:
        """The generated file behind ``/files/<request_id>/<name>``, or None (bad name, missing, symlinked)."""
        path = self.result_path(request_id, name)
        return None if path is None else _regular_file(path, self.results, request_id, name)

    def write_result(self, request_id: str, name: str, data: bytes) -> Path:
        path = self.result_path(request_id, name)
        if path is None:
            raise ValueError(f"bad result file name {request_id}/{name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(path.suffix + ".part")
        with tmp.open("wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())  # durable before the job row that names it is committed
        tmp.replace(path)
        return path

    def delete_results(self, request_id: str) -> None:
        if _ID.match(request_id):
            shutil.rmtree(self.results / request_id, ignore_errors=True)

    # ------------------------------------------------------------------ uploads

    def upload_path(self, token: str) -> Path | None:
        if not _ID.match(token):
            return None
        return self.uploads / token

    def served_upload(self, token: str) -> Path | None:
        """The uploaded file behind ``/uploads/<token>/...``, or None (bad token, missing, symlinked)."""
        path = self.upload_path(token)
        return None if path is None else _regular_file(path, self.uploads, token)

    def delete_upload(self, token: str) -> None:
        path = self.upload_path(token)
        if path is not None:
            path.unlink(missing_ok=True)

    def local_file(self, url_path: str) -> Path | None:
        """The local file behind one of this server's own URL paths, or None.

        ``/files/<request id>/<name>`` and ``/uploads/<token>/<name>`` (with an optional prefix such as
        a reverse-proxy path) are read from disk instead of fetched over the network.
        """
        parts = [p for p in url_path.split("/") if p]
        if len(parts) < 3:
            return None
        kind, ident, name = parts[-3:]
        if kind == "files":
            return self.served_result(ident, name)
        if kind == "uploads" and _NAME.match(name):
            return self.served_upload(ident)
        return None


def _regular_file(path: Path, root: Path, *parts: str) -> Path | None:
    """``path`` resolved, if it is a regular file at exactly ``root/parts`` (no symlink below ``root``)."""
    try:
        resolved = path.resolve(strict=True)
        expected = root.resolve(strict=True).joinpath(*parts)
    except (OSError, RuntimeError):  # missing, or a symlink loop
        return None
    return resolved if resolved == expected and resolved.is_file() else None
