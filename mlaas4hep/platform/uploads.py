"""A user's uploaded files below ``uploads/<owner>/`` of the storage, with size limits and quota.

:class:`UserFiles` writes a stream to a hidden temporary file first and renames it into
place only when the whole stream fitted the per-file limit and the user's quota, so a
refused or broken upload leaves nothing behind.
"""

from __future__ import annotations

import posixpath
import re
import uuid
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass
from typing import Any

from mlaas4hep.platform.storage import Storage

_PART = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.+=@-]{0,127}$")
MAX_DEPTH = 8


class UploadError(ValueError):
    """An upload refused; ``status`` is the HTTP status that fits (400, 404, 413)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


def check_upload_path(path: str) -> str:
    """``path`` as a clean relative POSIX path of plain names; :class:`UploadError` (400) else."""
    parts = [p for p in (path or "").replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        raise UploadError(400, "file path is empty")
    if len(parts) > MAX_DEPTH:
        raise UploadError(400, f"file path {path!r} is deeper than {MAX_DEPTH} folders")
    for part in parts:
        if not _PART.match(part):
            raise UploadError(
                400,
                f"file path {path!r}: {part!r} is not allowed (letters, digits and _.+=@- "
                "only, not starting with a dot or dash)",
            )
    return "/".join(parts)


@dataclass
class UserFiles:
    """Files below the storage folder ``root`` (``("uploads", owner)`` for a user's
    uploads); ``max_file_bytes`` per file, ``quota_bytes`` in total."""

    storage: Storage
    root: tuple[str, ...]
    max_file_bytes: int
    quota_bytes: int

    def _parts(self, path: str = "") -> tuple[str, ...]:
        return (*self.root, *([check_upload_path(path)] if path else []))

    def usage(self) -> int:
        """Bytes the owner's uploads take now."""
        base = self.storage.path(*self._parts())
        if not self.storage.fs.exists(base):
            return 0
        return int(self.storage.fs.du(base, total=True))

    def list(self) -> list[dict[str, Any]]:
        """Every file as ``{"path", "size"}``, sorted by path (hidden ones left out)."""
        base = self.storage.path(*self._parts())
        if not self.storage.fs.exists(base):
            return []
        found = []
        for full, info in self.storage.fs.find(base, detail=True).items():
            rel = posixpath.relpath(full, base)
            if any(p.startswith(".") for p in rel.split("/")):
                continue
            found.append({"path": rel, "size": int(info.get("size") or 0)})
        return sorted(found, key=lambda f: f["path"])

    def exists(self, path: str) -> bool:
        return self.storage.exists(*self._parts(path))

    def read(self, path: str) -> bytes:
        try:
            return self.storage.read_bytes(*self._parts(path))
        except FileNotFoundError:
            raise UploadError(404, f"file {path!r} not found") from None

    def delete(self, path: str) -> None:
        """Remove a file or folder; :class:`UploadError` (404) when there is none."""
        if not self.exists(path):
            raise UploadError(404, f"file {path!r} not found")
        self.storage.delete(*self._parts(path))

    def room(self, replacing: str | None = None) -> tuple[int, int]:
        """``(bytes used, bytes one more file may take)``: the per-file limit or what is
        left of the quota (the file at ``replacing`` does not count, it is overwritten)."""
        used = self.usage()
        if replacing and self.exists(replacing) and not self.storage.isdir(*self._parts(replacing)):
            used -= self.storage.size(*self._parts(replacing))
        return used, max(0, min(self.max_file_bytes, self.quota_bytes - used))

    def check_declared(self, size: int | None, path: str) -> None:
        """Refuse early (413) a file whose announced ``size`` cannot fit."""
        if size is None:
            return
        if size > self.max_file_bytes:
            raise UploadError(413, self._limit_message(path))
        used, room = self.room(path)
        if size > room:
            raise UploadError(413, self._quota_message(path, used))

    def _limit_message(self, path: str) -> str:
        return f"{path}: over the upload limit of {self.max_file_bytes} bytes"

    def _quota_message(self, path: str, used: int) -> str:
        return (
            f"{path}: the upload does not fit your quota of {self.quota_bytes} bytes "
            f"({used} bytes used); delete files first"
        )

    async def save(self, path: str, chunks: AsyncIterable[bytes] | Iterable[bytes]) -> int:
        """Write ``chunks`` to ``path`` whole or not at all; return the size written."""
        clean = check_upload_path(path)
        used, room = self.room(clean)
        fs = self.storage.fs
        base = self.storage.path(*self._parts())
        target = self.storage.path(*self._parts(clean))
        fs.makedirs(base, exist_ok=True)
        tmp = f"{base}/.upload-{uuid.uuid4().hex}"
        written = 0
        try:
            with fs.open(tmp, "wb") as out:
                async for chunk in _aiter(chunks):
                    written += len(chunk)
                    if written > room:
                        if written > self.max_file_bytes:
                            raise UploadError(413, self._limit_message(clean))
                        raise UploadError(413, self._quota_message(clean, used))
                    out.write(chunk)
            fs.makedirs(posixpath.dirname(target), exist_ok=True)
            fs.mv(tmp, target)
        finally:
            if fs.exists(tmp):
                fs.rm(tmp)
            if not fs.ls(base, detail=False):
                fs.rmdir(base)
        return written


async def _aiter(chunks: AsyncIterable[bytes] | Iterable[bytes]):
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk
