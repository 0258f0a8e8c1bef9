"""One storage root for runs, models and uploads, on any fsspec filesystem.

Layout under the root (see DESIGN.md)::

    runs/<run_id>/              spec, status.json, specs.json, metrics, plots, log
    models/<name>/<version>/    model bundle
    uploads/<owner>/...         files a user uploaded

Writes are atomic: data goes to a temporary name beside the target, then is renamed,
so a reader never sees half a file.
"""

from __future__ import annotations

import json
import posixpath
import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem


class StorageError(OSError):
    """A storage operation failed; the message names the path."""


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
        """Write ``data`` atomically; return the full path."""
        target = self.path(*parts)
        parent = posixpath.dirname(target)
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}-{posixpath.basename(target)}"
        with self.fs.open(tmp, "wb") as stream:
            stream.write(data)
        try:
            self.fs.mv(tmp, target)
        except Exception as error:
            self.fs.rm(tmp)
            raise StorageError(f"{self.uri(*parts)}: write failed: {error}") from error
        return target

    def write_text(self, text: str, *parts: str) -> str:
        return self.write_bytes(text.encode(), *parts)

    def write_json(self, data: Any, *parts: str) -> str:
        return self.write_bytes(json.dumps(data, indent=2, sort_keys=True).encode(), *parts)

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

    def upload_dir(self, local_dir: str | Path, *parts: str) -> str:
        """Copy a local folder below ``parts`` so that it appears whole or not at all."""
        target = self.path(*parts)
        parent = posixpath.dirname(target)
        self.fs.makedirs(parent, exist_ok=True)
        tmp = f"{parent}/.tmp-{uuid.uuid4().hex}"
        self.fs.put(str(local_dir).rstrip("/") + "/", tmp, recursive=True)
        if self.fs.exists(target):
            raise StorageError(f"{self.uri(*parts)}: already exists")
        self.fs.mv(tmp, target, recursive=True)
        return target

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
