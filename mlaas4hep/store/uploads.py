"""A user's uploaded files below ``uploads/<owner>/`` of the storage, with size limits and quota.

:class:`UserFiles` writes a stream to a hidden temporary file first and renames it into
place only when the whole stream fitted the per-file limit and the user's quota, so a
refused or broken upload leaves nothing behind. Room in the quota is taken atomically
while the bytes arrive (:mod:`mlaas4hep.store.quota`), so concurrent uploads cannot
pass it together.
"""

from __future__ import annotations

import asyncio
import posixpath
import re
import uuid
from collections.abc import AsyncIterable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlaas4hep.store.quota import Quota, QuotaExceeded, Reservation, local_size, tree_size
from mlaas4hep.store.storage import Storage, StorageError, fsync_dir, storage_error

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
    uploads, ``("runs", id, "inputs")`` for a submission's data), at most
    ``max_file_bytes`` per file, counted in the owner's ``quota``."""

    storage: Storage
    root: tuple[str, ...]
    max_file_bytes: int
    quota: Quota

    @property
    def quota_bytes(self) -> int:
        return self.quota.limit

    def _parts(self, path: str) -> tuple[str, ...]:
        """Storage parts of the file ``path`` (checked: an empty path is refused, 400)."""
        return (*self.root, check_upload_path(path))

    def usage(self) -> int:
        """Bytes the owner's quota counts now (uploads, runs, models, predictions)."""
        return self.quota.usage()

    def list(self) -> list[dict[str, Any]]:
        """Every file as ``{"path", "size"}``, sorted by path (hidden ones left out)."""
        base = self.storage.path(*self.root)
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
        """The file's bytes; :class:`UploadError` 404 when there is none, 400 for a folder."""
        parts = self._parts(path)
        try:
            return self.storage.read_bytes(*parts)
        except (FileNotFoundError, NotADirectoryError):
            raise UploadError(404, f"file {path!r} not found") from None
        except IsADirectoryError:
            raise UploadError(400, f"{path!r} is a folder: list it with GET /files") from None

    def delete(self, path: str) -> None:
        """Remove a file or folder; :class:`UploadError` (404) when there is none."""
        if not self.exists(path):
            raise UploadError(404, f"file {path!r} not found")
        self.storage.delete(*self._parts(path))

    def stored(self, path: str) -> int:
        """Bytes the file or folder at ``path`` takes now (0 when there is none)."""
        return tree_size(self.storage, *self._parts(path))

    def room(self, replacing: str | None = None) -> tuple[int, int]:
        """``(bytes used, bytes one more file may take)``: the per-file limit or what is
        left of the quota (the file or folder at ``replacing`` does not count, it is
        overwritten). An estimate for early refusals: writes take room atomically."""
        used = self.usage() - (self.stored(replacing) if replacing else 0)
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

    async def save(
        self,
        path: str,
        chunks: AsyncIterable[bytes] | Iterable[bytes],
        size: int | None = None,
        reservation: Reservation | None = None,
    ) -> int:
        """Write ``chunks`` to ``path`` whole or not at all; return the size written.

        Room is taken in the owner's quota as the bytes arrive (``size``, when announced,
        at once); the room is held by ``reservation`` when given (the caller releases
        it once the file is counted), else by one released when the file is in place.
        """
        clean = check_upload_path(path)
        self._check_free(clean)
        fs = self.storage.fs
        base = self.storage.path(*self.root)
        target = self.storage.path(*self._parts(clean))
        held = reservation or self.quota.reservation(credit=self.stored(clean))
        total = None if size is None else held.used + size
        fs.makedirs(base, exist_ok=True)
        tmp = f"{base}/.upload-{uuid.uuid4().hex}"
        written = 0
        try:
            with fs.open(tmp, "wb") as out:
                async for chunk in _aiter(chunks):
                    if written + len(chunk) > self.max_file_bytes:
                        raise UploadError(413, self._limit_message(clean))
                    await self._take(held, clean, len(chunk), total)
                    written += len(chunk)
                    out.write(chunk)
                self.storage.flush(out)
            fs.makedirs(posixpath.dirname(target), exist_ok=True)
            if reservation is None:  # in place and uncounted in one step
                await asyncio.to_thread(held.commit, lambda: fs.mv(tmp, target))
            else:
                fs.mv(tmp, target)
            if self.storage.is_local:
                fsync_dir(posixpath.dirname(target))
        except BaseException as error:
            held.give_back(written)
            if isinstance(error, OSError) and not isinstance(error, StorageError):
                raise storage_error(error, clean, "upload") from error
            raise
        finally:
            if fs.exists(tmp):
                fs.rm(tmp)
            if reservation is None:
                await asyncio.to_thread(held.release)
            if not fs.ls(base, detail=False):
                fs.rmdir(base)
        return written

    def _check_free(self, path: str) -> None:
        """:class:`UploadError` 409 when a file cannot go at ``path``: it names a folder, or
        one of its folders is a file."""
        if self.storage.isdir(*self._parts(path)):
            raise UploadError(409, f"{path}: is a folder; delete it first or choose another name")
        parts = path.split("/")
        for depth in range(1, len(parts)):
            folder = "/".join(parts[:depth])
            if self.storage.exists(*self.root, folder) and not self.storage.isdir(
                *self.root, folder
            ):
                raise UploadError(409, f"{path}: {folder} is a file, not a folder")

    async def _take(self, held: Reservation, path: str, nbytes: int, total: int | None) -> None:
        """Room for ``nbytes`` more of ``path`` (the ledger asked in a thread, when the
        grant must grow); :class:`UploadError` 413 when the quota has no more."""
        try:
            if held.covers(nbytes):
                held.take(nbytes)
            else:
                await asyncio.to_thread(held.take, nbytes, total)
        except QuotaExceeded as error:
            raise UploadError(413, self._quota_message(path, error.used)) from None

    def put_folder(self, folder: Path, name: str) -> int:
        """Store the local ``folder`` as ``name`` (replacing it), whole or not at all,
        within the quota; return its size."""
        clean = check_upload_path(name)
        size = local_size(folder)
        if size > self.max_file_bytes:
            raise UploadError(413, self._limit_message(clean))
        try:
            with self.quota.holding(size, credit=self.stored(clean)) as held:
                self._replace(folder, clean, held)
        except QuotaExceeded as error:
            raise UploadError(413, self._quota_message(clean, error.used)) from None
        return size

    def _replace(self, folder: Path, path: str, held: Reservation) -> None:
        """Copy ``folder`` beside ``path`` under a hidden name, then swap it in, freeing
        the room ``held`` for it in the same step."""
        staged = f".staging-{path.replace('/', '_')}"
        self.storage.delete(*self.root, staged)

        def swap() -> None:
            self.storage.delete(*self._parts(path))
            self.storage.fs.mv(
                self.storage.path(*self.root, staged),
                self.storage.path(*self._parts(path)),
                recursive=True,
            )

        try:
            self.storage.upload_dir(folder, *self.root, staged)
            held.commit(swap)
        finally:
            self.storage.delete(*self.root, staged)


async def _aiter(chunks: AsyncIterable[bytes] | Iterable[bytes]):
    if isinstance(chunks, AsyncIterable):
        async for chunk in chunks:
            yield chunk
    else:
        for chunk in chunks:
            yield chunk
