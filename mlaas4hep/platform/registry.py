"""The model registry: versioned model bundles in storage.

Layout::

    models/<name>/model.json          owner, visibility, created
    models/<name>/<version>/          one bundle: the Keras model (``model.keras`` and a
                                      SavedModel in ``saved_model/``), specs.json,
                                      params.json, labels.txt, metadata.json

Versions are integers from 1; ``latest`` is the highest. A version is published by a
rename of a complete folder, so a replica never loads half a bundle. Every change
(register, delete, visibility) then rewrites ``models/.stamp`` with a new random token,
so a reader may cache what it read under the stamp it read first (:meth:`ModelRegistry.stamp`).
"""

from __future__ import annotations

import datetime as dt
import re
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from mlaas4hep.platform.config import MODEL_NAME_PATTERN
from mlaas4hep.platform.storage import Storage, StorageError

Visibility = Literal["private", "group", "public"]

#: Files a bundle must hold to be served.
REQUIRED_BUNDLE_FILES = ("params.json",)
#: Hidden file below ``models/`` rewritten after every change of the registry.
STAMP_FILE = ".stamp"


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
        return sorted(int(v) for v in self.storage.listdir("models", name) if v.isdigit())

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
        visibility: Visibility = "private",
        groups: list[str] | None = None,
    ) -> ModelVersion:
        """Publish a local bundle folder as the next version of ``name``.

        Raises :class:`ModelNameTaken` when another owner holds the name.
        """
        check_model_name(name)
        bundle_dir = Path(bundle_dir)
        for required in REQUIRED_BUNDLE_FILES:
            if not (bundle_dir / required).is_file():
                raise RegistryError(f"bundle {bundle_dir} lacks {required}")
        data = self._record_data(name)
        if data is not None and data.get("owner") not in (None, owner):
            raise ModelNameTaken(f"model name {name!r} belongs to another user")
        if data is None:
            data = {"name": name, "owner": owner, "created": _now()}
        data["visibility"] = visibility
        data["groups"] = list(groups or data.get("groups", []))
        with self._changing():
            self.storage.write_json(data, "models", name, "model.json")
            for _attempt in range(20):
                version = (max(self.versions(name), default=0)) + 1
                try:
                    self.storage.upload_dir(bundle_dir, "models", name, str(version))
                except StorageError:
                    continue  # another writer took this number; take the next one
                return self.get(name, version)
            raise RegistryError(f"could not publish a new version of {name!r}")

    def set_visibility(self, name: str, visibility: Visibility, groups: list[str] | None) -> None:
        data = self._record_data(name)
        if data is None:
            raise ModelNotFound(f"model {name!r} not found")
        data["visibility"] = visibility
        if groups is not None:
            data["groups"] = groups
        with self._changing():
            self.storage.write_json(data, "models", name, "model.json")

    def delete(self, name: str, version: int | None = None) -> None:
        """Delete one version, or the whole model when ``version`` is ``None``."""
        record = self.record(name)
        if version is not None and int(version) not in record.versions:
            raise ModelNotFound(f"model {name!r} has no version {version}")
        with self._changing():
            if version is None:
                self.storage.delete("models", name)
                return
            self.storage.delete("models", name, str(int(version)))
            if not self.versions(name):
                self.storage.delete("models", name)
