"""The model registry: versioned model bundles in storage.

Layout::

    models/<name>/model.json          owner, visibility, created
    models/<name>/<version>/          one bundle: the Keras model (``model.keras`` and a
                                      SavedModel in ``saved_model/``), specs.json,
                                      params.json, labels.txt, metadata.json

Versions are integers from 1; ``latest`` is the highest. ``model.json`` is only
changed under the model's lock file (``models/<name>/.lock``): the owner check and the
write happen in one step, and a registration takes the next version number there
(``last_version``), so concurrent registrations get distinct versions. A name may be
reserved for its owner before any version exists (:meth:`ModelRegistry.reserve`, at
pipeline submission). The bundle is then copied outside the lock: on a folder by a
rename of a complete copy, on an object store with ``params.json`` last (a version
counts once it is there), so a replica never loads half a bundle. Every change
(register, delete, visibility) then rewrites ``models/.stamp`` with a new random token,
so a reader may cache what it read under the stamp it read first (:meth:`ModelRegistry.stamp`).
"""

from __future__ import annotations

import datetime as dt
import os
import posixpath
import re
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mlaas4hep.spec import MODEL_NAME_PATTERN
from mlaas4hep.store.storage import Storage

Visibility = Literal["private", "group", "public"]

#: Files a bundle must hold to be served.
REQUIRED_BUNDLE_FILES = ("params.json",)
#: The bundle file copied last: on an object store a version counts once it is there.
PUBLISHED_BY = "params.json"
#: Hidden file below ``models/`` rewritten after every change of the registry.
STAMP_FILE = ".stamp"
#: Lock file of a model's ``model.json``, in its folder.
LOCK_FILE = ".lock"


class RegistryError(LookupError):
    """A model or version that does not exist, or a name held by another owner."""


class ModelNotFound(RegistryError):
    pass


class ModelNameTaken(RegistryError):
    pass


@dataclass(frozen=True)
class ModelVersion:
    """One registered bundle."""

    name: str
    version: int
    path: str
    metadata: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelRecord:
    """A model name with its owner, visibility and versions."""

    name: str
    owner: str
    visibility: Visibility
    groups: list[str]
    versions: list[int]
    created: str

    @property
    def latest(self) -> int:
        return max(self.versions)


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


def check_model_name(name: str) -> str:
    if not re.match(MODEL_NAME_PATTERN, name or ""):
        raise RegistryError(
            f"invalid model name {name!r}: use letters, digits, '_', '.', '-' (at most 64)"
        )
    return name


class ModelRegistry:
    """Register, find and delete model bundles below ``models/`` of a :class:`Storage`."""

    def __init__(self, storage: Storage) -> None:
        self.storage = storage

    def stamp(self) -> str:
        """A token that changes after every register, delete or visibility change ("" while
        nothing has been written); read it before the data it guards."""
        try:
            return self.storage.read_text("models", STAMP_FILE)
        except FileNotFoundError:
            return ""

    def version_stamp(self, name: str, version: int) -> str:
        """A token that changes when the folder of ``version`` is replaced (delete, then
        upload again); :class:`ModelNotFound` when it is gone."""
        try:
            info = self.storage.fs.info(
                self.storage.path("models", name, str(version), "params.json")
            )
        except FileNotFoundError:
            raise ModelNotFound(f"model {name!r} has no version {version}") from None
        for key in ("mtime", "LastModified", "ETag", "created"):
            if info.get(key) is not None:
                return str(info[key])
        return ""

    @contextmanager
    def _changing(self) -> Iterator[None]:
        """Around a change of the registry: a new stamp after it, even a failed one."""
        try:
            yield
        finally:
            self.storage.write_text(uuid.uuid4().hex, "models", STAMP_FILE)

    def _record_data(self, name: str) -> dict[str, Any] | None:
        try:
            return self.storage.read_json("models", name, "model.json")
        except FileNotFoundError:
            return None

    def versions(self, name: str) -> list[int]:
        """Published versions of ``name`` in ascending order."""
        numbers = [v for v in self.storage.listdir("models", name) if v.isdigit()]
        if not self.storage.is_local:  # copied file by file: complete once PUBLISHED_BY is
            numbers = [v for v in numbers if self.storage.exists("models", name, v, PUBLISHED_BY)]
        return sorted(int(v) for v in numbers)

    @contextmanager
    def _locked(self, name: str) -> Iterator[dict[str, Any] | None]:
        """The model's ``model.json`` data (``None`` if there is none) under its lock."""
        folder = self.storage.path("models", name)
        held = ExitStack()
        for attempt in range(5):  # the folder may go between mkdir and lock (a delete)
            if self.storage.is_local:
                Path(folder).mkdir(parents=True, exist_ok=True)
            try:
                held.enter_context(self.storage.lock("models", name, LOCK_FILE))
                break
            except FileNotFoundError:
                if attempt == 4:
                    raise
        try:
            with held:
                yield self._record_data(name)
        finally:
            if self.storage.is_local:  # a folder left holding nothing (a deleted model)
                with suppress(OSError):
                    os.rmdir(folder)

    def _write_record(self, data: dict[str, Any]) -> None:
        self.storage.write_json(data, "models", data["name"], "model.json")

    @staticmethod
    def _check_owner(name: str, data: dict[str, Any] | None, owner: str) -> dict[str, Any]:
        """``data``, or a new record of ``owner``; :class:`ModelNameTaken` when another
        owner holds ``name``."""
        if data is None:
            return {"name": name, "owner": owner, "created": _now(), "visibility": "private"}
        if data.get("owner") not in (None, owner):
            raise ModelNameTaken(f"model name {name!r} belongs to another user")
        return data

    def owner(self, name: str) -> str | None:
        """Who holds ``name`` (registered or reserved), ``None`` when nobody does."""
        check_model_name(name)
        data = self._record_data(name)
        return None if data is None else data.get("owner")

    def reserve(self, name: str, owner: str) -> None:
        """Hold ``name`` for ``owner`` before its first version (a pipeline submitted to
        train it); :class:`ModelNameTaken` when another owner holds it."""
        check_model_name(name)
        with self._locked(name) as data:
            checked = self._check_owner(name, data, owner)
            if data is None:
                self._write_record(checked)

    def record(self, name: str) -> ModelRecord:
        """The record of ``name``; :class:`ModelNotFound` if it has no published version."""
        check_model_name(name)
        data = self._record_data(name)
        versions = self.versions(name)
        if data is None or not versions:
            raise ModelNotFound(f"model {name!r} not found")
        return ModelRecord(
            name=name,
            owner=data.get("owner", ""),
            visibility=data.get("visibility", "private"),
            groups=list(data.get("groups", [])),
            versions=versions,
            created=data.get("created", ""),
        )

    def list_records(self) -> list[ModelRecord]:
        records = []
        for name in self.storage.listdir("models"):
            try:
                records.append(self.record(name))
            except RegistryError:
                continue
        return records

    def get(self, name: str, version: int | None = None) -> ModelVersion:
        """The bundle of ``name`` at ``version`` (latest when ``None``)."""
        record = self.record(name)
        version = record.latest if version is None else int(version)
        if version not in record.versions:
            raise ModelNotFound(f"model {name!r} has no version {version}")
        try:
            metadata = self.storage.read_json("models", name, str(version), "metadata.json")
        except FileNotFoundError:
            metadata = {}
        return ModelVersion(
            name, version, self.storage.path("models", name, str(version)), metadata
        )

    def register(
        self,
        name: str,
        bundle_dir: str | Path,
        owner: str,
        visibility: Visibility | None = None,
        groups: list[str] | None = None,
    ) -> ModelVersion:
        """Publish a local bundle folder as the next version of ``name``.

        ``visibility`` (and ``groups``) ``None`` keep the model's (private for a new
        one). Raises :class:`ModelNameTaken` when another owner holds the name.
        """
        check_model_name(name)
        bundle_dir = Path(bundle_dir)
        for required in REQUIRED_BUNDLE_FILES:
            if not (bundle_dir / required).is_file():
                raise RegistryError(f"bundle {bundle_dir} lacks {required}")
        with self._changing():
            version = self._next_version(name, owner, visibility, groups)
            try:
                self.storage.upload_dir(bundle_dir, "models", name, str(version), last=PUBLISHED_BY)
            except BaseException:
                self._give_back(name, version)
                raise
        return self.get(name, version)

    def _give_back(self, name: str, version: int) -> None:
        """Free the number ``version`` of a copy that failed, unless a later one took the
        next number meanwhile."""
        with self._locked(name) as data:
            if data is not None and data.get("last_version") == version:
                data["last_version"] = version - 1
                self._write_record(data)

    def _next_version(
        self, name: str, owner: str, visibility: Visibility | None, groups: list[str] | None
    ) -> int:
        """Check the owner and take the next version number of ``name`` in one step."""
        with self._locked(name) as current:
            data = self._check_owner(name, current, owner)
            on_disk = [int(v) for v in self.storage.listdir("models", name) if v.isdigit()]
            version = max([int(data.get("last_version") or 0), *on_disk]) + 1
            data["last_version"] = version
            if visibility is not None:
                data["visibility"] = visibility
                data["groups"] = list(groups or data.get("groups", []))
            self._write_record(data)
        return version

    def set_visibility(self, name: str, visibility: Visibility, groups: list[str] | None) -> None:
        check_model_name(name)
        with self._changing(), self._locked(name) as data:
            if data is None:
                raise ModelNotFound(f"model {name!r} not found")
            data["visibility"] = visibility
            if groups is not None:
                data["groups"] = groups
            self._write_record(data)

    def delete(self, name: str, version: int | None = None) -> None:
        """Delete one version, or the whole model when ``version`` is ``None``."""
        record = self.record(name)
        if version is not None and int(version) not in record.versions:
            raise ModelNotFound(f"model {name!r} has no version {version}")
        with self._changing(), self._locked(name):
            if version is not None:
                self.storage.delete("models", name, str(int(version)))
            if version is None or not self.versions(name):
                for entry in self.storage.fs.ls(self.storage.path("models", name), detail=False):
                    if posixpath.basename(entry.rstrip("/")) != LOCK_FILE:
                        self.storage.fs.rm(entry, recursive=True)
