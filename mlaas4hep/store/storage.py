"""One storage root for runs, models and uploads, on any fsspec filesystem.

Layout under the root (see DESIGN.md)::

    runs/<run_id>/              spec, status.json, specs.json, metrics, plots, log
    models/<name>/<version>/    model bundle
    uploads/<owner>/...         files a user uploaded

Writes are atomic. On a folder, data goes to a temporary name beside the target, is
flushed to disk (``fsync``), then renamed, so a reader never sees half a file and a
crash never leaves an empty one; the temporary file is removed whatever fails. On an
object store (s3, ...) one object is written by one PUT, which is atomic there.

:meth:`Storage.lock` is a lock file created exclusively (``O_CREAT | O_EXCL`` on a
folder, a conditional PUT with ``If-None-Match`` through fsspec's ``mode="create"`` on
an object store), so writers of several processes and hosts can take turns; a lock
older than its expiry is taken as abandoned by a crashed writer and broken.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import IO, Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

#: Seconds after which a lock file is taken as abandoned (its holder crashed).
LOCK_EXPIRY_SECONDS = 30.0
#: Seconds a writer waits for a lock before giving up.
LOCK_TIMEOUT_SECONDS = 20.0
#: errno values of a full disk or quota (answered 507, not 500).
FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class StorageError(OSError):
    """A storage operation failed; the message names the path."""


class StorageFull(StorageError):
    """The storage has no room for a write (disk full, file size or disk quota)."""


class LockTimeout(StorageError):
    """A lock stayed held by another writer for longer than the wait allows."""


def storage_error(error: OSError, where: str, what: str) -> StorageError:
    """``error`` as a :class:`StorageError` (:class:`StorageFull` for a full disk) naming
    ``where``."""
    cls = StorageFull if error.errno in FULL_ERRNOS else StorageError
    reason = error.strerror or str(error) or type(error).__name__
    return cls(f"{where}: {what} failed: {reason}")


def fsync_dir(path: str) -> None:
    """Flush the entries of the local folder ``path`` (a rename in it) to disk."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | Path) -> None:
    """Flush every file and folder below the local ``path`` to disk."""
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def temporary_beside(target: str, suffix: str = "") -> tuple[str, str]:
    """The local folder of ``target`` (made if missing) and a hidden, unused name in it."""
    parent = posixpath.dirname(target)
    os.makedirs(parent, exist_ok=True)
    return parent, f"{parent}/.tmp-{uuid.uuid4().hex}{suffix}"


def copy_tree(source: str, dest: str) -> None:
    """Copy the local folder ``source`` to ``dest``, raising the first error as it is
    (``shutil.copytree`` gathers them into one without their errno)."""
    for dirpath, _dirs, files in os.walk(source):
        folder = os.path.join(dest, os.path.relpath(dirpath, source))
        os.makedirs(folder, exist_ok=True)
        for name in files:
            shutil.copy2(os.path.join(dirpath, name), os.path.join(folder, name))


class Storage:
    """Read and write files below one root URI (a folder, ``file://``, ``s3://``, ...)."""

    def __init__(self, root: str) -> None:
        fs, path = fsspec.core.url_to_fs(root)
        self.fs: fsspec.AbstractFileSystem = fs
        self.root_uri = root
        self.root = path.rstrip("/") or "/"
        if self.is_local:
            Path(self.root).mkdir(parents=True, exist_ok=True)

    @property
    def is_local(self) -> bool:
        return isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        """Full filesystem path of ``parts`` below the root; refuses to leave the root."""
        rel = posixpath.normpath(posixpath.join(*parts)) if parts else "."
        if rel.startswith("../") or rel == ".." or rel.startswith("/"):
            raise StorageError(f"path {'/'.join(parts)!r} leaves the storage root")
        return self.root if rel == "." else f"{self.root}/{rel}"

    def uri(self, *parts: str) -> str:
        """URI of ``parts`` that another process can open with fsspec."""
        full = self.path(*parts)
        if self.is_local:
            return full
        return self.fs.unstrip_protocol(full)

    def exists(self, *parts: str) -> bool:
        return bool(self.fs.exists(self.path(*parts)))

    def read_bytes(self, *parts: str) -> bytes:
        try:
            if self.is_local:  # a plain read costs a fraction of fsspec's (hot for small files)
                with open(self.path(*parts), "rb") as stream:
                    return stream.read()
            return self.fs.cat_file(self.path(*parts))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.uri(*parts)}: not found") from None

    def read_text(self, *parts: str) -> str:
        return self.read_bytes(*parts).decode()

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts))

    def write_bytes(self, data: bytes, *parts: str) -> str:
        """Write ``data`` atomically and durably; return the full path.

        :class:`StorageFull` when there is no room, :class:`StorageError` for any other
        failure; no temporary file is left behind either way.
        """
        target = self.path(*parts)
        try:
            if self.is_local:
                self._write_local(data, target)
            else:  # one PUT of an object store: atomic there, nothing to rename
                self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
                self.fs.pipe_file(target, data)
        except OSError as error:
            raise storage_error(error, self.uri(*parts), "write") from error
        return target

    @staticmethod
    def _write_local(data: bytes, target: str) -> None:
        parent, tmp = temporary_beside(target, f"-{posixpath.basename(target)}")
        try:
            with open(tmp, "wb") as stream:
                stream.write(data)
                stream.flush()
                os.fsync(stream.fileno())
            os.replace(tmp, target)
        except BaseException:
            with suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        fsync_dir(parent)

    def write_text(self, text: str, *parts: str) -> str:
        return self.write_bytes(text.encode(), *parts)

    def write_json(self, data: Any, *parts: str) -> str:
        return self.write_bytes(json.dumps(data, indent=2, sort_keys=True).encode(), *parts)

    def flush(self, stream: IO[bytes]) -> None:
        """Flush a file this storage opened for writing to disk (a no-op off folders)."""
        if self.is_local:
            stream.flush()
            os.fsync(stream.fileno())

    def create_exclusive(self, data: bytes, *parts: str) -> bool:
        """Write ``data`` at ``parts`` only if nothing is there; whether this call did.

        On a folder, ``O_CREAT | O_EXCL`` (the parent folder must exist:
        :class:`FileNotFoundError` otherwise); on an object store, a conditional PUT.
        """
        target = self.path(*parts)
        if not self.is_local:
            try:
                self.fs.pipe_file(target, data, mode="create")
            except FileExistsError:
                return False
            return True
        try:
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, data)
            os.fsync(fd)
        except BaseException as error:
            os.close(fd)
            os.unlink(target)
            if isinstance(error, OSError):
                raise storage_error(error, self.uri(*parts), "write") from error
            raise
        os.close(fd)
        return True

    def age(self, *parts: str) -> float | None:
        """Seconds since ``parts`` was last written (``None`` when it is gone or the
        filesystem does not say)."""
        target = self.path(*parts)
        try:
            if self.is_local:
                return time.time() - os.stat(target).st_mtime
            modified = self.fs.modified(target)
        except (FileNotFoundError, NotImplementedError):
            return None
        return time.time() - modified.timestamp()

    @contextmanager
    def lock(
        self,
        *parts: str,
        timeout: float = LOCK_TIMEOUT_SECONDS,
        expiry: float = LOCK_EXPIRY_SECONDS,
    ) -> Iterator[None]:
        """Hold the lock file ``parts`` for the ``with`` block.

        Waits (with growing pauses) while another writer holds it, breaks it when it is
        older than ``expiry`` seconds (a crashed holder), and raises :class:`LockTimeout`
        after ``timeout`` seconds. Released only if still this holder's. On a folder the
        lock's parent folder must exist (:class:`FileNotFoundError` otherwise).
        """
        token = uuid.uuid4().hex.encode()
        deadline = time.monotonic() + timeout
        pause = 0.002
        while not self.create_exclusive(token, *parts):
            age = self.age(*parts)
            if age is not None and age > expiry:
                self._release(self._held_token(*parts), *parts)
                continue
            if time.monotonic() > deadline:
                raise LockTimeout(f"{self.uri(*parts)}: held by another writer for {timeout:g} s")
            time.sleep(pause * (0.5 + random.random()))
            pause = min(pause * 2, 0.02)
        try:
            yield
        finally:
            self._release(token, *parts)

    def _held_token(self, *parts: str) -> bytes | None:
        try:
            return self.read_bytes(*parts)
        except FileNotFoundError:
            return None

    def _release(self, token: bytes | None, *parts: str) -> None:
        """Remove the lock file ``parts`` if it still holds ``token``."""
        if token is not None and self._held_token(*parts) == token:
            with suppress(FileNotFoundError):
                self.fs.rm(self.path(*parts))

    def append_text(self, text: str, *parts: str) -> None:
        """Append to a log-like file (not atomic; for logs only)."""
        target = self.path(*parts)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        with self.fs.open(target, "ab") as stream:
            stream.write(text.encode())

    def listdir(self, *parts: str) -> list[str]:
        """Names directly below ``parts`` (empty when it does not exist), hidden ones left out."""
        base = self.path(*parts)
        if not self.fs.exists(base):
            return []
        names = [posixpath.basename(p.rstrip("/")) for p in self.fs.ls(base, detail=False)]
        return sorted(n for n in names if not n.startswith("."))

    def isdir(self, *parts: str) -> bool:
        return bool(self.fs.isdir(self.path(*parts)))

    def size(self, *parts: str) -> int:
        return int(self.fs.size(self.path(*parts)))

    def delete(self, *parts: str) -> None:
        """Remove a file or a whole folder; missing is not an error."""
        target = self.path(*parts)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def upload_dir(self, local_dir: str | Path, *parts: str, last: str | None = None) -> str:
        """Copy a local folder below ``parts``; :class:`StorageError` if ``parts`` exists.

        On a folder it is copied under a temporary name, flushed to disk and renamed, so
        it appears whole or not at all. On an object store the files are put in place
        one by one, ``last`` (a file name in the folder) after every other, so a reader
        may take the folder as complete once ``last`` is there. Nothing of a failed copy
        is left behind.
        """
        target = self.path(*parts)
        source = str(local_dir).rstrip("/")
        if self.fs.exists(target):
            raise StorageError(f"{self.uri(*parts)}: already exists")
        try:
            if self.is_local:
                self._upload_local(source, target)
            else:
                self._upload_objects(source, target, last)
        except OSError as error:
            if not isinstance(error, StorageError):
                raise storage_error(error, self.uri(*parts), "copy") from error
            raise
        return target

    @staticmethod
    def _upload_local(source: str, target: str) -> None:
        parent, tmp = temporary_beside(target)
        try:
            copy_tree(source, tmp)
            fsync_tree(tmp)
            os.rename(tmp, target)  # never into a folder another writer put there first
        except OSError as error:
            if error.errno in (errno.EEXIST, errno.ENOTEMPTY):
                raise StorageError(f"{target}: already exists") from None
            raise
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        fsync_dir(parent)

    def _upload_objects(self, source: str, target: str, last: str | None) -> None:
        files = sorted(Path(source).rglob("*"), key=lambda p: p.relative_to(source).as_posix())
        ordered = [p for p in files if p.is_file() and p.relative_to(source).as_posix() != last]
        ordered += [p for p in files if p.is_file() and p.relative_to(source).as_posix() == last]
        try:
            for path in ordered:
                self.fs.put_file(str(path), f"{target}/{path.relative_to(source).as_posix()}")
        except BaseException:
            with suppress(OSError):
                self.fs.rm(target, recursive=True)
            raise

    @contextmanager
    def local_copy(self, *parts: str) -> Iterator[Path]:
        """Yield a local path holding ``parts`` (the path itself when storage is local)."""
        if self.is_local:
            yield Path(self.path(*parts))
            return
        tmp = Path(tempfile.mkdtemp(prefix="mlaas4hep-"))
        try:
            dest = tmp / posixpath.basename(self.path(*parts))
            self.fs.get(self.path(*parts), str(dest), recursive=True)
            yield dest
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
