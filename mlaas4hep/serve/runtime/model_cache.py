"""Per-replica caches of the inference service: registry lookups and loaded bundles.

:class:`LookupCache` answers "which version of model ``name``, under which stamp" from
memory while the registry's stamp (:meth:`ModelRegistry.stamp`, one small read per
request) is unchanged, so an upload or a delete is seen by the next request on every
replica. :class:`ModelCache` keeps the bundles a replica loaded by model id
(``"<name>@<version>#<stamp>"``, where ``stamp`` changes when a version folder is
replaced), least recently used out, each with the :class:`MicroBatcher` that merges its
concurrent small predictions.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from pathlib import Path
from typing import NamedTuple

from mlaas4hep.bundle import LoadedModel, load_bundle
from mlaas4hep.serve.runtime.microbatch import MicroBatcher
from mlaas4hep.store.registry import ModelNotFound, ModelRecord, ModelRegistry

MAX_MODELS_PER_REPLICA = 8
MAX_CACHED_LOOKUPS = 1024


def make_model_id(name: str, version: int, stamp: str) -> str:
    return f"{name}@{version}#{stamp}"


def parse_model_id(model_id: str) -> tuple[str, int]:
    """``(name, version)`` of a model id."""
    name, _, rest = model_id.partition("@")
    return name, int(rest.partition("#")[0])


class Lookup(NamedTuple):
    """A model reference resolved in the registry."""

    record: ModelRecord
    version: int
    model_id: str


class LookupCache:
    """Registry lookups of one replica, valid while the registry's stamp is unchanged.

    Each entry keeps the stamp read *before* its data, so an entry read while the
    registry changed is never taken for the new state. Unknown models and versions are
    remembered too (as their error message). Without a stamp (nothing registered yet)
    nothing is cached.
    """

    def __init__(self, registry: ModelRegistry, max_entries: int = MAX_CACHED_LOOKUPS) -> None:
        self.registry = registry
        self.max_entries = max_entries
        self._entries: dict[tuple[str, int | None], tuple[str, Lookup | str]] = {}

    def lookup(self, name: str, version: int | None = None) -> Lookup:
        """The record, version (latest when None) and model id of ``name``;
        :class:`ModelNotFound` when the model or version does not exist."""
        stamp = self.registry.stamp()
        key = (name, version)
        entry = self._entries.get(key)
        if entry is not None and stamp and entry[0] == stamp:
            found = entry[1]
        else:
            found = self._read(name, version)
            if stamp:
                if len(self._entries) >= self.max_entries:
                    self._entries.clear()
                self._entries[key] = (stamp, found)
        if isinstance(found, str):
            raise ModelNotFound(found)
        return found

    def _read(self, name: str, version: int | None) -> Lookup | str:
        try:
            record = self.registry.record(name)
            number = record.latest if version is None else version
            if number not in record.versions:
                raise ModelNotFound(f"model {name!r} has no version {number}")
            stamp = self.registry.version_stamp(name, number)
        except ModelNotFound as error:
            return str(error)
        return Lookup(record, number, make_model_id(name, number, stamp))


def load_registered(registry: ModelRegistry, name: str, version: int) -> LoadedModel:
    """Load version ``version`` of ``name`` from the registry (imports TensorFlow)."""
    entry = registry.get(name, version)
    with registry.storage.local_copy("models", name, str(entry.version)) as path:
        return load_bundle(Path(path), name, entry.version)


class ModelCache:
    """Bundles loaded in this replica by model id: each loaded once (concurrent requests
    wait for the same load), at most ``capacity`` kept, least recently used out.

    Each kept bundle has a :class:`MicroBatcher` (:meth:`batcher`) built with
    ``batch_max_rows`` and ``batch_above_s``.
    """

    def __init__(
        self,
        registry: ModelRegistry,
        capacity: int = MAX_MODELS_PER_REPLICA,
        batch_max_rows: int = 256,
        batch_above_s: float = 100e-6,
    ) -> None:
        self.registry = registry
        self.capacity = capacity
        self.batch_max_rows = batch_max_rows
        self.batch_above_s = batch_above_s
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._batchers: dict[str, MicroBatcher] = {}
        self._loading: dict[str, asyncio.Lock] = {}

    def __contains__(self, model_id: str) -> bool:
        return model_id in self._models

    async def get(self, model_id: str) -> LoadedModel:
        """The bundle of ``model_id``, loaded in a thread on first use."""
        model = self._models.get(model_id)
        if model is not None:
            self._models.move_to_end(model_id)
            return model
        lock = self._loading.setdefault(model_id, asyncio.Lock())
        async with lock:
            model = self._models.get(model_id)
            if model is None:
                name, version = parse_model_id(model_id)
                model = await asyncio.to_thread(load_registered, self.registry, name, version)
                self._store(model_id, model)
        self._loading.pop(model_id, None)
        return model

    def batcher(self, model_id: str) -> MicroBatcher:
        """The batcher of the kept bundle ``model_id`` (:meth:`get` it first)."""
        return self._batchers[model_id]

    def _store(self, model_id: str, model: LoadedModel) -> None:
        """Keep ``model``; drop earlier folders of its version and the oldest over capacity."""
        replaced = model_id.partition("#")[0] + "#"
        for old in [key for key in self._models if key.startswith(replaced)]:
            del self._models[old]
            del self._batchers[old]
        self._models[model_id] = model
        self._batchers[model_id] = MicroBatcher(
            model.predict, self.batch_max_rows, self.batch_above_s
        )
        while len(self._models) > self.capacity:
            oldest, _ = self._models.popitem(last=False)
            del self._batchers[oldest]
