"""The model deployment: loads bundles lazily by id, batches rows, predicts.

Requests carry a multiplexed model id ``"<name>@<version>#<stamp>"`` resolved by the
ingress from storage on every request; ``stamp`` changes when a version folder is
replaced, so a replica never answers with a model that storage no longer holds.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from ray import serve
from ray.serve import metrics

from mlaas4hep.platform.registry import ModelRegistry
from mlaas4hep.platform.storage import Storage
from mlaas4hep.serve.bundle import BundleError, LoadedModel, load_bundle, write_tree

MAX_MODELS_PER_REPLICA = 8
LATENCY_BOUNDARIES_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 5000]
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 1024, 4096]


def make_model_id(name: str, version: int, stamp: str) -> str:
    return f"{name}@{version}#{stamp}"


def parse_model_id(model_id: str) -> tuple[str, int]:
    """``(name, version)`` of a multiplexed model id."""
    name, _, rest = model_id.partition("@")
    return name, int(rest.partition("#")[0])


class ModelServer:
    """Serve deployment body: ``predict`` and ``describe`` for the request's model id."""

    def __init__(self, storage_root: str) -> None:
        self.registry = ModelRegistry(Storage(storage_root))
        tags = ("model", "version")
        self.requests = metrics.Counter(
            "mlaas4hep_model_requests", "Prediction requests per model", tag_keys=tags
        )
        self.errors = metrics.Counter(
            "mlaas4hep_model_errors", "Prediction requests refused or failed", tag_keys=tags
        )
        self.latency = metrics.Histogram(
            "mlaas4hep_model_latency_ms",
            "Time to answer a prediction request in the replica",
            boundaries=LATENCY_BOUNDARIES_MS,
            tag_keys=tags,
        )
        self.batch_rows = metrics.Histogram(
            "mlaas4hep_model_batch_rows",
            "Rows per model call after dynamic batching",
            boundaries=BATCH_BOUNDARIES,
            tag_keys=tags,
        )

    @serve.multiplexed(max_num_models_per_replica=MAX_MODELS_PER_REPLICA)
    async def get_model(self, model_id: str) -> LoadedModel:
        name, version = parse_model_id(model_id)
        return await asyncio.to_thread(self._load, name, version)

    def _load(self, name: str, version: int) -> LoadedModel:
        entry = self.registry.get(name, version)
        storage = self.registry.storage
        with storage.local_copy("models", name, str(entry.version)) as path:
            return load_bundle(Path(path), name, entry.version)

    async def describe(self) -> dict[str, Any]:
        """Shapes, labels and params of the request's model."""
        model = await self.get_model(serve.get_multiplexed_model_id())
        return model.describe()

    async def predict(self, matrix: np.ndarray, keys: list[str] | None = None) -> np.ndarray:
        """Outputs ``[n_rows, n_outputs]``; :class:`InputError` when ``matrix`` does not fit."""

        def rows(model: LoadedModel) -> np.ndarray:
            columns = model.columns_for(keys, matrix.shape[1])
            return matrix if columns is None else matrix[:, columns]

        return await self._measured(rows)

    async def predict_events(self, events: Any) -> np.ndarray:
        """Outputs for raw physics events, flattened with the bundle's specs.json."""
        return await self._measured(lambda model: model.events_matrix(events))

    async def predict_image(self, data: bytes) -> np.ndarray:
        """Outputs for one image file, decoded and resized to the model's input shape."""
        return await self._measured(lambda model: model.image_matrix(data))

    async def _measured(self, inputs: Any) -> np.ndarray:
        """Predict on ``inputs(model)`` for the request's model, counting and timing it."""
        start = time.perf_counter()
        name, version = parse_model_id(serve.get_multiplexed_model_id())
        tags = {"model": name, "version": str(version)}
        self.requests.inc(tags=tags)
        try:
            model = await self.get_model(serve.get_multiplexed_model_id())
            return await self._predict_batch(inputs(model))
        except Exception:
            self.errors.inc(tags=tags)
            raise
        finally:
            self.latency.observe((time.perf_counter() - start) * 1e3, tags=tags)

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.001)
    async def _predict_batch(self, matrices: list[np.ndarray]) -> list[np.ndarray]:
        # Serve splits batches by multiplexed model id: one model per batch.
        model = await self.get_model(serve.get_multiplexed_model_id())
        self.batch_rows.observe(
            sum(len(m) for m in matrices), tags={"model": model.name, "version": str(model.version)}
        )
        if len(matrices) == 1:
            return [model.predict(matrices[0])]
        out = model.predict(np.concatenate(matrices))
        bounds = np.cumsum([len(m) for m in matrices])[:-1]
        return np.split(out, bounds)

    async def check_bundle(self, files: dict[str, bytes], name: str) -> dict[str, Any]:
        """Load an uploaded bundle from its files; its description, or :class:`BundleError`."""
        return await asyncio.to_thread(self._check_bundle, files, name)

    @staticmethod
    def _check_bundle(files: dict[str, bytes], name: str) -> dict[str, Any]:
        with tempfile.TemporaryDirectory(prefix="mlaas4hep-check-") as tmp:
            model = load_bundle(write_tree(files, Path(tmp)), name, 0)
            if model.labels and model.n_outputs not in (1, len(model.labels)):
                raise BundleError(
                    f"labels file has {len(model.labels)} labels "
                    f"but the model has {model.n_outputs} outputs"
                )
            return model.describe()
